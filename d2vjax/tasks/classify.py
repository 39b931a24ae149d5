"""Classification / regression fine-tuning tasks (fairseq-spec §9.2, §9.3) for the ``classify``
objective (``objectives/classify.py``), registered as ``finetune_task`` under the objective's
names:

``image_classification``   ImageFolder / tfds images with their class labels; training view:
    the pipeline's RandomResizedCrop + flip (+ colour jitter if configured), label smoothing and
    timm Mixup/CutMix on the host; validation view: shorter side → S / 0.875 (256 for 224),
    centre crop S (``probes.vision.eval_view``).
``sentence_classification``  ``label<TAB>sentence[<TAB>sentence2]`` files (GLUE-style): classes
    are the sorted labels of the training file, or float scores with ``finetune.regression``.

Validation scores: ``accuracy`` (and ``f1``/``mcc`` for two classes) or ``pearson``,
``spearman``, ``mse`` (regression), plus the mean ``loss``; the best checkpoint is kept by
``eval.metric`` (direction from ``METRICS``).
"""

from __future__ import annotations

import abc
import math
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from d2vjax import evaluate, registry, sharding
from d2vjax.data import image, labelled, pipeline
from d2vjax.data import text as text_data
from d2vjax.probes import vision as vision_probe
from d2vjax.tasks import base

__all__ = ["METRICS", "scores", "ClassifyTask", "ImageClassificationTask",
           "SentenceClassificationTask"]

# Validation metric → higher is better.
METRICS = {"accuracy": True, "f1": True, "mcc": True, "pearson": True, "spearman": True,
           "loss": False, "mse": False}


def scores(outputs: np.ndarray, labels: np.ndarray, *, regression: bool) -> dict[str, float]:
  """Validation scores of model outputs ``[N, C]`` (``[N, 1]`` for regression) against labels
  ``[N]`` (class ids or float values)."""
  if regression:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    pred, y = outputs[:, 0].astype(np.float64), labels.astype(np.float64)
    ok = len(y) > 1 and np.std(pred) > 0 and np.std(y) > 0
    return {"pearson": float(stats.pearsonr(pred, y)[0]) if ok else 0.0,
            "spearman": float(stats.spearmanr(pred, y)[0]) if ok else 0.0,
            "mse": float(np.mean((pred - y) ** 2)) if len(y) else math.nan}
  pred = np.argmax(outputs, axis=-1)
  y = labels.astype(np.int64)
  out = {"accuracy": float(np.mean(pred == y)) if len(y) else 0.0}
  if outputs.shape[-1] == 2:
    tp, tn = float(np.sum((pred == 1) & (y == 1))), float(np.sum((pred == 0) & (y == 0)))
    fp, fn = float(np.sum((pred == 1) & (y == 0))), float(np.sum((pred == 0) & (y == 1)))
    out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out["mcc"] = (tp * tn - fp * fn) / den if den > 0 else 0.0
  return out


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)


