"""The shared Transformer encoder (wav2vec 2.0 / data2vec 1.0 layout), scanned over layers.

Semantics: fairseq-spec §1.4 (encoder, post-LN / pre-LN layers, LayerDrop), §1.5 (attention),
§1.8 (BERT init). Every layer also returns its FFN output before dropout and residual, the data2vec
target representation (§11.8), stacked ``[L, B, T, D]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import registry, sharding
from d2vjax.models import layers

# Size presets (data2vec §4.2; wav2vec 2.0 §4.2; fairseq-spec §1.4). 'tiny' is for tests and the
# CPU preset; it keeps every structural feature of the Base model at small width.
VARIANTS = {
    "tiny": dict(num_layers=4, dim=256, ffn_dim=1024, num_heads=4),
    "base": dict(num_layers=12, dim=768, ffn_dim=3072, num_heads=12),
    "large": dict(num_layers=24, dim=1024, ffn_dim=4096, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Static hyper-parameters of ``TransformerEncoder`` (hashable: Flax module attribute)."""
  num_layers: int = 12
  dim: int = 768
  ffn_dim: int = 3072
  num_heads: int = 12
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  layer_norm_first: bool = False
  # Post-LN encoders normalise the input before the first layer (wav2vec2, spec §11.26); text
  # keeps that LayerNorm in its embedding instead (fairseq layernorm_embedding, spec §4.2).
  input_layer_norm: bool = True
  # Dropout on the encoder input; None = ``dropout`` (wav2vec2). data2vec 2.0's trunk has its own
  # (``dropout_input`` 0, spec §1.6/§8.1) while its blocks use encoder_dropout 0.1.
  input_dropout: Optional[float] = None
  layer_scale: float = 0.0  # > 0: per-channel residual gains initialised to this (BEiT)
  drop_path: float = 0.0  # stochastic depth, rising linearly from 0 to this over the layers
  qkv_bias: str = "qkv"  # 'qkv' (fairseq) | 'qv' (BEiT: no key bias)
  # What each layer reports (the data2vec targets, data2vec Table 4): 'ffn' output before the
  # residual (data2vec) | 'attn' self-attention output before the residual | 'block' output.
  layer_result: str = "ffn"
  attn_bias: str = "none"  # registry kind 'attn_bias' (shared across layers), or 'none'
  pos_encoder: str = "none"  # registry kind 'pos_encoder', or 'none'
  pos_width: int = 128
  pos_groups: int = 16
  pos_depth: int = 1
  norm_eps: float = 1e-5
  scan: bool = True
  remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs)
  # Block-boundary activations [B, T, D] are pinned to batch over (data, fsdp) when a mesh is
  # active; True also splits D over the 'tensor' axis between blocks (less memory, the all-reduce
  # after fc2/out_proj becomes a reduce-scatter + all-gather).
  residual_tensor: bool = False
  dtype: str = "float32"


def encoder_config(cfg) -> EncoderConfig:
  """EncoderConfig from a ConfigDict-like ``cfg`` with a ``variant`` and optional overrides."""
  d = dict(cfg)
  base = dict(VARIANTS[d.pop("variant", "base")])
  fields = {f.name for f in dataclasses.fields(EncoderConfig)}
  base.update({k: v for k, v in d.items() if k in fields and v is not None})
  return EncoderConfig(**base)


