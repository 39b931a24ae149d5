"""EMA teacher: decay schedule and update (fairseq-spec §5; pitfalls §11.13–16).

The teacher is a plain fp32 pytree holding only the EMA'd top-level subtrees of the student's
params (e.g. ``{'encoder': ...}``). Some leaves are hard-copied from the
student every step instead of averaged (``copy`` patterns, fairseq ``skip_keys``).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp


def decay_schedule(step, decay: float, end_decay: float, anneal_steps: int):
  """Linear anneal from ``decay`` (τ0) to ``end_decay`` (τe) over ``anneal_steps`` updates, then τe.

  ``step`` = number of completed optimizer updates (int or int array). τ(0) = τ0, τ(n ≥ anneal) = τe.
  """
  if decay == end_decay or anneal_steps <= 0:
    return jnp.asarray(end_decay, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return (end_decay - (end_decay - decay) * (1.0 - frac)).astype(jnp.float32)


def path_str(path) -> str:
  """'encoder/layers/fc1/kernel' for a jax tree path."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def select(params: dict, scope: Sequence[str]) -> dict:
  """The EMA'd part of the student: ``{k: params[k] for k in scope}`` (top-level keys)."""
  missing = [k for k in scope if k not in params]
  if missing:
    raise KeyError(f"ema.scope names {missing}, params have {sorted(params)}")
  return {k: params[k] for k in scope}


def copy_mask(teacher, patterns: Sequence[str]):
  """Bool pytree (Python bools, static): leaves whose path fully matches one of ``patterns``."""
  regs = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(r.fullmatch(path_str(p)) for r in regs), teacher)


def init_teacher(params: dict, scope: Sequence[str]) -> dict:
  """A fresh fp32 copy (new buffers, so state donation never aliases the student)."""
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), select(params, scope))


def update(teacher: dict, params: dict, decay, copy) -> dict:
  """One EMA step: ``θT ← τ θT + (1 − τ) θS`` in fp32, hard copy where ``copy`` is True.

  When ``τ >= 1`` the teacher is frozen and nothing changes, not even copied leaves (fairseq skips
  the EMA step then).
  """
  student = select(params, list(teacher))
  frozen = decay >= 1.0

  def one(t, s, c):
    s = s.astype(jnp.float32)
    new = s if c else decay * t + (1.0 - decay) * s
    return jnp.where(frozen, t, new)

  return jax.tree.map(one, teacher, student, copy)
