"""Optimiser and learning-rate schedules (fairseq-spec §7).

Adam is fairseq's AdamW form: decoupled weight decay, eps added to sqrt(v) (optax.adamw, eps_root 0).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax.ema import path_str


def tri_stage(peak: float, total_steps: int, phase_ratio=(0.03, 0.9, 0.07), init_lr_scale=0.01,
              final_lr_scale=0.01, decay_shape: str = "linear") -> Callable:
  """Tri-stage: linear warm-up from ``init_lr_scale·peak``, hold at ``peak``, decay to
  ``final_lr_scale·peak``, constant afterwards.

  ``decay_shape='linear'`` is what the data2vec and wav2vec 2.0 papers describe; ``'exponential'``
  is what fairseq's tri_stage scheduler does (spec §7.2, pitfall §11.32). Stage lengths are
  ``int(ratio · total_steps)``; the schedule is a function of completed updates.
  """
  if decay_shape not in ("linear", "exponential"):
    raise ValueError(f"tri_stage decay_shape must be linear|exponential, got {decay_shape!r}")
  warm, hold, decay = (int(r * total_steps) for r in phase_ratio)
  init, final = init_lr_scale * peak, final_lr_scale * peak
  decay_rate = -math.log(final_lr_scale) / max(decay, 1)

  def fn(n):
    n = jnp.asarray(n, jnp.float32)
    lr_warm = init + (peak - init) * n / max(warm, 1)
    k = n - warm - hold
    kc = jnp.clip(k, 0, decay)
    if decay_shape == "exponential":
      lr_decay = peak * jnp.exp(-decay_rate * kc)
    else:
      lr_decay = peak + (final - peak) * kc / max(decay, 1)
    lr = jnp.where(n < warm, lr_warm, jnp.where(k < 0, peak, lr_decay))
    return jnp.where(k >= decay, final, lr)

  return fn


def cosine(peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
           warmup_init_lr: float = 0.0) -> Callable:
  """fairseq cosine: linear warm-up to ``peak``, then half a cosine period down to ``min_lr``
  (config ``optim.min_lr``, default 0; BEiT's scheduler ends at 1e-5)."""

  def fn(n):
    n = jnp.asarray(n, jnp.float32)
    warm = warmup_init_lr + (peak - warmup_init_lr) * n / max(warmup_steps, 1)
    t = jnp.clip((n - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cos = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(jnp.pi * t))
    return jnp.where(n < warmup_steps, warm, cos)

  return fn


def polynomial(peak: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0,
               power: float = 1.0) -> Callable:
  """fairseq polynomial_decay (wav2vec 2.0 pre-training): linear warm-up from 0, then decay."""

  def fn(n):
    n = jnp.asarray(n, jnp.float32)
    warm = peak * n / max(warmup_steps, 1)
    t = jnp.clip((n - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    return jnp.where(n < warmup_steps, warm, (peak - end_lr) * (1 - t) ** power + end_lr)

  return fn


def make_schedule(cfg, total_steps: int, warmup_steps: int) -> Callable:
  """Schedule from ``cfg.schedule`` ∈ {tri_stage, cosine, polynomial, constant}."""
  builders = {
      "tri_stage": lambda: tri_stage(cfg.peak_lr, total_steps, tuple(cfg.phase_ratio),
                                     cfg.init_lr_scale, cfg.final_lr_scale, cfg.decay_shape),
      "cosine": lambda: cosine(cfg.peak_lr, total_steps, warmup_steps,
                               min_lr=float(cfg.get("min_lr", 0.0) or 0.0)),
      "polynomial": lambda: polynomial(cfg.peak_lr, total_steps, warmup_steps),
      "constant": lambda: (lambda n: jnp.full((), cfg.peak_lr, jnp.float32)),
  }
  if cfg.schedule not in builders:
    raise ValueError(f"optim.schedule must be one of {sorted(builders)}, got {cfg.schedule!r}")
  return builders[cfg.schedule]()


def _labels(params, frozen: Sequence[str]):
  regs = [re.compile(p) for p in frozen]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if any(r.fullmatch(path_str(p)) for r in regs) else "train", params)


def layer_decay_scale(path: str, shape: tuple, decay: float, num_blocks: int,
                      blocks: str = "encoder/layers") -> np.ndarray | float:
  """Layer-wise learning-rate scale of one parameter (fairseq-spec §9.2, BEiT/MAE fine-tuning).

  With ``n = num_blocks + 1``, block ``i`` (1-based) gets ``decay ** (n - i)``, so the last block
  has ``decay`` and the first ``decay ** num_blocks``; every other parameter (embeddings, CLS,
  norms outside the blocks, heads) keeps 1, as the data2vec-multi branch of fairseq's
  ``mae_image_classification`` does. Blocks are the subtrees ``{blocks}_<k>`` (unrolled, k from
  0) or ``{blocks}`` scanned with the block index on axis 0; for the latter the scale is an array
  broadcasting against the leaf (``[L, 1, …]``).
  """
  n = num_blocks + 1
  m = re.fullmatch(re.escape(blocks) + r"_(\d+)/.*", path)
  if m:
    return float(decay ** (n - (int(m.group(1)) + 1)))
  if path.startswith(blocks + "/"):
    i = np.arange(1, shape[0] + 1, dtype=np.float64)
    return (decay ** (n - i)).astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
  return 1.0


def count_blocks(params, blocks: str = "encoder/layers") -> int:
  """Blocks of a param tree: ``{blocks}_<k>`` subtrees, or the leading axis of a scanned
  ``{blocks}`` subtree (0 when there are none)."""
  found, stacked = set(), 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    s = path_str(path)
    m = re.fullmatch(re.escape(blocks) + r"_(\d+)/.*", s)
    if m:
      found.add(int(m.group(1)))
    elif s.startswith(blocks + "/"):
      stacked = int(np.shape(leaf)[0])
  return max(len(found), stacked)


def scale_by_layer_decay(decay: float, num_blocks: int, blocks: str = "encoder/layers"
                         ) -> optax.GradientTransformation:
  """Multiplies each update by ``layer_decay_scale``. Placed after AdamW it scales the learning
  rate of both the Adam step and the decoupled weight decay, as a per-group ``lr_scale`` does in
  fairseq's composite optimizer and timm (spec §7.1)."""

  def update(updates, state, params=None):
    del params
    out = jax.tree_util.tree_map_with_path(
        lambda p, u: u * jnp.asarray(layer_decay_scale(path_str(p), u.shape, decay, num_blocks,
                                                       blocks), u.dtype), updates)
    return out, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, lr_fn: Callable, params, frozen: Sequence[str] = ()):
  """optax chain: global-norm clipping (``clip_norm`` > 0) → AdamW(b1, b2, eps, weight_decay).

  Leaves whose path matches a ``frozen`` regex get no update and no weight decay (fairseq skips
  parameters without gradients, e.g. the CNN when ``feature_grad_mult`` is 0). Leaves whose path
  matches a ``cfg.no_decay`` regex (optional; fairseq decays everything, BEiT exempts biases,
  norms, layer-scale gains, extra learned tokens) get the Adam update without weight decay.
  ``cfg.layer_decay`` (optional, 1 = off) scales the learning rate per Transformer block
  (``scale_by_layer_decay``).
  """
  chain = []
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  no_decay = [re.compile(p) for p in (cfg.get("no_decay", ()) or ())]
  # A callable, so it sees the same (possibly frozen-masked) tree the inner transform gets.
  decay_mask = None if not no_decay else (lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: not any(r.fullmatch(path_str(path)) for r in no_decay), p))
  chain.append(optax.adamw(lr_fn, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  decay = float(cfg.get("layer_decay", 1.0) or 1.0)
  if decay != 1.0:
    chain.append(scale_by_layer_decay(decay, count_blocks(params)))
  tx = optax.chain(*chain)
  if frozen:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               _labels(params, frozen))
  return tx
