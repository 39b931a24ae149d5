"""Text frontend of data2vec 1.0 (RoBERTa layout): token + learned position embeddings →
embedding LayerNorm, fairseq-spec §4.2 (fairseq TransformerEncoder.forward_embedding).

Parameter names follow fairseq's (``embed_tokens``, ``embed_positions``, ``layernorm_embedding``,
spec §12.1) so weights convert one to one: fairseq embedding ``weight`` = Flax ``embedding``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax.models import layers

# RoBERTa / data2vec text: 512 positions (data2vec §4.3 "up to 512 tokens"), fairseq's <pad> = 1.
MAX_POSITIONS = 512
PADDING_IDX = 1
TEACHER_VIEWS = ("full", "fairseq_bug4881")


def bert_embedding_init(padding_idx: int):
  """BERT init for an embedding table (spec §1.8): N(0, 0.02), the padding row zeroed."""

  def init(key, shape, dtype=jnp.float32):
    w = layers.bert_init(key, shape, dtype)
    return w.at[padding_idx].set(0)

  return init


def make_positions(padding_mask: jax.Array, padding_idx: int = PADDING_IDX) -> jax.Array:
  """fairseq ``utils.make_positions``: the k-th non-pad position of a row gets
  ``padding_idx + k`` (k from 1), pads get ``padding_idx``.

  padding_mask bool ``[B, T]`` (True = pad) → int32 ``[B, T]``. For right-padded rows this is
  ``padding_idx + 1 + t``; rows with pads inside (the fairseq_bug4881 teacher view) count only
  the non-pad positions, as fairseq does.
  """
  keep = (~padding_mask).astype(jnp.int32)
  return jnp.cumsum(keep, axis=1) * keep + padding_idx


class TextEmbedding(nn.Module):
  """``{'tokens': int32 [B, T], 'padding_mask': bool [B, T]}`` → ``{'features': [B, T, D],
  'padding_mask': [B, T]}``.

  ``x = LN(embed_tokens(tokens) + embed_positions(make_positions(pad)))`` (no √D scaling:
  ``no_scale_embedding``), padded positions zeroed. fairseq applies dropout 0.1 right after the
  LayerNorm; here that dropout is the shared encoder's input dropout (``EncoderConfig.dropout``,
  applied once before the first layer, which follows with ``input_layer_norm=False``), so the
  frontend has none: applying it here as well would drop twice.

  Attributes:
    dim: D. vocab_size: rows of the token table (``<mask>`` included).
    max_positions: longest sequence; the position table has ``max_positions + padding_idx + 1``
      rows (514 for 512 tokens, spec §4.2).
    padding_idx: id of ``<pad>`` (1); its rows in both tables start at zero.
    teacher_view: 'full' (the paper: the teacher embeds the whole original sequence) or
      'fairseq_bug4881': when the inputs also carry ``teacher_mask`` (the teacher's inputs do),
      every position outside it becomes ``<pad>`` and is excluded from attention, as fairseq's
      teacher sees its MLM target tokens (spec §4.2, issue #4881).
    norm_eps: LayerNorm epsilon (1e-5).
  """
  dim: int
  vocab_size: int
  max_positions: int = MAX_POSITIONS
  padding_idx: int = PADDING_IDX
  teacher_view: str = "full"
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict, train: bool = False) -> dict:
    del train  # no dropout here (see the class docstring)
    if self.teacher_view not in TEACHER_VIEWS:
      raise ValueError(f"model.teacher_input must be one of {TEACHER_VIEWS}, "
                       f"got {self.teacher_view!r}")
    tokens = inputs["tokens"]
    pad = inputs["padding_mask"]
    if tokens.shape[1] > self.max_positions:
      raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_positions="
                       f"{self.max_positions}")
    if self.teacher_view == "fairseq_bug4881" and "teacher_mask" in inputs:
      pad = pad | ~inputs["teacher_mask"]
      tokens = jnp.where(pad, self.padding_idx, tokens)
    embed_tokens = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype,
                            embedding_init=bert_embedding_init(self.padding_idx),
                            name="embed_tokens")
    # fairseq inits the table N(0, D^-0.5) and init_bert_params then overwrites it (spec §1.8).
    embed_positions = nn.Embed(self.max_positions + self.padding_idx + 1, self.dim,
                               dtype=self.dtype,
                               embedding_init=bert_embedding_init(self.padding_idx),
                               name="embed_positions")
    x = embed_tokens(tokens) + embed_positions(make_positions(pad, self.padding_idx))
    x = layers.LayerNorm(self.norm_eps, name="layernorm_embedding")(x)
    x = jnp.where(pad[..., None], 0, x).astype(self.dtype)
    return {"features": x, "padding_mask": pad}
