"""fairseq data2vec 2.0 (``Data2VecMultiModel``) checkpoints: synthetic state dicts with the key
names of fairseq-spec §12.1 (audio, image, text; fused qkv, ALiBi scale, extra tokens, prenet,
decoders, EMA) convert with complete key accounting into the d2vjax data2vec 2.0 model, checked
against a NumPy forward of fairseq's AltBlocks. No PyTorch needed (there is no HF equivalent)."""

import re

import numpy as np
import pytest

from _convert_util import d2v_forward
from d2vjax import convert
from d2vjax.convert import d2v2
from d2vjax.models.d2v2 import sincos_2d


def _block(prefix, d, f, rng):
  shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (f, d),
            "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,)}
  return {f"{prefix}{k}": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _d2v2_state(modality, d=32, heads=4, depth=2, prenet=1, rng=None):
  rng = rng or np.random.default_rng(0)
  z = lambda *s: rng.standard_normal(s).astype(np.float32)
  sd = {}
  for i in range(depth):
    sd.update(_block(f"blocks.{i}.", d, 4 * d, rng))
  m = f"modality_encoders.{modality}."
  for j in range(prenet):
    sd.update(_block(f"{m}context_encoder.blocks.{j}.", d, 4 * d, rng))
  sd[f"{m}context_encoder.norm.weight"], sd[f"{m}context_encoder.norm.bias"] = z(d), z(d)
  if modality == "AUDIO":
    for i, (k, cin) in enumerate([(10, 1)] + [(3, 16)] * 4 + [(2, 16)] * 2):
      sd[f"{m}local_encoder.conv_layers.{i}.0.weight"] = z(16, cin, k)
      sd[f"{m}local_encoder.conv_layers.{i}.2.1.weight"] = z(16)
      sd[f"{m}local_encoder.conv_layers.{i}.2.1.bias"] = z(16)
    sd[f"{m}project_features.1.weight"], sd[f"{m}project_features.1.bias"] = z(16), z(16)
    sd[f"{m}project_features.2.weight"], sd[f"{m}project_features.2.bias"] = z(d, 16), z(d)
    for j in range(1, 6):
      sd[f"{m}relative_positional_encoder.{j}.0.weight"] = z(d, d // 4, 19)
      sd[f"{m}relative_positional_encoder.{j}.0.bias"] = z(d)
    sd[f"{m}alibi_scale"] = np.ones((1, 1, heads, 1, 1), np.float32)
    dec = [(f"{m}decoder.blocks.{j}.0", (24, d // 4 if j == 0 else 24 // 4, 7)) for j in range(4)]
    sd[f"{m}decoder.proj.weight"], sd[f"{m}decoder.proj.bias"] = z(d, 24), z(d)
  elif modality == "IMAGE":
    sd[f"{m}local_encoder.proj.weight"], sd[f"{m}local_encoder.proj.bias"] = z(d, 3, 8, 8), z(d)
    sd[f"{m}fixed_positional_encoder.positions"] = sincos_2d(4, d)[None]  # frozen MAE table
    sd[f"{m}extra_tokens"] = z(1, 1, d)
    dec = [(f"{m}decoder.blocks.{j}.0", (24, d // 4 if j == 0 else 24 // 4, 3, 3))
           for j in range(3)]
    sd[f"{m}decoder.proj.weight"], sd[f"{m}decoder.proj.bias"] = z(d, 24), z(d)
  else:
    sd[f"{m}local_encoder.embed_tokens.weight"] = z(50, d)
    sd[f"{m}local_encoder.embed_positions.weight"] = z(22, d)
    sd[f"{m}local_encoder.layernorm_embedding.weight"] = z(d)
    sd[f"{m}local_encoder.layernorm_embedding.bias"] = z(d)
    dec = [(f"{m}decoder.blocks.{j}.0", (24, d // 4 if j == 0 else 24 // 4, 5)) for j in range(1)]
    sd[f"{m}decoder.proj.0.weight"], sd[f"{m}decoder.proj.0.bias"] = z(48, 24), z(48)
    sd[f"{m}decoder.proj.2.weight"], sd[f"{m}decoder.proj.2.bias"] = z(d, 48), z(d)
  for key, shape in dec:
    sd[f"{key}.weight"], sd[f"{key}.bias"] = z(*shape), z(shape[0])
  sd["_ema.blocks.0.norm1.weight"] = z(d)
  return sd


@pytest.mark.parametrize("modality", ["AUDIO", "IMAGE", "TEXT"])
def test_data2vec2_key_accounting(modality):
  """Every key of a data2vec 2.0 checkpoint (trunk AltBlocks with fused qkv, the modality's local
  encoder, ALiBi scale (1, 1, H, 1, 1), extra tokens, prenet, decoder, EMA) is assigned to a
  component or dropped with a reason, the architecture is read off the shapes, and the values
  land in the d2vjax data2vec 2.0 model."""
  sd = _d2v2_state(modality)
  inv = d2v2.inventory(sd)
  assert len(inv["consumed"]) + len(inv["dropped"]) == len(sd)
  assert set(inv["dropped"]) == {"_ema.blocks.0.norm1.weight"}
  assert (inv["depth"], inv["dim"], inv["ffn_dim"], inv["prenet_depth"]) == (2, 32, 128, 1)
  expect = {"AUDIO": dict(heads=4, decoder_layers=4, decoder_kernel=7, pos_depth=5, pos_kernel=19,
                          conv_channels=16, projection_layers=1),
            "IMAGE": dict(decoder_layers=3, decoder_kernel=3, patch_size=8, num_patches=16,
                          extra_tokens=1),
            "TEXT": dict(decoder_layers=1, projection_layers=2, vocab_size=50,
                         position_rows=22)}[modality]
  assert {k: inv[k] for k in expect} == expect
  assert inv["decoder_dim"] == 24 and inv["decoder_groups"] == 4
  ckcfg = {"num_heads": 4, "modalities": {modality.lower(): {"decoder": {
      "decoder_residual": modality != "TEXT"}}}}
  params, config, report = convert.convert_state(sd, "fairseq", ckcfg)
  assert len(report.consumed) + len(report.dropped) == len(sd) and not report.initialised
  assert config.model.decoder.residual == (modality != "TEXT")
  c = config.model
  assert (c.encoder.num_layers, c.context.prenet_depth, c.decoder.layers) == \
      (2, 1, expect["decoder_layers"])
  # Fused qkv rows [q; k; v], each head-major, land in the shared Transformer's projections.
  qkv_w, qkv_b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
  att = params["encoder"]["layers"]["self_attn"]
  np.testing.assert_array_equal(att["k_proj"]["kernel"][1].reshape(32, 32), qkv_w[32:64].T)
  np.testing.assert_array_equal(att["v_proj"]["bias"][1].reshape(-1), qkv_b[64:])
  m = f"modality_encoders.{modality}."
  np.testing.assert_array_equal(params["decoder"]["body"]["conv_0"]["kernel"],
                                np.moveaxis(sd[f"{m}decoder.blocks.0.0.weight"], (0, 1), (-1, -2)))
  if modality == "IMAGE":
    assert "fixed sin-cos" in report.dropped[f"{m}fixed_positional_encoder.positions"]
    np.testing.assert_array_equal(params["context"]["extra_tokens"], sd[f"{m}extra_tokens"][0])
  if modality == "AUDIO":
    np.testing.assert_array_equal(params["context"]["alibi_scale"], np.ones(4, np.float32))


def _np_altblock(x, sd, p, heads):
  """NumPy reference of fairseq's post-LN AltBlock (spec §1.6) on x [T, D]."""
  from scipy.special import erf
  ln = lambda y, w, b: ((y - y.mean(-1, keepdims=True))
                        / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * w + b)
  t, d = x.shape
  qkv = (x @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(t, 3, heads, d // heads)
  q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))
  logits = (q * (d // heads) ** -0.5) @ k.transpose(0, 2, 1)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = (att @ v).transpose(1, 0, 2).reshape(t, d)
  x = ln(x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"], sd[p + "norm1.weight"],
         sd[p + "norm1.bias"])
  h = x @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  f = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
  return ln(x + f, sd[p + "norm2.weight"], sd[p + "norm2.bias"])


def test_data2vec2_text_matches_numpy_altblocks():
  """Converted data2vec 2.0 text weights: the d2vjax encoder equals a NumPy forward of fairseq's
  layout (embeddings → LayerNorm → context LayerNorm → prenet block → trunk AltBlocks with fused
  qkv), unmasked, so the fused-qkv split and the block order are checked numerically."""
  sd = {k: v.astype(np.float64) for k, v in _d2v2_state("TEXT").items()}
  for k in list(sd):
    if re.search(r"(norm\w*|layernorm_embedding)\.weight$", k):
      sd[k] = 1.0 + 0.1 * sd[k]  # gains near 1 keep the activations in a sane range
    elif ".weight" in k:
      sd[k] = 0.1 * sd[k]
  params, config, _ = convert.convert_state({k: v.astype(np.float32) for k, v in sd.items()},
                                            "fairseq", {"num_heads": 4})
  tokens = np.random.default_rng(1).integers(3, 50, (1, 10)).astype(np.int32)
  out = d2v_forward(params, config, {"tokens": tokens, "padding_mask": np.zeros((1, 10), bool)})
  m = "modality_encoders.TEXT."
  ln = lambda y, p: ((y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
                     * sd[p + ".weight"] + sd[p + ".bias"])
  x = sd[m + "local_encoder.embed_tokens.weight"][tokens[0]] + \
      sd[m + "local_encoder.embed_positions.weight"][2:12]  # positions padding_idx + 1 + t
  x = ln(ln(x, m + "local_encoder.layernorm_embedding"), m + "context_encoder.norm")
  x = _np_altblock(x, sd, m + "context_encoder.blocks.0.", 4)
  for i in range(2):
    x = _np_altblock(x, sd, f"blocks.{i}.", 4)
    err = np.max(np.abs(out[1][i, 0] - x)) / np.max(np.abs(x))
    assert err < 1e-4, (i, err)


def test_data2vec2_bad_keys_are_named():
  sd = _d2v2_state("AUDIO")
  broken = dict(sd)
  del broken["blocks.1.attn.qkv.bias"]
  with pytest.raises(KeyError, match="blocks.1.attn.qkv.bias"):
    d2v2.inventory(broken)
  broken = dict(sd, **{"blocks.0.mlp.fc2.weight": np.zeros((32, 100), np.float32)})
  with pytest.raises(ValueError, match="blocks.0.mlp.fc2.weight"):
    d2v2.inventory(broken)
  broken = dict(sd, **{"modality_encoders.AUDIO.something.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="something.weight"):
    d2v2.inventory(broken)
