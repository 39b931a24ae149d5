"""data2vec target builder, shared by every modality and by data2vec 1.0 and 2.0.

Order (fairseq-spec §4.1 step 5, §11.9): per-layer normalisation in fp32 → average of the top K
layers → optional final normalisation. All norms are parameter-free.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

NormFn = Callable[[jax.Array, Optional[jax.Array], float], jax.Array]


def instance_norm(x: jax.Array, padding_mask: Optional[jax.Array], eps: float = 1e-5) -> jax.Array:
  """Per sample and channel, normalise over VALID time steps (biased variance, no affine).

  x ``[..., B, T, D]``; padding_mask bool ``[B, T]`` (True = pad) or None. fairseq includes padded
  frames in the statistics; its pre-training never pads, so excluding them is the paper's intent
  and keeps targets padding-invariant (docs/semantics.md).
  """
  x = x.astype(jnp.float32)
  if padding_mask is None:
    w = jnp.ones(x.shape[-3:-1] + (1,), jnp.float32)
  else:
    w = (~padding_mask).astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
  mean = jnp.sum(x * w, axis=-2, keepdims=True) / n
  var = jnp.sum(jnp.square(x - mean) * w, axis=-2, keepdims=True) / n
  return (x - mean) * jax.lax.rsqrt(var + eps)


def layer_norm(x: jax.Array, padding_mask: Optional[jax.Array], eps: float = 1e-5) -> jax.Array:
  """Per time step, normalise over channels (no affine). ``[..., D]`` → same shape, fp32."""
  del padding_mask
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _identity(x, padding_mask, eps):
  del padding_mask, eps
  return x.astype(jnp.float32)


NORMS: dict[str, NormFn] = {"none": _identity, "instance": instance_norm, "layer": layer_norm}


def build_targets(layer_results: jax.Array, padding_mask: Optional[jax.Array], *, top_k: int,
                  layer_norm_type: str = "instance", final_norm_type: str = "none",
                  eps: float = 1e-5) -> jax.Array:
  """data2vec regression targets.

  Args:
    layer_results: ``[L, B, T, D]`` teacher representations of all blocks (FFN outputs).
    padding_mask: bool ``[B, T]`` (True = pad) or None.
    top_k: K, the number of top blocks averaged.
    layer_norm_type / final_norm_type: 'instance' | 'layer' | 'none'.
    eps: epsilon of both norms.
  Returns:
    fp32 ``[B, T, D]``.
  """
  for name in (layer_norm_type, final_norm_type):
    if name not in NORMS:
      raise ValueError(f"target norm must be one of {sorted(NORMS)}, got {name!r}")
  if not 0 < top_k <= layer_results.shape[0]:
    raise ValueError(f"top_k={top_k} must be in [1, {layer_results.shape[0]}]")
  top = layer_results[-top_k:]
  y = jnp.mean(NORMS[layer_norm_type](top, padding_mask, eps), axis=0)
  return NORMS[final_norm_type](y, padding_mask, eps)
