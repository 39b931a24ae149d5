"""Hugging Face ``Data2VecVision*`` (BEiT layout) ↔ d2vjax data2vec 1.0 vision (``models.vision``
frontend + the shared pre-LN Transformer with layer scale and the shared relative bias)."""

from __future__ import annotations

import numpy as np

from d2vjax.convert import rules as R

PREFIX = "data2vec_vision."
_LAYER = dict(q="attention.attention.query", k="attention.attention.key",
              v="attention.attention.value", o="attention.output.dense", ln1="layernorm_before",
              fc1="intermediate.dense", fc2="output.dense", ln2="layernorm_after")
_TABLE = "encoder.relative_position_bias.relative_position_bias_table"


def strip_prefix(state: dict, fmt: str) -> dict:
  """Keys of ``Data2VecVisionModel`` (task models prefix them with ``data2vec_vision.``)."""
  del fmt
  return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def drops(fmt: str) -> list[tuple[str, str]]:
  """(regex, reason) of keys deliberately not converted."""
  del fmt
  return [(r"pooler\..*", "mean-pooling head of the image classifier (fine-tuning only)"),
          (r"classifier\..*", "image classification head (fine-tuning only)"),
          (r"encoder\.relative_position_bias\.relative_position_index",
           "buffer: recomputed from the grid (models.vision.relative_position_index)")]


FRESH = [
    (r"frontend/mask_token", "checkpoint saved without BEiT's mask token (use_mask_token=False)"),
    (r"head/.*", "regression head: not part of HF Data2VecVision checkpoints"),
    (r"encoder/layer_norm/norm/.*",
     "checkpoint has no final LayerNorm (use_mean_pooling=True): HF's hidden states before the "
     "pooler are matched; the d2vjax final LN starts at identity"),
]


def _unsupported(state: dict) -> None:
  if "embeddings.position_embeddings" in state:
    raise ValueError("embeddings.position_embeddings: absolute positions are not implemented "
                     "(data2vec vision uses the shared relative position bias)")
  per_layer = [k for k in state if "attention.attention.relative_position_bias" in k]
  if per_layer:
    raise ValueError(f"{per_layer[0]}: per-layer relative position bias is not implemented "
                     "(only the shared table, use_shared_relative_position_bias=True)")


def derive(c, state: dict, ckcfg: dict | None, fmt: str, report) -> None:
  """Architecture fields of d2vjax config ``c`` from the checkpoint (in place)."""
  del fmt
  _unsupported(state)
  ck = dict(ckcfg or {})
  ids = R.layer_ids(state, "encoder.layer.")
  fc1 = state["encoder.layer.0.intermediate.dense.weight"]
  patch = state["embeddings.patch_embeddings.projection.weight"]
  e = c.model.encoder
  e.num_layers, e.dim, e.ffn_dim = len(ids), int(fc1.shape[1]), int(fc1.shape[0])
  heads = ck.get("num_attention_heads")
  if _TABLE in state:
    heads = heads or int(state[_TABLE].shape[1])
    rows = int(state[_TABLE].shape[0]) - 3
    side = int(round(rows ** 0.5))
    grid = (side + 1) // 2
    e.attn_bias = "beit_shared"
  else:
    e.attn_bias = "none"
    grid = int(ck.get("image_size", c.data.image_size)) // int(patch.shape[-1])
  if heads is None:
    heads = e.dim // 64
    report.notes.append(f"attention heads not recorded: using {heads}")
  e.num_heads = int(heads)
  has_scale = "encoder.layer.0.lambda_1" in state
  e.layer_scale = (e.layer_scale or 0.1) if has_scale else 0.0
  if ck.get("layer_norm_eps") is not None:
    e.norm_eps = float(ck["layer_norm_eps"])
  if ck.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"config.json hidden_act={ck['hidden_act']!r}: d2vjax uses exact GELU")
  c.model.patch_size = int(patch.shape[-1])
  c.data.image_size = grid * int(patch.shape[-1])


def rules(state: dict, fmt: str, shapes: dict) -> list[R.Rule]:
  """The key table for this checkpoint."""
  del fmt
  out = [R.Rule("embeddings.cls_token", "frontend/cls_token", n=2),
         R.Rule("embeddings.patch_embeddings.projection.weight",
                "frontend/patch_embed/proj/kernel", "conv"),
         R.Rule("embeddings.patch_embeddings.projection.bias", "frontend/patch_embed/proj/bias")]
  if "embeddings.mask_token" in state:
    out.append(R.Rule("embeddings.mask_token", "frontend/mask_token", n=2))
  if _TABLE in state:
    out.append(R.Rule(_TABLE, "encoder/attn_bias/relative_position_bias_table"))
  for i in R.layer_ids(state, "encoder.layer."):
    p = f"encoder.layer.{i}."
    out += R.encoder_layer(p, _LAYER, i, k_bias=False)
    if "encoder/layers/gamma_1" in shapes or f"encoder/layers_{i}/gamma_1" in shapes:
      out += [R.Rule(p + "lambda_1", "encoder/layers/gamma_1", layer=i),
              R.Rule(p + "lambda_2", "encoder/layers/gamma_2", layer=i)]
  if "layernorm.weight" in state:
    out += R.norm("layernorm", "encoder/layer_norm/norm")
  return out


def parity_batch(config, rng: np.random.Generator) -> tuple[dict, list]:
  """Random batch for ``parity.compare``: 2 images of ``data.image_size`` px (no padding).

  Returns:
    (d2vjax inputs ``image`` [2, S, S, 3] float32, HF calls ``[(rows, {'pixel_values':
    [2, 3, S, S]})]``).
  """
  s = int(config.data.image_size)
  img = rng.standard_normal((2, s, s, 3)).astype(np.float32)
  return {"image": img}, [([0, 1], {"pixel_values": img.transpose(0, 3, 1, 2).copy()})]


def hf_config(c, model_type: str = "data2vec-vision") -> dict:
  """config.json of an HF ``Data2VecVisionModel`` equal to d2vjax config ``c``."""
  del model_type
  e = c.model.encoder
  if e.qkv_bias != "qv" or not e.layer_norm_first:
    raise ValueError("HF Data2VecVision needs pre-LN layers with q/v biases (BEiT)")
  return dict(
      model_type="data2vec-vision", architectures=["Data2VecVisionModel"], hidden_size=e.dim,
      num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads,
      intermediate_size=e.ffn_dim, hidden_act="gelu", layer_norm_eps=e.norm_eps,
      image_size=int(c.data.image_size), patch_size=int(c.model.patch_size), num_channels=3,
      use_mask_token=True, use_absolute_position_embeddings=False,
      use_relative_position_bias=False,
      use_shared_relative_position_bias=e.attn_bias == "beit_shared",
      layer_scale_init_value=e.layer_scale, use_mean_pooling=False,
      hidden_dropout_prob=e.dropout, attention_probs_dropout_prob=e.attention_dropout,
      drop_path_rate=e.drop_path)
