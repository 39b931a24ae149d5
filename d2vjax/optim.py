"""Optimiser and learning-rate schedules (fairseq-spec §7).

Adam is fairseq's AdamW form: decoupled weight decay, eps added to sqrt(v) (optax.adamw, eps_root 0).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
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


def make_optimizer(cfg, lr_fn: Callable, params, frozen: Sequence[str] = ()):
  """optax chain: global-norm clipping (``clip_norm`` > 0) → AdamW(b1, b2, eps, weight_decay).

  Leaves whose path matches a ``frozen`` regex get no update and no weight decay (fairseq skips
  parameters without gradients, e.g. the CNN when ``feature_grad_mult`` is 0). Leaves whose path
  matches a ``cfg.no_decay`` regex (optional; fairseq decays everything, BEiT exempts biases,
  norms, layer-scale gains, extra learned tokens) get the Adam update without weight decay.
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
  tx = optax.chain(*chain)
  if frozen:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               _labels(params, frozen))
  return tx
