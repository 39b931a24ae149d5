"""Linear probes on frozen features, run periodically during pre-training (issue 7, item 4).

Every ``probe.every`` steps the trainer encodes a small labelled subset with the current student
(no masks, eval mode), fits a linear head on the frozen features of ``probe.train_split`` and
scores it on ``probe.valid_split``. The score says whether the representations are becoming
useful without a separate fine-tuning run (data2vec §5 reads its ablations the same way).

Two probe kinds (registry kind ``probe``), chosen by the modality's labelled data:
  ``ctc``       per-frame Linear(D → letters) trained with CTC; score: greedy-decoded CER / WER
                (lower is better). Speech.
  ``classify``  mean over the valid positions → Linear(D → classes) trained with cross-entropy;
                score: top-1 accuracy (higher is better). Images, text.

Labelled data comes from a provider registered as ``('probe_data', <modality name>)`` (see
``d2vjax/probes/``): ``provider(config, split, max_examples, batch_multiple)`` returns a
``ProbeData`` — fixed-shape host batches of the modality's model inputs plus ``row_valid`` and the
targets. Features are standardised with the training set's per-channel mean and variance (a
non-affine BatchNorm, as MAE's linear probe) and the head is fitted full-batch with Adam inside
one jitted ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax import asr, registry, sharding
from d2vjax.objectives import ctc as ctc_lib

__all__ = ["ProbeData", "Features", "Prober", "make_prober", "fit_ctc", "fit_classify",
           "encode_all", "resolve_layer", "fill_batches", "first"]


@dataclasses.dataclass
class ProbeData:
  """A labelled subset as the model sees it.

  Attributes:
    batches: GLOBAL host batches (identical on every process) with the modality's model-input
      keys and ``row_valid`` bool ``[B]`` (False = filler row), in a fixed order; rows are a
      multiple of the data-parallel device count; shapes come from a small fixed set.
    kind: the probe that reads the targets ('ctc' | 'classify').
    targets: per valid row, in batch order: transcripts (str, 'ctc') or class ids (int,
      'classify').
    num_classes: 'classify' only.
  """
  batches: list[dict]
  kind: str
  targets: list
  num_classes: int = 0


@dataclasses.dataclass
class Features:
  """Frozen features of every valid row: ``x`` float32 ``[N, T, D]`` (zero on padding) and
  ``padding`` bool ``[N, T]`` (True = pad), padded to the longest T of the set."""
  x: np.ndarray
  padding: np.ndarray


def _standardize(train: np.ndarray, *others: np.ndarray, axes=(0,), mask=None):
  """Per-channel (last axis) zero mean / unit variance with the training statistics, over the
  valid positions (``mask`` True = valid, broadcast like ``train[..., 0]``)."""
  w = np.ones(train.shape[:-1], np.float64) if mask is None else mask.astype(np.float64)
  n = max(w.sum(), 1.0)
  mean = (train * w[..., None]).sum(axis=axes) / n
  var = (((train - mean) ** 2) * w[..., None]).sum(axis=axes) / n
  scale = 1.0 / np.sqrt(var + 1e-6)
  return [((a - mean) * scale).astype(np.float32) for a in (train,) + others]


# ---------------------------------------------------------------------------------------------
# Heads.


def _adam_scan(loss_fn: Callable, params: dict, steps: int, lr):
  """Full-batch Adam for ``steps`` steps as one ``lax.scan``; returns the fitted params."""
  tx = optax.adam(lr)

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return params


def _init_linear(dim: int, out: int, seed: int) -> dict:
  """Zero bias, small normal weights (the trunc-normal 0.01 of MAE's probe head)."""
  w = np.random.default_rng(seed).normal(0.0, 0.01, (dim, out)).astype(np.float32)
  return {"w": jnp.asarray(w), "b": jnp.zeros((out,), jnp.float32)}


def _logits(params, x):
  return x @ params["w"] + params["b"]


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_classify(params, x, y, lr, *, steps: int):
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()
  return _adam_scan(loss_fn, params, steps, lr)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_ctc(params, x, pad, labels, label_padding, lr, *, steps: int):
  loss_fn = lambda p: ctc_lib.ctc_loss(_logits(p, x), pad, labels, label_padding)[0].mean()
  return _adam_scan(loss_fn, params, steps, lr)


def fit_classify(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, *, steps: int,
                 lr: float, seed: int = 0) -> dict:
  """Linear softmax classifier ``{'w': [D, C], 'b': [C]}`` on pooled features ``[N, D]`` with
  labels ``[N]`` (full-batch Adam, ``steps`` updates at learning rate ``lr``)."""
  params = _init_linear(train_x.shape[1], num_classes, seed)
  return _fit_classify(params, jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32),
                       jnp.float32(lr), steps=steps)


