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


def make_train_step(objective, tx: optax.GradientTransformation, lr_fn: Callable, ema_cfg,
                    seed: int) -> Callable[[dict, dict], tuple[dict, dict]]:
  """``(state, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

  Order inside one update (fairseq-spec §5.3): teacher forward with the current teacher → student
  loss and grads → optimizer update → EMA step with τ(n), n = updates completed after this one.
  Non-finite gradients skip the update (params, optimizer and teacher unchanged) and are counted.
  """

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"], state["teacher"], batch, rng,
                                     step=state["step"])
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
