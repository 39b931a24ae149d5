"""Timing helpers shared by the bench scripts: medians after warm-up, with device synchronisation
left to the timed function (``block_until_ready``)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def median_s(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
  """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_steps(step: Callable, state, batches: list, steps: int, warmup: int = 2):
  """Runs ``state, metrics = step(state, batch)`` over ``batches`` cyclically: ``warmup``
  untimed updates, then ``steps`` timed ones (each synchronised). Returns ``(state, last
  metrics, seconds per timed update)``."""
  m = None
  for i in range(warmup):
    state, m = step(state, batches[i % len(batches)])
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return state, m, times


def jax_matmul_peak(sizes=(1024, 2048), repeats: int = 5) -> float:
  """FLOP/s of the best jitted square fp32 matmul (n in ``sizes``) on the default device."""
  mm = jax.jit(lambda a: a @ a)
  best = 0.0
  for n in sizes:
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    best = max(best, 2.0 * n ** 3 / median_s(lambda: mm(x).block_until_ready(), repeats))
  return best
