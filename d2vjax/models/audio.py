"""Speech feature encoder: waveform CNN, feature projection, convolutional positional encoders.

Semantics: fairseq-spec §1.2 (CNN), §1.3 (pos_conv), §1.8 (init). Shapes use B = batch,
S = waveform samples (16 kHz), T = frames (20 ms hop), D = model width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import registry
from d2vjax.models import layers

# (channels, kernel, stride) of the 7-layer waveform CNN (wav2vec 2.0 §2; fairseq-spec §1.2).
CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
SAMPLE_RATE = 16000
RECEPTIVE_FIELD = 400  # samples (25 ms); total stride 320 samples (20 ms)


def _conv_lengths(n, xp):
  for _, k, s in CONV_LAYERS:
    n = xp.where(n >= k, (n - k) // s + 1, 0)
  return n


def num_frames(num_samples):
  """Frames produced by the CNN from ``num_samples`` waveform samples (int or int array).

  Applies ``floor((L - k) / s) + 1`` layer by layer; inputs shorter than the 400-sample receptive
  field give 0. 320000 → 999, 250000 → 781, 32000 → 99.
  """
  n = _conv_lengths(np.asarray(num_samples, dtype=np.int64), np)
  return int(n) if n.ndim == 0 else n


def frame_padding_mask(sample_padding_mask: jax.Array, frames: int) -> jax.Array:
  """Frame padding mask from a sample padding mask (True = padded), spec §1.2.

  Args:
    sample_padding_mask: bool ``[B, S]``.
    frames: T, the static number of CNN frames of the batch (``num_frames(S)``).
  Returns:
    bool ``[B, T]``: frame ``t`` of row ``i`` is padding iff ``t >= num_frames(valid samples_i)``.
  """
  valid = jnp.sum(~sample_padding_mask, axis=-1).astype(jnp.int32)
  n = _conv_lengths(valid, jnp)
  return jnp.arange(frames)[None, :] >= n[:, None]


class ConvFeatureExtractor(nn.Module):
  """The 7-layer waveform CNN. ``[B, S]`` float → ``[B, T, 512]``.

  Attributes:
    mode: 'default' (GroupNorm with 512 groups after the first conv only; wav2vec 2.0 Base) or
      'layer_norm' (per-frame LayerNorm after every conv; data2vec, wav2vec 2.0 Large).
    conv_bias: conv biases (False for data2vec; True for wav2vec 2.0 Large).
    channels: conv width (512 in every published model; smaller only in the CPU preset).
    dtype: compute dtype of the convolutions; norms always run in fp32.
  """
  mode: str = "layer_norm"
  conv_bias: bool = False
  channels: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, wav):
    if self.mode not in ("default", "layer_norm"):
      raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {self.mode!r}")
    x = wav[..., None].astype(self.dtype)
    for i, (_, k, s) in enumerate(CONV_LAYERS):
      x = nn.Conv(self.channels, (k,), strides=(s,), padding="VALID", use_bias=self.conv_bias,
                  kernel_init=layers.kaiming_normal, dtype=self.dtype, name=f"conv_{i}")(x)
      if self.mode == "layer_norm":
        x = layers.LayerNorm(name=f"norm_{i}")(x)
      elif i == 0:
        x = _ChannelGroupNorm(name="norm_0")(x)
      x = layers.gelu(x)
    return x


class _ChannelGroupNorm(nn.Module):
  """GroupNorm with one group per channel: each channel normalised over time, per utterance, fp32.

  Padding frames enter the statistics (as in fairseq), which is why the 'default' extractor is not
  padding-invariant (user-needs B1); pre-training crops instead of padding.
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class AudioFeatureEncoder(nn.Module):
  """Speech feature encoder: CNN → grad scaling → LayerNorm(512) → Linear(512 → D).

  Dropout on the projected features is left to the objective because the data2vec teacher
  consumes the features before it (spec §4.1 step 2).

  Attributes:
    dim: D.
    extractor_mode, conv_bias, conv_channels: see ``ConvFeatureExtractor``.
    feature_grad_mult: gradient scale on the CNN output (0 = frozen CNN).
    dtype: compute dtype.
  """
  dim: int
  extractor_mode: str = "layer_norm"
  conv_bias: bool = False
  feature_grad_mult: float = 1.0
  conv_channels: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict, train: bool = False) -> dict:
    """Args: ``inputs['audio']`` float ``[B, S]``; optional ``inputs['padding_mask']`` bool ``[B, S]``.

    Returns a dict: ``features`` ``[B, T, D]`` (projected, pre-dropout), ``padding_mask`` bool
    ``[B, T]`` (True = pad), ``cnn`` ``[B, T, 512]`` raw CNN output (feature penalty), ``normed``
    ``[B, T, 512]`` layer-normed CNN output (quantizer input).
    """
    del train
    wav = inputs["audio"]
    cnn = ConvFeatureExtractor(self.extractor_mode, self.conv_bias, self.conv_channels, self.dtype,
                               name="cnn")(wav)
    cnn = layers.scale_gradient(cnn, self.feature_grad_mult)
    normed = layers.LayerNorm(name="feature_norm")(cnn)
    feats = nn.Dense(self.dim, kernel_init=layers.torch_default_kernel,
                     bias_init=layers.torch_default_bias(cnn.shape[-1]), dtype=self.dtype,
                     name="projection")(normed)
    frames = cnn.shape[1]
    pad = inputs.get("padding_mask")
    pad = (jnp.zeros(feats.shape[:2], bool) if pad is None else frame_padding_mask(pad, frames))
    return {"features": feats, "padding_mask": pad, "cnn": cnn, "normed": normed}


