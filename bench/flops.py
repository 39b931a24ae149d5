"""Analytic FLOP counts of the d2vjax encoders, for model FLOPs utilisation (MFU).

Counts multiply-adds of the matmuls and convolutions as 2 FLOPs each (the convention of the MFU
literature: PaLM appendix B, MaxText); LayerNorm, GELU, softmax and the optimizer are left out,
so XLA's own count (``compiled.cost_analysis()['flops']``, which includes element-wise work) is
somewhat higher. Backward = 2 × forward, so a training step is 3 × forward. Every function takes
the d2vjax config's ``model`` section and returns FLOPs of ONE forward pass.
"""

from __future__ import annotations

from d2vjax.models import audio, transformer as transformer_lib


def _resolved(enc) -> transformer_lib.EncoderConfig:
  """``model.encoder`` with the variant's sizes filled in (configs leave them None)."""
  return enc if isinstance(enc, transformer_lib.EncoderConfig) else transformer_lib.encoder_config(enc)


def transformer(tokens: int, rows: int, enc) -> float:
  """Transformer blocks on ``rows × tokens`` positions (``enc``: ``model.encoder``): Q/K/V/out
  projections 4·D², FFN 2·D·F, attention scores and weighted sum 2·T·D per token, plus the
  convolutional positional layer (kernel ``pos_width``) or data2vec's stack (``pos_depth``
  layers of kernel max(3, ``pos_width`` // ``pos_depth``)), grouped by ``pos_groups``."""
  enc = _resolved(enc)
  d, f, n = int(enc.dim), int(enc.ffn_dim), rows * tokens
  per_layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * rows * tokens * tokens * d
  total = int(enc.num_layers) * per_layer
  if str(enc.pos_encoder) != "none":
    depth, kernel = 1, int(enc.pos_width)
    if str(enc.pos_encoder).startswith("conv_stack"):  # data2vec: width split over the layers
      depth = int(enc.pos_depth)
      kernel = max(3, kernel // depth)
    total += depth * 2 * n * d * (d // int(enc.pos_groups)) * kernel
  return float(total)


def speech_frontend(samples: int, rows: int, model) -> float:
  """The 7-layer waveform CNN (``audio.CONV_LAYERS`` kernels and strides, ``conv_channels``
  wide) and the Linear(C → D) projection, for ``rows`` clips of ``samples`` samples."""
  c = int(model.conv_channels)
  total, length, c_in = 0, samples, 1
  for _, k, s in audio.CONV_LAYERS:
    length = (length - k) // s + 1
    total += 2 * rows * length * c_in * c * k
    c_in = c
  total += 2 * rows * length * c * int(_resolved(model.encoder).dim)
  return float(total)


def speech_encoder(samples: int, rows: int, model) -> float:
  """CNN + projection + Transformer (positional conv included) of a speech model."""
  frames = audio.num_frames(samples)
  return speech_frontend(samples, rows, model) + transformer(int(frames), rows, model.encoder)


def vision_encoder(image_size: int, rows: int, model) -> float:
  """Patch embedding (a p × p × 3 → D matmul per patch) + Transformer on 1 + patches tokens."""
  p = int(model.patch_size)
  patches = (image_size // p) ** 2
  d = int(_resolved(model.encoder).dim)
  return float(2 * rows * patches * p * p * 3 * d) + transformer(patches + 1, rows, model.encoder)


def train_step(forward: float) -> float:
  """Forward + backward (2 × forward) FLOPs."""
  return 3.0 * forward


def xla_flops(compiled) -> float | None:
  """FLOPs XLA counts for a compiled computation (None if the backend reports none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])