class MultiHeadAttention(nn.Module):
  """fairseq MultiheadAttention: separate q/k/v/out projections with bias, q scaled by
  head_dim**-0.5 after projection, padded keys excluded, softmax in fp32, dropout on probabilities.

  Call: x ``[B, T, D]``, key padding ``[B, T]`` (True = pad), optional additive logit bias
  ``[B|1, H, T, T]`` (fp32) → ``[B, T, D]``.
  """
  cfg: EncoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, padding_mask, bias=None):
    cfg = self.cfg
    dtype = layers.dtype_of(cfg.dtype)
    h, dh = cfg.num_heads, cfg.dim // cfg.num_heads
    if cfg.qkv_bias not in ("qkv", "qv"):
      raise ValueError(f"encoder.qkv_bias must be 'qkv' or 'qv', got {cfg.qkv_bias!r}")
    dense = lambda name, use_bias=True: nn.DenseGeneral(
        (h, dh), use_bias=use_bias, kernel_init=layers.bert_init, dtype=dtype, name=name)
    q = dense("q_proj")(x) * (dh ** -0.5)
    k = dense("k_proj", cfg.qkv_bias == "qkv")(x)
    v = dense("v_proj")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    # finfo.min rather than -inf keeps rows with every key padded finite (their output is unused).
    logits = jnp.where(padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(cfg.dim, axis=(-2, -1), kernel_init=layers.bert_init, dtype=dtype,
                           name="out_proj")(out)


class EncoderLayer(nn.Module):
  """One wav2vec2 TransformerSentenceEncoderLayer (post-LN or pre-LN), with LayerDrop.

  Scan-compatible: ``(x, ((padding_mask, bias), drop_path_rate)) → (x, layer_result)``; the rate
  is this layer's stochastic-depth probability (a scanned input, so layers may differ).
  """
  cfg: EncoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, side, drop_path_rate=0.0):
    padding_mask, bias = side
    cfg = self.cfg
    dtype = layers.dtype_of(cfg.dtype)
    drop = lambda rate, y: nn.Dropout(rate)(y, deterministic=self.deterministic)
    ln1 = layers.LayerNorm(cfg.norm_eps, name="self_attn_layer_norm")
    ln2 = layers.LayerNorm(cfg.norm_eps, name="final_layer_norm")
    attn = MultiHeadAttention(cfg, self.deterministic, name="self_attn")
    fc1 = nn.Dense(cfg.ffn_dim, kernel_init=layers.bert_init, dtype=dtype, name="fc1")
    fc2 = nn.Dense(cfg.dim, kernel_init=layers.bert_init, dtype=dtype, name="fc2")
    ffn = lambda y: fc2(drop(cfg.activation_dropout, layers.gelu(fc1(y))))

    if cfg.layer_scale > 0:
      init = nn.initializers.constant(cfg.layer_scale)
      g1 = self.param("gamma_1", init, (cfg.dim,), jnp.float32).astype(dtype)
      g2 = self.param("gamma_2", init, (cfg.dim,), jnp.float32).astype(dtype)
    else:
      g1 = g2 = 1.0

    def branch(y, gain):
      y = drop(cfg.dropout, y) * gain
      if cfg.drop_path > 0 and not self.deterministic:
        keep = 1.0 - drop_path_rate
        u = jax.random.uniform(self.make_rng("dropout"), (y.shape[0],) + (1,) * (y.ndim - 1))
        y = jnp.where(u < keep, y / keep, 0).astype(y.dtype)
      return y

    x_in = x
    if cfg.layer_norm_first:
      a = attn(ln1(x), padding_mask, bias)
      x = x + branch(a, g1)
      f = ffn(ln2(x))
      x = x + branch(f, g2)
    else:
      a = attn(x, padding_mask, bias)
      x = ln1(x + branch(a, g1))
      f = ffn(x)
      x = ln2(x + branch(f, g2))

    if cfg.layerdrop > 0 and not self.deterministic:
      # One draw per layer per step, shared by the whole batch (spec §11.27); the layer is still
      # computed so the program shape never changes (user-needs D2).
      u = jax.random.uniform(self.make_rng("dropout"))
      x = jnp.where(u <= cfg.layerdrop, x_in, x)
    results = {"ffn": f, "attn": a, "block": x}
    if cfg.layer_result not in results:
      raise ValueError(f"encoder.layer_result must be one of {sorted(results)}, got "
                       f"{cfg.layer_result!r}")
    x = _constrain(x, cfg)
    return x, (x if cfg.layer_result == "block" else _constrain(results[cfg.layer_result], cfg))


def _constrain(x, cfg: EncoderConfig):
  """Block-boundary layout of the residual stream (a no-op unless a mesh is active)."""
  return sharding.constrain_activation(x, tensor_dim=x.ndim - 1 if cfg.residual_tensor else None)


def _layer_class(cfg: EncoderConfig):
  cls = EncoderLayer
  if cfg.remat == "full":
    cls = nn.remat(cls, prevent_cse=not cfg.scan)
  elif cfg.remat == "dots":
    cls = nn.remat(cls, prevent_cse=not cfg.scan,
                   policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
  elif cfg.remat != "none":
    raise ValueError(f"encoder.remat must be none|full|dots, got {cfg.remat!r}")
  return cls


class TransformerEncoder(nn.Module):
  """wav2vec2 TransformerEncoder: zero padded frames → x + pos(x) → [LN if post-LN] → dropout →
  layers → [final LN if pre-LN].

  Call: x ``[B, T, D]``, padding_mask bool ``[B, T]`` → ``(x [B, T, D], layer_results [L, B, T, D])``.
  ``train`` toggles dropout and LayerDrop (the teacher always runs with ``train=False``).
  """
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, padding_mask, train: bool = False, bias: Optional[jax.Array] = None):
    cfg = self.cfg
    dtype = layers.dtype_of(cfg.dtype)
    x = jnp.where(padding_mask[..., None], 0, x).astype(dtype)
    if cfg.pos_encoder != "none":
      pos_cls = registry.get("pos_encoder", cfg.pos_encoder)
      pos = pos_cls(cfg.dim, cfg.pos_width, cfg.pos_groups, cfg.pos_depth, name="pos_conv")
      x = x + pos(x, padding_mask)
    if not cfg.layer_norm_first and cfg.input_layer_norm:
      x = layers.LayerNorm(cfg.norm_eps, name="layer_norm")(x)
    in_drop = cfg.dropout if cfg.input_dropout is None else cfg.input_dropout
    x = nn.Dropout(in_drop)(x, deterministic=not train)
    x = _constrain(x, cfg)
    if cfg.attn_bias != "none":
      # One bias table shared by every layer (BEiT's shared relative position bias).
      shared = registry.get("attn_bias", cfg.attn_bias)(cfg.num_heads, name="attn_bias")(x.shape[1])
      bias = shared if bias is None else bias + shared
    layer_cls = _layer_class(cfg)
    side = (padding_mask, bias)
    rates = jnp.linspace(0.0, cfg.drop_path, cfg.num_layers) if cfg.num_layers > 1 else \
        jnp.full((cfg.num_layers,), cfg.drop_path)
    if cfg.scan:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, 0), length=cfg.num_layers)
      x, results = scanned(cfg, not train, name="layers")(x, side, rates)
    else:
      outs = []
      for i in range(cfg.num_layers):
        x, f = layer_cls(cfg, not train, name=f"layers_{i}")(x, side, rates[i])
        outs.append(f)
      results = jnp.stack(outs)
    if cfg.layer_norm_first:
      x = layers.LayerNorm(cfg.norm_eps, name="layer_norm")(x)
    return x, results
