"""BEiT-style ViT pieces for data2vec 1.0 vision (fairseq-spec §4.3; data2vec §4.1).

The official data2vec vision code is ``facebookresearch/data2vec_vision`` (``beit/``, pitfall
§11.35): a ViT whose patches are a strided convolution, with a learned CLS token, NO absolute
positions and ONE relative position bias table shared by all layers (``use_shared_rel_pos_bias``).
The Transformer itself is the shared ``models.transformer`` encoder configured pre-LN with layer
scale, stochastic depth and q/v-only biases; this module holds the image frontend, the shared
bias (registered as ``attn_bias`` ``beit_shared``) and BEiT's initialisation helpers.

BEiT's ``trunc_normal_(std=0.02)`` truncates at ±1 std (``a=-std, b=std``), not ±2 std: every
Linear/Conv weight, the CLS and the mask token are N(0, 0.02²) restricted to [-0.02, 0.02]
(effective std 0.0108). ``TRUNC_INIT`` is that initialiser; ``to_trunc_normal`` maps samples of
the shared code's other initialisers onto it exactly (see ``modalities.vision.Vision.post_init``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import registry
from d2vjax.models import d2v2, layers

__all__ = ["TRUNC_STD", "TRUNC_INIT", "to_trunc_normal", "ImageFrontend", "PatchEmbed",
           "BeitSharedRelativePositionBias", "relative_position_index", "grid_from_tokens",
           "PatchFrontend"]

TRUNC_STD = 0.02
# timm trunc_normal_(std=.02, a=-std, b=std) as called by BEiT (modeling_cyclical.py).
TRUNC_INIT = nn.initializers.truncated_normal(TRUNC_STD, lower=-1.0, upper=1.0)


def to_trunc_normal(x: jax.Array, kind: str, *, std: float = TRUNC_STD, bound: float = 0.0
                    ) -> jax.Array:
  """Maps samples of another initialiser onto N(0, std²) truncated to [-std, std], exactly in
  distribution (probability integral transform: ``u = F_src(x)``, ``y = F_TN⁻¹(u)``).

  Args:
    x: samples, any shape.
    kind: what ``x`` was drawn from: ``'normal'`` N(0, std²); ``'trunc2'`` N(0, std²) truncated
      at ±2 std (Flax's ``truncated_normal`` default); ``'uniform'`` U(-bound, bound) (PyTorch's
      default Linear init); ``'uniform01'`` U[0, 1).
    std: the std of both the source normal and the target's untruncated normal.
    bound: half-width of the ``'uniform'`` source.
  Returns:
    fp32 array, same shape, in [-std, std].
  """
  ndtr, ndtri = jax.scipy.special.ndtr, jax.scipy.special.ndtri
  x = jnp.asarray(x, jnp.float32)
  if kind == "normal":
    u = ndtr(x / std)
  elif kind == "trunc2":
    lo, hi = ndtr(-2.0), ndtr(2.0)
    u = (ndtr(x / std) - lo) / (hi - lo)
  elif kind == "uniform":
    u = (x / bound + 1.0) / 2.0
  elif kind == "uniform01":
    u = x
  else:
    raise ValueError(f"to_trunc_normal: unknown source kind {kind!r}")
  lo, hi = ndtr(-1.0), ndtr(1.0)
  y = std * ndtri(lo + jnp.clip(u, 0.0, 1.0) * (hi - lo))
  return jnp.clip(y, -std, std)


def grid_from_tokens(seq_len: int) -> int:
  """Side G of the square patch grid of a sequence of ``1 + G·G`` tokens (CLS first)."""
  g = math.isqrt(seq_len - 1)
  if seq_len < 2 or g * g != seq_len - 1:
    raise ValueError(f"beit_shared bias needs 1 + G·G tokens (square grid, CLS first), got "
                     f"{seq_len}")
  return g


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """BEiT's relative position index, int ``[1+N, 1+N]`` for ``N = Gh·Gw`` (token 0 = CLS).

  Patch pair (i, j) at grid positions (hi, wi), (hj, wj) gets
  ``(hi − hj + Gh − 1)·(2Gw − 1) + (wi − wj + Gw − 1)``; with ``R = (2Gh−1)(2Gw−1)``, the CLS
  row (CLS → patch) gets ``R``, the CLS column (patch → CLS) ``R + 1``, CLS → CLS ``R + 2``.
  """
  gh, gw = grid
  hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  hh, ww = hh.reshape(-1), ww.reshape(-1)
  rel = (hh[:, None] - hh[None, :] + gh - 1) * (2 * gw - 1) + (ww[:, None] - ww[None, :] + gw - 1)
  r = (2 * gh - 1) * (2 * gw - 1)
  n = gh * gw
  index = np.empty((n + 1, n + 1), np.int32)
  index[1:, 1:] = rel
  index[0, :] = r
  index[:, 0] = r + 1
  index[0, 0] = r + 2
  return index


@registry.register("attn_bias", "beit_shared")
class BeitSharedRelativePositionBias(nn.Module):
  """BEiT's shared relative position bias (``RelativePositionBias``): one zero-initialised table
  of ``(2G−1)² + 3`` entries per head (the +3: CLS→patch, patch→CLS, CLS→CLS), gathered by
  ``relative_position_index`` and added to every layer's attention logits.

  Square grids only: the shared encoder passes just the sequence length, and the recipe's grids
  (224/16 = 14, the CPU presets' 8) are square. Call: ``seq_len`` (``1 + G²``) → fp32
  ``[1, H, 1+G², 1+G²]``.
  """
  num_heads: int

  @nn.compact
  def __call__(self, seq_len: int) -> jax.Array:
    g = grid_from_tokens(int(seq_len))
    size = (2 * g - 1) ** 2 + 3
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (size, self.num_heads), jnp.float32)
    index = relative_position_index((g, g))
    bias = table[jnp.asarray(index.reshape(-1))].reshape(seq_len, seq_len, self.num_heads)
    return jnp.transpose(bias, (2, 0, 1))[None]


class PatchEmbed(nn.Module):
  """Conv2d(3 → D, kernel = stride = ``patch_size``) over NHWC images → ``[B, N, D]``, patches in
  row-major grid order (index ``h·Gw + w``, as PyTorch's ``flatten(2).transpose(1, 2)``).

  Init: BEiT's truncated normal (``TRUNC_INIT``) weight, zero bias (default), or data2vec 2.0's
  xavier-uniform weight with PyTorch's default bias (``xavier=True``, spec §1.8).
  """
  dim: int
  patch_size: int = 16
  dtype: jnp.dtype = jnp.float32
  xavier: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"PatchEmbed: images must be [B, H, W, C] with H, W multiples of {p}, "
                       f"got {images.shape}")
    if self.xavier:  # on PyTorch's (out, in·p·p) view of the kernel
      kernel_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
      bias_init = layers.torch_default_bias(images.shape[-1] * p * p)
    else:
      kernel_init, bias_init = TRUNC_INIT, nn.initializers.zeros
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", kernel_init=kernel_init,
                bias_init=bias_init, dtype=self.dtype, name="proj")(
                    images.astype(self.dtype))
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)


class ImageFrontend(nn.Module):
  """The data2vec vision feature encoder: patch embedding, BEiT's mask token on the masked
  patches, then the learned CLS token in front. No absolute positions: the recipe uses the shared
  relative bias (``--abs_pos_emb`` off).

  The mask token lives here, as in BEiT, so that the student's masking happens inside the
  frontend (the student's inputs carry ``mask``, the teacher's do not) and the teacher can be an
  EMA of the whole network that re-embeds the clean image (``modalities.vision``).

  Call: ``inputs['image']`` float32 ``[B, H, W, 3]`` (normalised), optional ``inputs['mask']``
  bool ``[B, 1+N]`` (column 0 = CLS, never replaced) → ``{'features': [B, 1+N, D],
  'padding_mask': bool zeros [B, 1+N]}`` with ``N = (H/p)·(W/p)``.
  """
  dim: int
  patch_size: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict, train: bool = False) -> dict:
    del train  # no dropout here: BEiT's pos_drop rate is 0 in the recipe
    x = PatchEmbed(self.dim, self.patch_size, self.dtype, name="patch_embed")(inputs["image"])
    mask_token = self.param("mask_token", TRUNC_INIT, (self.dim,), jnp.float32)
    cls = self.param("cls_token", TRUNC_INIT, (self.dim,), jnp.float32)
    mask = inputs.get("mask")
    if mask is not None:
      if mask.shape != (x.shape[0], x.shape[1] + 1):
        raise ValueError(f"mask must be [B, 1+N] = {(x.shape[0], x.shape[1] + 1)}, got "
                         f"{mask.shape}")
      x = jnp.where(mask[:, 1:, None], mask_token.astype(x.dtype), x)
    b = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.dim)), x], axis=1)
    return {"features": x, "padding_mask": jnp.zeros(x.shape[:2], bool)}


class PatchFrontend(nn.Module):
  """data2vec 2.0 image local encoder (fairseq-spec §6.2): xavier-initialised patch embedding plus
  MAE's FIXED 2-D sin-cos positions (not a parameter, so the teacher always has the same ones),
  added before masking; no CLS (the context encoder prepends it after masking).

  Call: ``inputs['image']`` float32 ``[B, H, W, 3]`` → ``{'features': [B, N, D],
  'padding_mask': bool zeros [B, N]}``, N = (H/p)·(W/p) on a square grid.
  """
  dim: int
  patch_size: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict, train: bool = False) -> dict:
    del train
    x = PatchEmbed(self.dim, self.patch_size, self.dtype, xavier=True,
                   name="patch_embed")(inputs["image"])
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
      raise ValueError(f"PatchFrontend needs square images, got {inputs['image'].shape}")
    x = x + jnp.asarray(d2v2.sincos_2d(side, self.dim), x.dtype)[None]
    return {"features": x, "padding_mask": jnp.zeros(x.shape[:2], bool)}