def fit_ctc(train: Features, labels: np.ndarray, label_padding: np.ndarray, vocab_size: int, *,
            steps: int, lr: float, seed: int = 0) -> dict:
  """Per-frame Linear(D → V) trained with CTC (``objectives.ctc.ctc_loss``, blank 0) on
  ``train.x [N, T, D]``; ``labels``/``label_padding`` ``[N, L]``."""
  params = _init_linear(train.x.shape[2], vocab_size, seed)
  return _fit_ctc(params, jnp.asarray(train.x), jnp.asarray(train.padding), jnp.asarray(labels),
                  jnp.asarray(label_padding), jnp.float32(lr), steps=steps)


def _pool(f: Features) -> np.ndarray:
  valid = (~f.padding).astype(np.float32)
  return (f.x * valid[..., None]).sum(1) / np.maximum(valid.sum(1), 1.0)[:, None]


@registry.register("probe", "classify")
def classify_probe(train: Features, valid: Features, train_data: ProbeData,
                   valid_data: ProbeData, *, steps: int, lr: float, seed: int) -> dict:
  """Top-1 accuracy of a linear classifier on mean-pooled, standardised features."""
  tx, vx = _standardize(_pool(train), _pool(valid))
  head = fit_classify(tx, np.asarray(train_data.targets), train_data.num_classes, steps=steps,
                      lr=lr, seed=seed)
  pred = np.asarray(_logits(head, jnp.asarray(vx))).argmax(-1)
  return {"accuracy": float(np.mean(pred == np.asarray(valid_data.targets)))}


@registry.register("probe", "ctc")
def ctc_probe(train: Features, valid: Features, train_data: ProbeData, valid_data: ProbeData, *,
              steps: int, lr: float, seed: int) -> dict:
  """Greedy-decoded CER / WER of a linear CTC head on standardised frame features; the letter
  vocabulary is built from the training transcripts."""
  vocab = asr.Vocabulary.build(train_data.targets)
  encoded = [vocab.encode(t) for t in train_data.targets]
  length = max(len(e) for e in encoded)
  labels = np.zeros((len(encoded), length), np.int32)
  label_padding = np.ones((len(encoded), length), bool)
  for i, e in enumerate(encoded):
    labels[i, :len(e)], label_padding[i, :len(e)] = e, False
  tx, vx = _standardize(train.x, valid.x, axes=(0, 1), mask=~train.padding)
  tx = np.where(train.padding[..., None], 0.0, tx)
  head = fit_ctc(Features(tx, train.padding), labels, label_padding, len(vocab), steps=steps,
                 lr=lr, seed=seed)
  ids = np.asarray(_logits(head, jnp.asarray(vx))).argmax(-1)
  hyps = asr.greedy_decode(ids, (~valid.padding).sum(1), vocab)
  rates = asr.error_rates(valid_data.targets, hyps)
  return {"cer": rates.cer, "wer": rates.wer}


# ---------------------------------------------------------------------------------------------
# Feature extraction and the periodic prober.


def resolve_layer(layer: int, num_layers: int) -> int:
  """Probe layer index: 0 = the Transformer's input features, i = block i's output, L (= -1)
  the encoder output (``features.resolve_layers``'s convention)."""
  j = layer + num_layers + 1 if layer < 0 else layer
  if not 0 <= j <= num_layers:
    raise ValueError(f"probe.layer={layer} out of range for a {num_layers}-layer encoder")
  return j


def encode_all(encode: Callable, params, data: ProbeData, batch_sharding=None) -> Features:
  """``encode(params, batch) -> (x [B, T, D], padding [B, T])`` over every batch; the valid rows
  concatenated and padded to the longest T. ``data.batches`` are global batches (the same on
  every process); with ``batch_sharding`` each process places its share of the rows and the
  outputs are gathered back to every process."""
  xs, pads = [], []
  pi, pc = jax.process_index(), jax.process_count()
  for batch in data.batches:
    valid = np.asarray(batch["row_valid"], bool)
    inputs = {k: v for k, v in batch.items() if not k.startswith("_") and k != "row_valid"}
    if batch_sharding is not None:
      local = len(valid) // pc
      inputs = sharding.global_batch({k: v[pi * local:(pi + 1) * local]
                                      for k, v in inputs.items()}, batch_sharding)
    x, pad = encode(params, inputs)
    if pc > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      x, pad = multihost_utils.process_allgather((x, pad), tiled=True)
    x, pad = np.asarray(x, np.float32), np.asarray(pad, bool)
    xs.append(x[valid])
    pads.append(pad[valid])
  t = max(p.shape[1] for p in pads)
  d = xs[0].shape[2]
  x_all = np.zeros((sum(len(x) for x in xs), t, d), np.float32)
  pad_all = np.ones(x_all.shape[:2], bool)
  r = 0
  for x, p in zip(xs, pads):
    x_all[r:r + len(x), :x.shape[1]] = np.where(p[..., None], 0.0, x)
    pad_all[r:r + len(x), :p.shape[1]] = p
    r += len(x)
  return Features(x_all, pad_all)


