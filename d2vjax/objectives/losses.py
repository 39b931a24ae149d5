"""Regression losses and representation statistics, in fp32, over a fixed-shape position mask."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def regression_loss(pred: jax.Array, target: jax.Array, weights: jax.Array, *, beta: float = 0.0,
                    scale: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
  """Summed data2vec regression loss over selected positions (fairseq-spec §4.1 step 7, §11.17).

  Per position: ``sum_c (pred - target)^2`` when ``beta == 0``, else smooth-L1 with ``beta``
  (``0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta``) summed over channels; times
  ``scale`` (None → ``1/sqrt(D)``).

  Args:
    pred, target: ``[..., D]``.
    weights: ``[...]`` bool/float, 1 at the positions that enter the loss (masked frames).
  Returns:
    ``(loss_sum, count)``: fp32 scalars; the objective is ``loss_sum / count`` over the global batch.
  """
  d = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if beta == 0:
    per = jnp.square(d)
  else:
    ad = jnp.abs(d)
    per = jnp.where(ad < beta, 0.5 * jnp.square(d) / beta, ad - 0.5 * beta)
  scale = pred.shape[-1] ** -0.5 if scale is None else scale
  w = weights.astype(jnp.float32)
  return scale * jnp.sum(jnp.sum(per, axis=-1) * w), jnp.sum(w)


def masked_std(x: jax.Array, weights: jax.Array) -> jax.Array:
  """fairseq ``compute_var``: mean over channels of ``sqrt(unbiased var over positions + 1e-6)``.

  x ``[..., D]``; weights ``[...]`` selects the positions (masked frames).
  """
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  w = weights.astype(jnp.float32).reshape(-1, 1)
  n = jnp.sum(w)
  mean = jnp.sum(x * w, axis=0) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(x - mean) * w, axis=0) / jnp.maximum(n - 1.0, 1.0)
  return jnp.mean(jnp.sqrt(var + 1e-6))
