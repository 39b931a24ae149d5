"""data2vec 2.0 building blocks (fairseq-spec §1.6, §1.7, §2.6, §6.2–6.5): removal of masked
tokens by a stable-argsort gather and its inverse, ALiBi with a learned per-head scale, fixed 2-D
sin-cos positions, the context encoder (relative positions on the zero-masked sequence, extra
tokens, LayerNorm, prenet blocks) and the convolutional decoders.

Shapes: N rows (B samples for the teacher, B·M clones for the student), T positions of the full
sequence, K kept positions, E extra (CLS) tokens, D model width, H heads.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import registry
from d2vjax.models import layers, transformer

# ----------------------------------------------------------------------------- gather / restore


def mask_order(mask: jax.Array, num_keep: int) -> tuple[jax.Array, jax.Array]:
  """Kept and restore indices of a mask (fairseq ``make_maskinfo``, spec §2.6).

  A STABLE argsort of the mask puts the kept positions first in their original order (torch's
  unstable sort gives another order of the same set; position information is injected before the
  gather, so only determinism differs).

  Args:
    mask: bool ``[N, T]``, True = masked; every row must keep exactly ``num_keep`` positions.
    num_keep: K (static).
  Returns:
    ``(keep_ids int32 [N, K], restore_ids int32 [N, T])``: ``keep_ids`` the kept positions
    ascending; ``restore_ids[n, t]`` is the index of position t in ``[kept ; masked]`` order.
  """
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  restore = jnp.argsort(order, axis=1, stable=True)
  return order[:, :num_keep].astype(jnp.int32), restore.astype(jnp.int32)


def gather_rows(x: jax.Array, ids: jax.Array) -> jax.Array:
  """``x[n, ids[n, k]]``: x ``[N, T, ...]``, ids int ``[N, K]`` → ``[N, K, ...]``."""
  idx = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def restore_rows(kept: jax.Array, fill: jax.Array, restore_ids: jax.Array) -> jax.Array:
  """Inverse of the gather: ``[kept ; fill]`` un-shuffled to the original order.

  kept ``[N, K, D]``, fill ``[N, T-K, D]`` (the masked positions' tokens), restore_ids from
  ``mask_order`` → ``[N, T, D]`` with kept tokens back at their positions and ``fill`` at the
  masked ones (in ascending position order).
  """
  return gather_rows(jnp.concatenate([kept, fill.astype(kept.dtype)], axis=1), restore_ids)


# ----------------------------------------------------------------------------- positions


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes (spec §1.7): ``2^(-8(h+1)/n)`` for n a power of two; otherwise the slopes
  of the largest power of two below n followed by every other slope of twice that power
  (12 heads: 2^-1 … 2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5). float64 ``[H]``."""

  def pow2(n):
    return np.asarray([2.0 ** (-8.0 * (h + 1) / n) for h in range(n)])

  if num_heads & (num_heads - 1) == 0:
    return pow2(num_heads)
  closest = 2 ** int(math.floor(math.log2(num_heads)))
  return np.concatenate([pow2(closest), alibi_slopes(2 * closest)[0::2][:num_heads - closest]])


def alibi_bias(positions: jax.Array, slopes: jax.Array) -> jax.Array:
  """Symmetric ALiBi bias ``-slope_h · |p_i - p_j|`` between ORIGINAL positions.

  Equal to building fairseq's full ``[T, T]`` bias and gathering rows and columns at the kept
  indices (spec §1.7), without materialising the full matrix. positions int ``[N, K]``, slopes
  ``[H]`` (already scaled) → fp32 ``[N, H, K, K]``.
  """
  p = positions.astype(jnp.float32)
  dist = jnp.abs(p[:, :, None] - p[:, None, :])
  return -slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]


