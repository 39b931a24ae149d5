"""Host-side labels for classification fine-tuning (NumPy only; JAX never runs here): soft targets
with label smoothing, timm's Mixup/CutMix, the batch hook that adds them, labelled sentence files
(``label<TAB>sentence[<TAB>sentence2]``, GLUE-style) as token blocks, and two small deterministic
labelled sets for CPU runs (the embedded images and text carry no labels).

Batch keys added by ``LabelFn``: ``labels`` int32 ``[B]`` (class ids; 0 for regression),
``targets`` float32 ``[B, C]`` (soft class targets, or ``[B, 1]`` regression values).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from d2vjax.data.sources import _get
from d2vjax.data.tokenizer import EOS_ID

__all__ = ["smooth_targets", "MixConfig", "sample_mix", "rand_bbox", "mix_batch", "LabelFn",
           "read_tsv", "SentenceExamples", "encode_sentences", "write_pattern_images",
           "write_sentiment_tsv", "PATTERN_CLASSES"]


# ---------------------------------------------------------------------------------------------
# Targets, Mixup / CutMix (timm.data.mixup semantics, mode 'batch').


def smooth_targets(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
  """One-hot ``[B, C]`` float32 with label smoothing as timm's ``mixup_target``: the true class
  gets ``1 - s + s/C``, every other ``s/C`` (cross-entropy against it equals timm's
  ``LabelSmoothingCrossEntropy``: ``(1 - s)·NLL + s·mean(-log p)``)."""
  off = smoothing / num_classes
  out = np.full((len(labels), num_classes), off, np.float32)
  out[np.arange(len(labels)), np.asarray(labels, np.int64)] = 1.0 - smoothing + off
  return out


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """timm ``Mixup`` arguments: Beta(α, α) for mixup and cutmix (0 = off), the probability of
  mixing a batch at all, the probability of cutmix when both are on, and the cutmix area
  correction (``correct_lam``)."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5
  correct_lam: bool = True

  @property
  def enabled(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def sample_mix(rng: np.random.Generator, cfg: MixConfig) -> tuple[float, bool]:
  """timm ``Mixup._params_per_batch``: ``(lam, use_cutmix)``; ``lam`` 1 = no mixing."""
  if not cfg.enabled or rng.random() >= cfg.prob:
    return 1.0, False
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    cut = bool(rng.random() < cfg.switch_prob)
  else:
    cut = cfg.cutmix_alpha > 0
  alpha = cfg.cutmix_alpha if cut else cfg.mixup_alpha
  return float(rng.beta(alpha, alpha)), cut


def rand_bbox(rng: np.random.Generator, height: int, width: int, lam: float
              ) -> tuple[int, int, int, int]:
  """timm ``rand_bbox`` (no margin): a box of side ``sqrt(1 - lam)`` times the image's, centred
  uniformly and clipped at the border. Returns ``(y_lo, y_hi, x_lo, x_hi)``."""
  ratio = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
  xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
  return int(yl), int(yh), int(xl), int(xh)


def mix_batch(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray,
              cfg: MixConfig) -> tuple[np.ndarray, np.ndarray, float]:
  """Mixup or CutMix of a batch with its reversal (row r with row B-1-r), as timm's batch mode.

  Args:
    images: float32 ``[B, H, W, C]``.
    targets: soft targets ``[B, K]`` (already smoothed).
  Returns:
    ``(images, targets, lam)``; for CutMix ``lam`` is corrected to the pasted box's area
    (``1 - box / (H·W)``) when ``cfg.correct_lam``.
  """
  lam, cut = sample_mix(rng, cfg)
  if lam == 1.0:
    return images, targets, 1.0
  flipped = images[::-1]
  if cut:
    h, w = images.shape[1:3]
    yl, yh, xl, xh = rand_bbox(rng, h, w, lam)
    images = images.copy()
    images[:, yl:yh, xl:xh] = flipped[:, yl:yh, xl:xh]
    if cfg.correct_lam:
      lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
  else:
    images = (images * np.float32(lam) + flipped * np.float32(1.0 - lam)).astype(np.float32)
  targets = (targets * lam + targets[::-1] * (1.0 - lam)).astype(np.float32)
  return images, targets, float(lam)


@dataclasses.dataclass(frozen=True)
class LabelFn:
  """Pipeline hook (picklable): ``_labels`` (host metadata) → ``labels`` and ``targets``.

  Classification: ``targets`` are smoothed one-hot rows, then, for images and ``mix.enabled``,
  the batch is mixed (``mix_batch``); the mixing draw comes from the hook's generator, which is
  the same on every process, so every process mixes with the same ``lam`` (each within its rows).
  Regression (``num_classes`` 0): ``targets [B, 1]`` are the float labels.
  """
  num_classes: int
  smoothing: float = 0.0
  mix: MixConfig = MixConfig()
  image_key: str = "image"

  def __call__(self, rng: np.random.Generator, batch: dict) -> dict:
    raw = np.asarray(batch["_labels"])
    out = dict(batch)
    if self.num_classes <= 0:
      out["labels"] = np.zeros(raw.shape, np.int32)
      out["targets"] = raw.astype(np.float32)[:, None]
      return out
    labels = raw.astype(np.int64)
    if np.any((labels < 0) | (labels >= self.num_classes)):
      raise ValueError(f"labels outside [0, {self.num_classes}): {sorted(set(labels.tolist()))} "
                       f"(keys {batch.get('_keys')})")
    targets = smooth_targets(labels, self.num_classes, self.smoothing)
    if self.mix.enabled and self.image_key in batch:
      out[self.image_key], targets, _ = mix_batch(rng, batch[self.image_key], targets, self.mix)
    out["labels"] = labels.astype(np.int32)
    out["targets"] = targets
    return out


# ---------------------------------------------------------------------------------------------
# Labelled sentences (GLUE-style TSV).


def read_tsv(path: str) -> list[tuple[str, str]]:
  """``(label, text)`` pairs of a ``label<TAB>text`` file (``text`` keeps any further tabs: a
  sentence pair is ``label<TAB>first<TAB>second``); blank lines are skipped, a line without a tab
  is an error naming the file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"labelled text file {path!r} does not exist (expected "
                            "label<TAB>sentence lines)")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      if "\t" not in line:
        raise ValueError(f"{path}:{n}: expected 'label<TAB>sentence', got {line[:60]!r}")
      label, sentence = line.split("\t", 1)
      out.append((label.strip(), sentence))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class SentenceExamples:
  """Labelled sentences in the text pipeline's block protocol (``data.text``): ``len()``,
  ``lengths`` (ids with ``<s>``), ``block_tokens(i)`` (ids without ``<s>``), ``key(i)``, plus
  ``labels`` (float64 ``[N]``: class ids or regression values), read by the loader as
  ``_labels``."""
  ids: tuple[np.ndarray, ...]
  labels: np.ndarray
  keys: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray([a.size + 1 for a in self.ids], np.int64)

  def block_tokens(self, i: int) -> np.ndarray:
    return self.ids[i]

  def key(self, i: int) -> str:
    return self.keys[i]


def encode_sentences(tok, rows: list[tuple[str, str]], *, max_tokens: int, classes=None,
                     source: str = "") -> tuple[SentenceExamples, dict[str, int]]:
  """Token blocks of ``read_tsv`` rows, RoBERTa-style: ``<s> a </s>`` or ``<s> a </s> </s> b
  </s>`` for a pair (fairseq's GLUE preprocessing).

  Args:
    tok: ``tokenizer.TextTokenizer``.
    rows: ``(label, text)``; a tab in ``text`` separates the two sentences of a pair.
    max_tokens: longest block with ``<s>`` (``data.tokens_per_sample``); longer ones are cut at
      the end (keeping the final ``</s>``) and counted as ``truncated``.
    classes: class names (label → index); None = regression (labels parsed as floats).
    source: file name for errors and keys.
  Returns:
    ``(examples, counts)``; rows whose label is not in ``classes`` (or not a number) are skipped
    and counted as ``unknown_label``.
  """
  index = None if classes is None else {c: i for i, c in enumerate(classes)}
  segments = [t.split("\t") for _, t in rows]
  if any(len(s) > 2 for s in segments):
    bad = next(i for i, s in enumerate(segments) if len(s) > 2)
    raise ValueError(f"{source}: row {bad + 1} has {len(segments[bad])} text columns; at most "
                     "two (a sentence pair)")
  flat = [x for s in segments for x in s]
  encoded = iter(tok.encode_batch(flat) if flat else [])
  eos = np.asarray([EOS_ID], np.int32)
  ids, labels, keys, counts = [], [], [], {}
  for n, ((label, _), seg) in enumerate(zip(rows, segments)):
    parts = [next(encoded) for _ in seg]
    if index is None:
      try:
        y = float(label)
      except ValueError:
        y = None
    else:
      y = index.get(label)
    if y is None:
      counts["unknown_label"] = counts.get("unknown_label", 0) + 1
      continue
    pieces = [parts[0], eos] + ([eos, parts[1], eos] if len(parts) == 2 else [])
    block = np.concatenate(pieces).astype(np.int32)
    if block.size + 1 > max_tokens:
      counts["truncated"] = counts.get("truncated", 0) + 1
      block = np.concatenate([block[:max_tokens - 2], eos])
    ids.append(block)
    labels.append(y)
    keys.append(f"{os.path.basename(source)}:{n}")
  return SentenceExamples(tuple(ids), np.asarray(labels, np.float64), tuple(keys)), counts


# ---------------------------------------------------------------------------------------------
# Small deterministic labelled sets for CPU presets and tests.

PATTERN_CLASSES = ("horizontal", "vertical", "checker", "rings")


def _pattern(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
  """One uint8 ``[size, size, 3]`` image: stripes / checks / rings of a random period and phase
  in a random colour and its complement, plus pixel noise."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  period = rng.uniform(size / 8, size / 3)
  phase = rng.uniform(0, 2 * np.pi)
  if kind == "horizontal":
    v = np.sin(2 * np.pi * yy / period + phase)
  elif kind == "vertical":
    v = np.sin(2 * np.pi * xx / period + phase)
  elif kind == "checker":
    v = np.sin(2 * np.pi * yy / period + phase) * np.sin(2 * np.pi * xx / period + phase)
  else:
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    v = np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period + phase)
  # Two contrasting colours (a and its complement), so every crop shows the pattern.
  a = rng.uniform(0, 255, 3)
  b = 255.0 - a
  w = (v > 0)[..., None]
  img = np.where(w, a, b) + rng.normal(0, 12, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def write_pattern_images(root: str, *, train_per_class: int = 24, valid_per_class: int = 8,
                         size: int = 48, seed: int = 0) -> str:
  """An ImageFolder tree ``root/{train,valid}/<class>/<n>.png`` of the four ``PATTERN_CLASSES``
  (a separable toy task; the embedded images have no labels). Deterministic in ``seed``; an
  existing complete tree is reused. Returns ``root``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(root, ".complete_v2")
  if os.path.exists(done):
    return root
  os.makedirs(root, exist_ok=True)
  for s, (split, n) in enumerate((("train", train_per_class), ("valid", valid_per_class))):
    for c, kind in enumerate(PATTERN_CLASSES):
      folder = os.path.join(root, split, kind)
      os.makedirs(folder, exist_ok=True)
      rng = np.random.default_rng([seed, s, c])
      for i in range(n):
        Image.fromarray(_pattern(rng, kind, size)).save(os.path.join(folder, f"{i:03d}.png"))
  open(done, "w").close()
  return root


_POS = ("good", "great", "wonderful", "excellent", "delightful", "superb", "charming", "lovely")
_NEG = ("bad", "awful", "terrible", "boring", "dreadful", "poor", "dull", "clumsy")
_SUBJ = ("the film", "this book", "the meal", "our trip", "the concert", "that game", "the show",
         "the hotel", "his speech", "the garden")
_FILL = ("and we told our friends", "from start to finish", "in every way", "for most of the day",
         "as far as I can tell", "according to everyone", "again this year", "without question")


def write_sentiment_tsv(folder: str, *, train: int = 256, valid: int = 64, seed: int = 0,
                        regression: bool = False) -> tuple[str, str]:
  """``folder/{train,valid}.tsv`` of templated sentences with three sentiment adjectives.

  Classification: label ``positive`` / ``negative`` = the majority of the adjectives;
  regression: the share of positive adjectives × 5 (an STS-B-like 0–5 score). Deterministic in
  ``seed``; existing files are reused. Returns the two paths."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s, (split, n) in enumerate((("train", train), ("valid", valid))):
    path = os.path.join(folder, f"{split}.tsv")
    paths.append(path)
    if os.path.exists(path):
      continue
    rng = np.random.default_rng([seed, s, int(regression)])
    lines = []
    for _ in range(n):
      signs = rng.random(3) < 0.5
      words = [str(rng.choice(_POS if p else _NEG)) for p in signs]
      subj, fill = str(rng.choice(_SUBJ)), str(rng.choice(_FILL))
      sentence = f"{subj} was {words[0]}, {words[1]} and {words[2]} {fill}."
      pos = int(signs.sum())
      label = f"{5.0 * pos / 3:.3f}" if regression else ("positive" if pos >= 2 else "negative")
      lines.append(f"{label}\t{sentence}\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
  return paths[0], paths[1]


def default_cache_dir(name: str) -> str:
  """``$TMPDIR/d2vjax_labelled/<name>``: where the CPU presets write their generated sets."""
  return os.path.join(tempfile.gettempdir(), "d2vjax_labelled", name)


def mix_config(cfg) -> MixConfig:
  """``MixConfig`` from a ``finetune.mixup`` section (``mixup_alpha``, ``cutmix_alpha``,
  ``prob``, ``switch_prob``, ``correct_lam``; missing = off)."""
  if cfg is None:
    return MixConfig()
  return MixConfig(mixup_alpha=float(_get(cfg, "mixup_alpha", 0.0) or 0.0),
                   cutmix_alpha=float(_get(cfg, "cutmix_alpha", 0.0) or 0.0),
                   prob=float(_get(cfg, "prob", 1.0)),
                   switch_prob=float(_get(cfg, "switch_prob", 0.5)),
                   correct_lam=bool(_get(cfg, "correct_lam", True)))