class ClassifyTask(base.FinetuneTask):
  """What image and sentence classification share: pre-trained config adoption, labels, the
  host hook, the validation loop and its scores."""

  def __init__(self, config):
    super().__init__(config)
    self.regression = bool(config.finetune.get("regression", False))
    self.metric = str(config.eval.metric)
    if self.metric not in METRICS:
      raise ValueError(f"eval.metric must be one of {sorted(METRICS)}, got {self.metric!r}")
    self.higher_is_better = METRICS[self.metric]

  # ------------------------------------------------------------------ config
  def pretrained_from_stored(self, stored) -> dict:
    out = super().pretrained_from_stored(stored)
    out["modality"] = stored.modality
    return out

  def check(self, config, pretrained, init):
    """A checkpoint of another modality is refused before any work."""
    got = None if pretrained is None else pretrained.get("modality")
    if got is not None and got != config.modality:
      raise ValueError(f"--init={init!r} is a {got!r} model but this config fine-tunes a "
                       f"{config.modality!r} one ({config.objective})")

  @abc.abstractmethod
  def _classes(self, config, train_examples) -> list[str]:
    """Class names in label order, from the training examples."""

  @abc.abstractmethod
  def _label(self, examples, i: int):
    """Label of example ``i`` (class id or float value)."""

  def resolve_config(self, config, *, pretrained, stored, train_examples, init):
    """The pre-trained architecture and objective; ``classes`` (stored on resume, else from
    the training labels) and ``num_classes`` (1 output for regression)."""
    c = _copy(config)
    c.init = init
    if pretrained is not None:
      c.model = ml_collections.ConfigDict(pretrained["model"])
      obj = pretrained.get("objective")
      c.finetune.pretrained_objective = (pretrained["finetune"]["pretrained_objective"]
                                         if obj == c.objective else obj)
    if self.regression:
      c.classes = []
    else:
      c.classes = list(stored.classes) if stored is not None else self._classes(c, train_examples)
    c.num_classes = len(c.classes)
    if not self.regression and c.num_classes < 2:
      raise ValueError(f"found {c.num_classes} class(es) in the training labels; "
                       "classification needs at least 2")
    return c

  def label_fn(self, config, train: bool) -> labelled.LabelFn:
    """Training: smoothing and mixing from ``finetune``; validation: plain one-hot targets."""
    ft = config.finetune
    num = 0 if self.regression else int(config.num_classes)
    if not train:
      return labelled.LabelFn(num)
    return labelled.LabelFn(num, float(ft.get("label_smoothing", 0.0) or 0.0),
                            labelled.mix_config(ft.get("mixup")))

  def batch_fn(self, config, objective, train):
    return self.label_fn(config, train)

  def _with_labels(self, config, batch: dict, rows: int) -> dict:
    batch = dict(batch)
    batch["_labels"] = np.zeros((rows,), np.float64)
    out = self.label_fn(config, train=False)(np.random.default_rng(0), batch)
    return {k: v for k, v in out.items() if not k.startswith("_")}

  # ------------------------------------------------------------------ evaluation
  @abc.abstractmethod
  def _groups(self, config, examples, batch_multiple: int) -> list[tuple[object, list[int], int]]:
    """``(shape key, example indices, global rows per batch)`` per batch shape."""

  @abc.abstractmethod
  def _local_batch(self, config, examples, key, indices: Sequence[int | None], bad: dict
                   ) -> dict:
    """Host batch of this process's rows (None = filler; unreadable inputs get ``row_valid``
    False and are counted in ``bad``) with ``_labels``."""

  def _eval_examples(self, config, examples):
    return examples

  def make_evaluator(self, config, objective, valid_examples, *, param_sharding, batch_sharding,
                     batch_multiple, total_steps, steps_per_epoch):
    del total_steps, steps_per_epoch
    examples = self._eval_examples(config, valid_examples)
    predict = evaluate.make_predict(objective, param_sharding, batch_sharding)
    hook = self.label_fn(config, train=False)
    groups = self._groups(config, examples, batch_multiple)
    pi, pc = jax.process_index(), jax.process_count()

    def run(params, step: int) -> base.EvalReport:
      del step
      outs, labels, losses, bad = [], [], [], {}
      for key, members, rows in groups:
        per = rows // pc
        for start in range(0, len(members), rows):
          idx = [members[start + r] if start + r < len(members) else None for r in range(rows)]
          host = self._local_batch(config, examples, key, idx[pi * per:(pi + 1) * per], bad)
          host = hook(np.random.default_rng(0), host)
          host = {k: v for k, v in host.items() if not k.startswith("_")}
          # Every process gets every row (global order) and scores the whole split.
          device = sharding.global_batch(host, batch_sharding)
          out = evaluate._to_host(predict(params, device), pc)  # pylint: disable=protected-access
          valid = np.asarray(out["row_valid"], bool)
          outs.append(np.asarray(out["outputs"])[valid])
          losses.append(np.asarray(out["loss"])[valid])
          labels.append(np.asarray([self._label(examples, idx[r]) for r in np.flatnonzero(valid)],
                                   np.float64))
      outputs = np.concatenate(outs) if outs else np.zeros((0, objective.num_outputs))
      y = np.concatenate(labels) if labels else np.zeros((0,))
      sc = scores(outputs, y, regression=self.regression)
      sc["loss"] = float(np.mean(np.concatenate(losses))) if losses else math.nan
      record = dict(sc, examples=int(len(y)), skipped=int(sum(bad.values())))
      line = " ".join(f"{k} {v:.4f}" for k, v in sc.items()) + f" over {len(y)} examples"
      return base.EvalReport(scalars={**sc, "examples": float(len(y))}, record=record,
                             line=line)

    return run


def _rows_valid(indices) -> np.ndarray:
  return np.asarray([i is not None for i in indices], bool)