def sincos_2d(side: int, dim: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos positions for a ``side × side`` grid, row-major (spec §6.2).

  The first D/2 channels encode the column (x) index, the last D/2 the row index; within each
  half D/4 sines then D/4 cosines of ``pos · 10000^(-k/(D/4))``. float32 ``[side², D]``.
  """
  if dim % 4:
    raise ValueError(f"sin-cos positions need dim divisible by 4, got {dim}")
  q = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
  rows, cols = np.divmod(np.arange(side * side), side)

  def one(pos):
    out = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one(cols.astype(np.float64)), one(rows.astype(np.float64))],
                        axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- context encoder


class ContextEncoder(nn.Module):
  """The modality "context encoder" before the shared trunk (fairseq-spec §6.1–6.4, §1.6).

  ``x`` (local features) → [+ relative positional conv of the zero-masked full sequence] →
  gather kept positions → [prepend E extra tokens] → [LayerNorm] → Dropout → prenet blocks.
  ALiBi (if on) uses one learned non-negative scale per head, shared by every prenet and trunk
  block, and the distances of the ORIGINAL positions.

  Attributes:
    dim, num_heads: D, H.
    rel_pos: registry ``pos_encoder`` name or 'none' (audio: 'conv_stack', residual added here).
    pos_width, pos_groups, pos_depth: its hyper-parameters.
    alibi: add the ALiBi bias (returned for the trunk); alibi_scale: its scale's init (1.0).
    extra_tokens: E learned tokens prepended after masking (image CLS: 1; init N(0, 1)).
    norm: LayerNorm (affine) after the gather; norm_eps its epsilon.
    prenet_dropout: dropout after the norm.
    prenet: ``EncoderConfig`` of the prenet blocks (``num_layers`` 0 = none).
  """
  dim: int
  num_heads: int
  prenet: transformer.EncoderConfig
  rel_pos: str = "none"
  pos_width: int = 95
  pos_groups: int = 16
  pos_depth: int = 5
  alibi: bool = False
  alibi_scale: float = 1.0
  extra_tokens: int = 0
  norm: bool = True
  norm_eps: float = 1e-5
  prenet_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, mask=None, keep_ids=None, train: bool = False):
    """Args:
      x: ``[N, T, D]`` local features (fixed positions already added).
      padding_mask: bool ``[N, T]`` (True = pad).
      mask: bool ``[N, T]`` (True = masked) or None (teacher: nothing removed).
      keep_ids: int ``[N, K]`` kept positions (``mask_order``) or None.
    Returns:
      ``(x [N, E+K, D], padding [N, E+K], bias fp32 [N, H, E+K, E+K] or None)``.
    """
    x = x.astype(self.dtype)
    if self.rel_pos != "none":
      pos_cls = registry.get("pos_encoder", self.rel_pos)
      xz = x if mask is None else jnp.where(mask[..., None], 0, x)
      xz = jnp.where(padding_mask[..., None], 0, xz)
      # Masked frames are zeroed so the conv cannot leak their content (spec §2.6).
      x = x + pos_cls(self.dim, self.pos_width, self.pos_groups, self.pos_depth,
                      name="rel_pos")(xz, padding_mask)
    if keep_ids is None:
      keep_ids = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    else:
      x, padding_mask = gather_rows(x, keep_ids), gather_rows(padding_mask, keep_ids)
    bias = None
    if self.alibi:
      scale = self.param("alibi_scale", nn.initializers.constant(self.alibi_scale),
                         (self.num_heads,), jnp.float32)
      slopes = jnp.asarray(alibi_slopes(self.num_heads), jnp.float32) * jnp.maximum(scale, 0.0)
      bias = alibi_bias(keep_ids, slopes)
    e = self.extra_tokens
    if e:
      tok = self.param("extra_tokens", nn.initializers.normal(1.0), (e, self.dim), jnp.float32)
      n = x.shape[0]
      x = jnp.concatenate([jnp.broadcast_to(tok.astype(x.dtype), (n, e, self.dim)), x], axis=1)
      padding_mask = jnp.concatenate([jnp.zeros((n, e), bool), padding_mask], axis=1)
      if bias is not None:  # extra tokens get no positional bias (fairseq pads the bias with 0)
        bias = jnp.pad(bias, ((0, 0), (0, 0), (e, 0), (e, 0)))
    if self.norm:
      x = layers.LayerNorm(self.norm_eps, name="norm")(x)
    x = nn.Dropout(self.prenet_dropout)(x, deterministic=not train)
    if self.prenet.num_layers > 0:
      x, _ = transformer.TransformerEncoder(self.prenet, name="prenet")(x, padding_mask, train,
                                                                        bias)
    return x, padding_mask, bias


# ----------------------------------------------------------------------------- decoders


def _projection(x, dim: int, layers_: int, dtype):
  """Decoder projection with PyTorch-default inits (spec §1.8): one Linear(C → D), or with two
  layers Linear(C → 2C) → GELU → Linear(2C → D)."""
  dense = lambda f, name, fan: nn.Dense(f, kernel_init=layers.torch_default_kernel,
                                        bias_init=layers.torch_default_bias(fan), dtype=dtype,
                                        name=name)
  c = x.shape[-1]
  if layers_ == 2:
    x = layers.gelu(dense(2 * c, "proj_0", c)(x))
    return dense(dim, "proj_1", 2 * c)(x)
  if layers_ != 1:
    raise ValueError(f"decoder.projection_layers must be 1 or 2, got {layers_}")
  return dense(dim, "proj", c)(x)


def grouped_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, groups: int) -> jax.Array:
  """'Same' grouped convolution, channels last: zero padding k//2 on both sides of every spatial
  axis and the first ``size`` outputs kept (SamePad for even k), i.e. PyTorch's ConvNd with
  ``padding=k//2`` and ``groups``.

  1-D: ``lax.conv_general_dilated`` with ``feature_group_count``. 2-D: ONE batched matmul over
  the k² shifted views (group as batch axis), because XLA:CPU compiles and runs grouped 2-D
  convolutions and their kernel gradients pathologically slowly (a 4-layer 192-ch, 16-group
  decoder on 64 × 8 × 8 did not finish one training step in 5 minutes on 2 shared cores; the
  matmul form took 7 s; for 1-D the library conv is 1.4× faster than the matmul form).

  Args:
    x: ``[N, *S, C]``; kernel: ``[k, ..., C/g, O]`` (Flax conv layout); bias: ``[O]``.
  Returns:
    ``[N, *S, O]``.
  """
  spatial = kernel.ndim - 2
  k = kernel.shape[0]
  sizes = x.shape[1:1 + spatial]
  c, o = x.shape[-1], kernel.shape[-1]
  if spatial == 1:
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(1,), padding=[(k // 2, k // 2)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
    return y[:, :sizes[0]] + bias.astype(y.dtype)
  xp = jnp.pad(x, [(0, 0)] + [(k // 2, k // 2)] * spatial + [(0, 0)])
  taps = [xp[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(off, sizes))]
          for off in itertools.product(range(k), repeat=spatial)]
  patches = jnp.stack(taps, axis=-2).reshape(x.shape[:-1] + (k ** spatial, groups, c // groups))
  w = kernel.astype(x.dtype).reshape(k ** spatial, c // groups, groups, o // groups)
  y = jnp.einsum("...kgc,kcgo->...go", patches, w).reshape(x.shape[:-1] + (o,))
  return y + bias.astype(y.dtype)


class _GroupedConv(nn.Module):
  """Params ``kernel`` ``[k, ..., C/g, O]`` and ``bias`` ``[O]`` (Flax ``nn.Conv``'s names and
  layout) with PyTorch's default conv init; applies ``grouped_conv``."""
  features: int
  kernel_size: int
  spatial: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.groups or self.features % self.groups:
      raise ValueError(f"decoder: channels {c} -> {self.features} not divisible by groups "
                       f"{self.groups}")
    fan_in = (c // self.groups) * self.kernel_size ** self.spatial
    kernel = self.param("kernel", layers.torch_default_kernel,
                        (self.kernel_size,) * self.spatial + (c // self.groups, self.features),
                        jnp.float32)
    bias = self.param("bias", layers.torch_default_bias(fan_in), (self.features,), jnp.float32)
    return grouped_conv(x.astype(self.dtype), kernel, bias, self.groups)


class _ConvDecoder(nn.Module):
  """Shared body of Decoder1d/2d over a channels-last tensor with ``spatial`` axes: per block a
  grouped conv (kernel k, zero padding k//2, SamePad for even k) → LayerNorm over channels
  without affine → GELU, residual when ``residual`` and the channel count is unchanged (so the
  first block has none when ``decoder_dim != D``), then the projection (spec §6.5)."""
  dim: int
  decoder_dim: int = 384
  kernel: int = 7
  num_layers: int = 4
  groups: int = 16
  residual: bool = True
  projection_layers: int = 1
  spatial: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      y = _GroupedConv(self.decoder_dim, self.kernel, self.spatial, self.groups, self.dtype,
                       name=f"conv_{j}")(x)
      y = layers.gelu(layers.LayerNorm(1e-5, affine=False, name=f"norm_{j}")(y))
      x = y + x if self.residual and y.shape[-1] == x.shape[-1] else y
    return _projection(x, self.dim, self.projection_layers, self.dtype)


@registry.register("decoder", "1d")
class Decoder1d(nn.Module):
  """data2vec 2.0 1-D conv decoder (audio, text; spec §6.5): ``[N, T, D]`` → ``[N, T, D]``.

  Audio Base: 4 × (conv k 7, 384 ch, 16 groups), residual except the first, Linear(384 → 768).
  Text Base: 5 × (conv k 9, 768 ch, 1 group), no residual, Linear(768 → 1536) → GELU →
  Linear(1536 → 768). Padded positions are not special-cased (as fairseq).
  """
  dim: int
  decoder_dim: int = 384
  kernel: int = 7
  num_layers: int = 4
  groups: int = 16
  residual: bool = True
  projection_layers: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _ConvDecoder(self.dim, self.decoder_dim, self.kernel, self.num_layers, self.groups,
                        self.residual, self.projection_layers, 1, self.dtype, name="body")(x)


@registry.register("decoder", "2d")
class Decoder2d(nn.Module):
  """data2vec 2.0 2-D conv decoder (images; spec §6.5): ``[N, G·G, D]`` (row-major square grid)
  → conv blocks on the ``[N, G, G, C]`` grid → ``[N, G·G, D]``. Image Base: 6 × (conv 3×3,
  768 ch, 16 groups), residual, Linear(768 → 768)."""
  dim: int
  decoder_dim: int = 768
  kernel: int = 3
  num_layers: int = 6
  groups: int = 16
  residual: bool = True
  projection_layers: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, t, c = x.shape
    side = math.isqrt(t)
    if side * side != t:
      raise ValueError(f"Decoder2d needs a square grid of positions, got {t}")
    y = _ConvDecoder(self.dim, self.decoder_dim, self.kernel, self.num_layers, self.groups,
                     self.residual, self.projection_layers, 2, self.dtype,
                     name="body")(x.reshape(n, side, side, c))
    return y.reshape(n, t, y.shape[-1])
