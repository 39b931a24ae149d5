"""Pooling + classification heads for fine-tuning (registry kind ``cls_head``).

Call: ``x [B, T, D]`` (the encoder's output), ``padding_mask`` bool ``[B, T]`` (True = pad),
``train`` → fp32 ``[B, num_outputs]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from d2vjax import registry
from d2vjax.models import layers


@registry.register("cls_head", "mean_pool")
class MeanPoolHead(nn.Module):
  """data2vec 2.0 / MAE image classification (fairseq-spec §9.2): mean over the valid tokens
  (the first, CLS, left out when ``skip_first``) → ``fc_norm`` LayerNorm(eps) → Linear(D → C)
  with truncated-normal(0.02) weight and zero bias."""
  num_outputs: int
  skip_first: bool = True
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, padding_mask, train: bool = False):
    del train
    keep = ~jnp.asarray(padding_mask)
    if self.skip_first:
      keep = keep.at[:, 0].set(False)
    w = keep.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    y = layers.LayerNorm(self.norm_eps, name="fc_norm")(pooled)
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.truncated_normal(0.02),
                    bias_init=nn.initializers.zeros, dtype=jnp.float32, name="out")(y)


@registry.register("cls_head", "first_token")
class FirstTokenHead(nn.Module):
  """RoBERTa's classification head on the first (``<s>``) token (fairseq-spec §9.3): dropout →
  Linear(D, D) → tanh → dropout → Linear(D, C); BERT init N(0, 0.02), zero biases."""
  num_outputs: int
  dropout: float = 0.0  # pooler_dropout

  @nn.compact
  def __call__(self, x, padding_mask, train: bool = False):
    del padding_mask
    dim = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y = drop(x[:, 0].astype(jnp.float32))
    y = jnp.tanh(nn.Dense(dim, kernel_init=layers.bert_init, dtype=jnp.float32, name="dense")(y))
    return nn.Dense(self.num_outputs, kernel_init=layers.bert_init, dtype=jnp.float32,
                    name="out_proj")(drop(y))
