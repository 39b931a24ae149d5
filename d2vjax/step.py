"""The train state and the one jitted step shared by every objective.

State: a plain dict ``{params, teacher, opt_state, step, skipped}`` (jax-style §3): params and
teacher fp32 pytrees, optax state, int32 step (= updates attempted), int32 count of updates skipped
for non-finite gradients. RNG is ``fold_in(key(seed), step)``, so nothing random is stored.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from d2vjax import ema


def init_state(objective, tx: optax.GradientTransformation, rng: jax.Array, batch: dict) -> dict:
  """Fresh train state (call under ``jax.jit`` with ``out_shardings`` so it is born on device)."""
  params = objective.init(rng, batch)
  return {"params": params, "teacher": objective.init_teacher(params),
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def _split_micro(x, k: int):
  """``[B, ...]`` → ``[k, B/k, ...]`` taking rows ``j, j+k, …`` for micro-batch ``j``, so every
  device's contiguous block of rows feeds every micro-batch (no resharding)."""
  if x.shape[0] % k:
    raise ValueError(f"batch of {x.shape[0]} rows is not divisible by accum_steps={k}")
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def accumulated_grads(objective, params, teacher, batch, rng, step, accum_steps: int):
  """Loss, metrics and gradients of the GLOBAL objective (Σ per-position losses / Σ positions)
  over ``accum_steps`` micro-batches scanned inside the jitted step.

  Each micro-batch contributes its summed loss and its position count (the objective's
  ``masked_count`` metric); the sums are divided once at the end, so k micro-batches of b rows give
  the same loss and gradients as one batch of k·b rows (fairseq-spec §7.3, user-needs J1).
  """
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(params, teacher, batch, rng, step=step)
    return loss, metrics, grads

  def summed(p, mb, r):
    loss, m = objective.loss(p, teacher, mb, r, step=step)
    count = jax.lax.stop_gradient(jnp.maximum(m["masked_count"], 1.0))
    return loss * count, m

  micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)

  def body(carry, xs):
    g_acc, s_acc, n_acc, m_acc = carry
    mb, i = xs
    (s, m), g = jax.value_and_grad(summed, has_aux=True)(params, mb, jax.random.fold_in(rng, i))
    add = lambda a, b: a + b
    return (jax.tree.map(add, g_acc, g), s_acc + s, n_acc + m["masked_count"],
            jax.tree.map(add, m_acc, m)), None

  shapes = jax.eval_shape(lambda: summed(params, jax.tree.map(lambda x: x[0], micro), rng)[1])
  zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  zeros_g = jax.tree.map(jnp.zeros_like, params)
  init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_m)
  (g, s, n, m), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
  n = jnp.maximum(n, 1.0)
  metrics = jax.tree.map(lambda v: v / accum_steps, m)
  metrics.update(loss=s / n, masked_count=m["masked_count"])
  return s / n, metrics, jax.tree.map(lambda x: x / n, g)


def make_train_step(objective, tx: optax.GradientTransformation, lr_fn: Callable, ema_cfg,
                    seed: int, accum_steps: int = 1) -> Callable[[dict, dict], tuple[dict, dict]]:
  """``(state, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

  Order inside one update (fairseq-spec §5.3): teacher forward with the current teacher → student
  loss and grads (over ``accum_steps`` micro-batches) → optimizer update → ONE EMA step with τ(n),
  n = updates completed after this one. Non-finite gradients skip the update (params, optimizer
  and teacher unchanged) and are counted.
  """

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss, metrics, grads = accumulated_grads(objective, state["params"], state["teacher"], batch,
                                             rng, state["step"], accum_steps)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    n = state["step"] + 1
    decay = ema.decay_schedule(n, ema_cfg.decay, ema_cfg.end_decay, ema_cfg.anneal_steps)
    copy = ema.copy_mask(state["teacher"], objective.ema_copy)
    teacher = ema.update(state["teacher"], params, decay, copy)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {"params": keep(params, state["params"]),
                 "teacher": keep(teacher, state["teacher"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "step": n,
                 "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_fn(state["step"]), ema_decay=decay,
                   nonfinite=(~finite).astype(jnp.float32))
    return new_state, metrics

  return step
