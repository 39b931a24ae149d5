"""wav2vec 2.0 Gumbel product quantizer (wav2vec 2.0 §3.1; fairseq-spec §3.2).

G groups × V entries, entry size ``vq_dim / G``; logits from one Linear(in → G·V) with N(0, 1)
weights; hard straight-through Gumbel-softmax in fp32 while training, argmax at evaluation.
Perplexities are computed over the selected (masked) positions only, so static shapes can carry
every frame while the statistics match fairseq's gather of masked frames.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax.models import layers


def temperature(step, max_temp: float = 2.0, min_temp: float = 0.5, decay: float = 0.999995):
  """Gumbel temperature after ``step`` updates: ``max(max_temp · decay^step, min_temp)`` (§3.2)."""
  # decay^step as exp(step·ln decay) with ln taken in float64: 0.999995 rounded to fp32 would be
  # off by 7e-4 relative after 100k steps.
  log_decay = math.log(decay)
  return jnp.maximum(max_temp * jnp.exp(jnp.asarray(step, jnp.float32) * log_decay), min_temp)


def _perplexity(p: jax.Array) -> jax.Array:
  """Sum over groups of ``exp(entropy)`` of ``p [G, V]`` (fairseq's 1e-7 inside the log)."""
  return jnp.sum(jnp.exp(-jnp.sum(p * jnp.log(p + 1e-7), axis=-1)))


class GumbelQuantizer(nn.Module):
  """Call: x ``[B, T, C]`` (layer-normed CNN features), weights ``[B, T]`` (positions whose
  statistics count), temperature, train → dict:

  ``q`` ``[B, T, vq_dim]`` quantized vectors; ``codes`` int32 ``[B, T, G]`` selected entries;
  ``prob_ppl`` (softmax without noise, averaged over weighted positions), ``code_ppl`` (hard
  selections), both summed over groups.
  """
  groups: int = 2
  num_vars: int = 320
  vq_dim: int = 256

  @nn.compact
  def __call__(self, x, weights, temp, train: bool):
    g, v = self.groups, self.num_vars
    if self.vq_dim % g:
      raise ValueError(f"vq_dim {self.vq_dim} must be divisible by groups {g}")
    codebook = self.param("vars", layers.uniform01, (g * v, self.vq_dim // g), jnp.float32)
    logits = nn.Dense(g * v, kernel_init=nn.initializers.normal(1.0),
                      bias_init=nn.initializers.zeros, dtype=jnp.float32,
                      name="weight_proj")(x.astype(jnp.float32))
    logits = logits.reshape(x.shape[:-1] + (g, v))
    w = weights.astype(jnp.float32)[..., None, None]
    n = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)
    avg_probs = jnp.sum(jax.nn.softmax(logits, axis=-1) * w, axis=(0, 1)) / n
    if train:
      noisy = logits + jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
      soft = jax.nn.softmax(noisy / temp, axis=-1)
      codes = jnp.argmax(soft, axis=-1)
      hard = jax.nn.one_hot(codes, v, dtype=jnp.float32)
      # Straight-through: the forward pass is the hard one-hot, the gradient the soft sample's.
      sel = hard + soft - jax.lax.stop_gradient(soft)
    else:
      codes = jnp.argmax(logits, axis=-1)
      hard = sel = jax.nn.one_hot(codes, v, dtype=jnp.float32)
    avg_hard = jnp.sum(hard * w, axis=(0, 1)) / n
    q = jnp.einsum("btgv,gvd->btgd", sel, codebook.reshape(g, v, -1))
    return {"q": q.reshape(x.shape[:-1] + (self.vq_dim,)), "codes": codes.astype(jnp.int32),
            "prob_ppl": _perplexity(avg_probs), "code_ppl": _perplexity(avg_hard)}