class Prober:
  """``prober(params) -> {'probe/<metric>': value}``: encode both subsets, fit, score.

  Built once per run (the labelled batches are decoded once and kept on the host); every call
  reuses the compiled encoder (one program per batch shape) and the compiled head fit.
  """

  def __init__(self, objective, probe_cfg, train_data: ProbeData, valid_data: ProbeData, *,
               batch_sharding=None, seed: int = 0):
    if train_data.kind != valid_data.kind:
      raise ValueError("probe train and valid data disagree on the probe kind")
    self.cfg = probe_cfg
    self.train_data, self.valid_data = train_data, valid_data
    self.fn = registry.get("probe", train_data.kind)
    self.batch_sharding = batch_sharding
    self.seed = seed
    layer = resolve_layer(int(probe_cfg.layer), objective.encoder_cfg.num_layers)
    modality = objective.modality

    def encode(params, batch):
      x, results, pad = objective.encode(params, modality.student_inputs(batch), train=False)
      if layer == objective.encoder_cfg.num_layers:
        out = x
      elif layer == 0:
        f = objective.model.apply({"params": params}, modality.student_inputs(batch), False,
                                  method="features")
        out = f["features"]
      else:
        out = results[layer - 1]
      return out.astype(jnp.float32), pad

    self.encode = jax.jit(encode)

  def maybe_run(self, step: int, params) -> dict[str, float] | None:
    """The scores at every ``probe.every``-th step (also printed), else None."""
    if step % int(self.cfg.every):
      return None
    t0 = time.perf_counter()
    scores = self(params)
    scores["probe/seconds"] = time.perf_counter() - t0
    print(f"probe @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return scores

  def __call__(self, params) -> dict[str, float]:
    train = encode_all(self.encode, params, self.train_data, self.batch_sharding)
    valid = encode_all(self.encode, params, self.valid_data, self.batch_sharding)
    scores = self.fn(train, valid, self.train_data, self.valid_data, steps=int(self.cfg.steps),
                     lr=float(self.cfg.lr), seed=self.seed)
    return {f"probe/{k}": float(v) for k, v in scores.items()}


def make_prober(config, objective, batch_sharding=None, batch_multiple: int = 1
                ) -> Prober | None:
  """The run's prober, or None when ``config.probe.every`` is 0 / absent.

  Raises a ValueError naming the config fields when the modality has no labelled data provider
  or the configured splits have no labels.
  """
  probe_cfg = config.get("probe")
  if probe_cfg is None or not int(probe_cfg.get("every", 0) or 0):
    return None
  provider = registry.get("probe_data", config.modality)
  train = provider(config, str(probe_cfg.train_split), int(probe_cfg.max_train), batch_multiple)
  valid = provider(config, str(probe_cfg.valid_split), int(probe_cfg.max_valid), batch_multiple)
  for name, d in (("train_split", train), ("valid_split", valid)):
    if not d.targets:
      raise ValueError(f"probe.{name}={probe_cfg[name]!r} has no labelled examples "
                       f"(modality {config.modality!r}); set probe.every=0 to disable probes")
  return Prober(objective, probe_cfg, train, valid, batch_sharding=batch_sharding,
                seed=int(config.get("seed", 0)))


def fill_batches(dummy_batch: Callable[[int], dict], items: Sequence, fill: Callable[[dict, int, Any],
                 None], rows: int) -> list[dict]:
  """``items`` cut into batches of ``rows`` (the last topped up with filler rows,
  ``row_valid`` False): each batch starts as ``dummy_batch(rows)`` (the modality's all-zero
  inputs) and ``fill(batch, row, item)`` writes one item into it."""
  out = []
  for start in range(0, len(items), rows):
    chunk = items[start:start + rows]
    batch = dummy_batch(rows)
    for r, item in enumerate(chunk):
      fill(batch, r, item)
    batch["row_valid"] = np.arange(rows) < len(chunk)
    out.append(batch)
  return out


def first(examples: Sequence, n: int, seed: int = 0) -> list:
  """A fixed pseudo-random subset of ``n`` examples (the same at every probe and on every
  process), kept in its original order."""
  if n <= 0 or n >= len(examples):
    return list(examples)
  keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
  return [examples[i] for i in keep]