@registry.register("finetune_task", "image_classification")
class ImageClassificationTask(ClassifyTask):
  """Images from ``data.source`` ('folder': one subfolder per class; 'tfds'); with
  ``data.synthetic='patterns'`` a four-class toy set is first written to ``data.folder``
  (``labelled.write_pattern_images``; the embedded images have no labels)."""

  def examples(self, config, split):
    if config.data.get("synthetic"):
      labelled.write_pattern_images(config.data.folder, size=int(config.data.synthetic_size))
    examples, counts = image.examples_from_config(config.data, split)
    kept = [e for e in examples if e.label >= 0]
    if len(kept) < len(examples):
      counts = dict(counts, unlabelled=len(examples) - len(kept))
    return kept, counts

  def _classes(self, config, train_examples):
    names = {}
    for e in train_examples:
      names.setdefault(e.label, e.key.split("/", 1)[0] if "/" in e.key else str(e.label))
    return [names.get(i, str(i)) for i in range(1 + max(names, default=-1))]

  def resolve_config(self, config, *, pretrained, stored, train_examples, init):
    c = super().resolve_config(config, pretrained=pretrained, stored=stored,
                               train_examples=train_examples, init=init)
    c.data.patch_size = c.model.patch_size  # the data check follows the pre-trained patches
    return c

  def dummy_batch(self, config, objective):
    b = objective.modality.dummy_batch(config.data, 1)
    return self._with_labels(config, {"image": b["image"]}, 1)

  def _eval_examples(self, config, examples):
    """Validation labels renumbered by class name (folder names), so a validation folder with
    fewer classes than the training one keeps the training indices."""
    index = {n: i for i, n in enumerate(config.classes)}
    if not all("/" in e.key for e in examples):
      return list(examples)
    return [image.ImageExample(e.path, e.key, index[e.key.split("/", 1)[0]]) for e in examples
            if e.key.split("/", 1)[0] in index]

  def _label(self, examples, i):
    return examples[i].label

  def _groups(self, config, examples, batch_multiple):
    rows = max(batch_multiple, int(config.eval.batch_size) // batch_multiple * batch_multiple)
    return [(None, list(range(len(examples))), rows)]

  def _local_batch(self, config, examples, key, indices, bad):
    del key
    aug = image.augment_from_config(config.data)
    s = aug.size
    images = np.zeros((len(indices), s, s, 3), np.float32)
    valid = _rows_valid(indices)
    labels = np.zeros((len(indices),), np.float64)
    for r, i in enumerate(indices):
      if i is None:
        continue
      try:
        img, _ = image.load_image(examples[i].path)
      except image.BadImageError as e:
        bad[e.reason] = bad.get(e.reason, 0) + 1
        valid[r] = False  # left out of every score
        continue
      images[r] = vision_probe.eval_view(img, aug)
      labels[r] = examples[i].label
    return {"image": images, "row_valid": valid, "_labels": labels}


@registry.register("finetune_task", "sentence_classification")
class SentenceClassificationTask(ClassifyTask):
  """Labelled sentence files ``data.train_file`` / ``data.valid_file``; with
  ``data.synthetic='sentiment'`` a templated two-class (or, with ``finetune.regression``, 0–5
  score) set is first written beside ``data.train_file`` (``labelled.write_sentiment_tsv``)."""

  def _path(self, config, split: str) -> str:
    return str(config.data.train_file if split == "train" else
               config.data.valid_file if split == "valid" else split)

  def _train_classes(self, config) -> list[str] | None:
    if self.regression:
      return None
    return sorted({label for label, _ in labelled.read_tsv(self._path(config, "train"))})

  def examples(self, config, split):
    if config.data.get("synthetic"):
      labelled.write_sentiment_tsv(os.path.dirname(self._path(config, "train")),
                                   regression=self.regression)
    path = self._path(config, split)
    tok = text_data._tokenizer(config.data)  # pylint: disable=protected-access
    return labelled.encode_sentences(tok, labelled.read_tsv(path),
                                     max_tokens=int(config.data.tokens_per_sample),
                                     classes=self._train_classes(config), source=path)

  def _classes(self, config, train_examples):
    return self._train_classes(config)

  def resolve_config(self, config, *, pretrained, stored, train_examples, init):
    c = super().resolve_config(config, pretrained=pretrained, stored=stored,
                               train_examples=train_examples, init=init)
    if int(c.model.vocab_size) != int(c.data.vocab_size):
      raise ValueError(f"the model embeds {c.model.vocab_size} ids but data.vocab_size is "
                       f"{c.data.vocab_size}: point data.tokenizer at the pre-training tokenizer")
    return c

  def dummy_batch(self, config, objective):
    t = min(int(b) for b in config.data.buckets)
    return self._with_labels(config, {"tokens": np.zeros((1, t), np.int32),
                                      "padding_mask": np.zeros((1, t), bool)}, 1)

  def _label(self, examples, i):
    return examples.labels[i]

  def _groups(self, config, examples, batch_multiple):
    buckets = sorted(int(b) for b in config.data.buckets)
    which = np.searchsorted(np.asarray(buckets), examples.lengths, side="left")
    out = []
    for k, t in enumerate(buckets):
      members = [int(i) for i in np.flatnonzero(which == k)]
      if members:
        rows = pipeline.batch_rows(t, int(config.data.budget_tokens), batch_multiple,
                                   int(config.data.get("max_rows", 0) or 0))
        out.append((t, members, rows))
    return out

  def _local_batch(self, config, examples, key, indices, bad):
    del config, bad
    t = int(key)
    tokens = np.full((len(indices), t), text_data.PAD_ID, np.int32)
    pad = np.ones((len(indices), t), bool)
    labels = np.zeros((len(indices),), np.float64)
    for r, i in enumerate(indices):
      if i is None:
        continue
      ids = examples.block_tokens(i)
      tokens[r, 0] = text_data.BOS_ID
      tokens[r, 1:ids.size + 1] = ids
      pad[r, :ids.size + 1] = False
      labels[r] = examples.labels[i]
    return {"tokens": tokens, "padding_mask": pad, "row_valid": _rows_valid(indices),
            "_labels": labels}