def _grouped_conv(x, kernel, bias, groups: int):
  """1-D grouped conv with 'same' zero padding k//2 on both sides (PyTorch ``Conv1d(padding=k//2,
  groups=g)`` + SamePad). x ``[B, T, C]``, kernel ``[k, C/g, C]``, bias ``[C]`` → ``[B, T, C]``.

  On CPU it runs as ONE batched matmul over the k shifted views (``[B, T, k, g, C/g]``, k times
  the activation memory): XLA:CPU's grouped convolution (``feature_group_count``) and its
  gradients are 2.4–4.8× slower for the positional convs (16 groups; k = 19 at D = 256/768,
  k = 128 at D = 768; forward + backward), and a sum of k per-tap matmuls makes XLA:CPU fuse the
  sum into the following LayerNorm and recompute it (data2vec's conv stack 8× slower). Measured
  in docs/benchmarks.md. Other backends keep the library convolution (cuDNN/TPU grouped convs are
  fast and need no k-fold buffer).
  """
  k = kernel.shape[0]
  t = x.shape[1]
  if jax.default_backend() == "cpu":
    b, c = x.shape[0], x.shape[-1]
    o = kernel.shape[-1]
    xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0))).reshape(b, t + 2 * (k // 2), groups,
                                                                  c // groups)
    w = kernel.astype(x.dtype).reshape(k, c // groups, groups, o // groups)
    taps = jnp.stack([xp[:, a:a + t] for a in range(k)], axis=2)  # [B, T, k, g, C/g]
    y = jnp.einsum("btkgc,kcgo->btgo", taps, w)
    return y.reshape(b, t, o) + bias.astype(x.dtype)
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1,), padding=[(k // 2, k // 2)],
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
  y = y + bias.astype(x.dtype)
  # SamePad: an even kernel with k//2 padding yields T+1 frames; drop the last (spec §1.3).
  return y[:, :t]


@registry.register("pos_encoder", "conv")
class WeightNormPosConv(nn.Module):
  """wav2vec 2.0 positional conv: one grouped conv (k=128, 16 groups), weight norm with one gain
  per kernel tap (PyTorch ``dim=2``), SamePad, GELU. Returns the term to ADD to the input.

  Attributes: dim (D), width (kernel, 128), groups (16), depth (unused, must be 1).
  """
  dim: int
  width: int = 128
  groups: int = 16
  depth: int = 1

  @nn.compact
  def __call__(self, x, padding_mask=None):
    """x ``[B, T, D]`` (padded frames already zero); padding_mask bool ``[B, T]`` (unused: one
    conv over zeroed padding is padding-invariant)."""
    del padding_mask
    k, d, g = self.width, self.dim, self.groups
    std = (4.0 / (k * d)) ** 0.5
    v = self.param("weight_v", nn.initializers.normal(std), (k, d // g, d), jnp.float32)
    # PyTorch's weight_norm starts with g = ||v|| per tap, so the initial weight equals v.
    gain = self.param("weight_g", lambda _: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2))))
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    kernel = v * (gain[:, None, None] / norm)
    return layers.gelu(_grouped_conv(x, kernel, bias, g))


@registry.register("pos_encoder", "conv_stack")
class PosConvStack(nn.Module):
  """data2vec audio positional encoder: ``depth`` blocks of [grouped conv (k = max(3, width //
  depth), 16 groups) → LayerNorm without affine → GELU]; residual around the whole stack is added
  by the caller. width 95, depth 5 → k=19 (spec §1.3b).
  """
  dim: int
  width: int = 95
  groups: int = 16
  depth: int = 5
  # False: fairseq's (and HF's) behaviour, padding zeroed once before the stack only.
  rezero_padding = True

  @nn.compact
  def __call__(self, x, padding_mask=None):
    """x ``[B, T, D]``; padding_mask bool ``[B, T]`` (True = pad) → ``[B, T, D]``.

    Padded frames are re-zeroed before every block: bias → LN → GELU make them non-zero again, and
    the next conv would carry that into the last valid frames (fairseq never pads in pre-training,
    so it does not need this; fine-tuning and padded batches do). ``conv_stack_fairseq`` keeps
    fairseq's leak, to reproduce a fairseq / Hugging Face model on padded batches exactly.
    """
    k = max(3, self.width // self.depth)
    fan_in = (self.dim // self.groups) * k
    for j in range(self.depth):
      if padding_mask is not None and self.rezero_padding:
        x = jnp.where(padding_mask[..., None], 0, x)
      kernel = self.param(f"conv_{j}_kernel", layers.torch_default_kernel,
                          (k, self.dim // self.groups, self.dim), jnp.float32)
      bias = self.param(f"conv_{j}_bias", layers.torch_default_bias(fan_in), (self.dim,),
                        jnp.float32)
      x = _grouped_conv(x, kernel, bias, self.groups)
      x = layers.LayerNorm(affine=False, name=f"norm_{j}")(x)
      x = layers.gelu(x)
    return x


@registry.register("pos_encoder", "conv_stack_fairseq")
class PosConvStackFairseq(PosConvStack):
  """``PosConvStack`` with fairseq's padding behaviour: padded frames are zeroed once before the
  stack (by the encoder) and not between blocks, so on padded batches the last valid frames see
  the padded frames' bias → LN → GELU output, exactly as fairseq / HF ``Data2VecAudio`` compute.
  Same parameters; for parity with converted checkpoints (docs/interop.md)."""
  rezero_padding = False
