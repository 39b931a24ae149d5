"""fairseq checkpoints: synthetic state dicts with the key names of fairseq-spec §12.1 (written
out here, independently of the converter's tables), including the conditional modules, convert
with complete key accounting and compute what the Hugging Face model holding the same weights
computes; ``.pt`` files are read without fairseq/omegaconf and unsafe pickles are refused."""

import pickle
import re
import sys
import types

import numpy as np
import pytest

from _convert_util import (assert_layers_match, d2v_forward, hf_layers, randomize, state_of,
                           torch, transformers)
from d2vjax import convert
from d2vjax.convert import d2v2
from d2vjax.models.d2v2 import sincos_2d

# HF name → fairseq name (spec §12.1), applied in order.
SPEECH_NAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_extractor\.conv_layers\.0\.layer_norm\.(weight|bias)$GN",
     r"feature_extractor.conv_layers.0.2.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.2.1."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.", r"encoder.pos_conv.\1.0."),
    (r"\.attention\.(q|k|v|out)_proj\.", r".self_attn.\1_proj."),
    (r"(encoder\.layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
    (r"\.feed_forward\.intermediate_dense\.", ".fc1."),
    (r"\.feed_forward\.output_dense\.", ".fc2."),
]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             conv_dim=[32] * 7, num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
             attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
             mask_time_prob=0.05, num_conv_pos_embeddings=16)


def _rename(sd, group_norm: bool):
  out = {}
  for k, v in sd.items():
    for pattern, repl in SPEECH_NAMES:
      if pattern.endswith("$GN"):
        if group_norm:
          k = re.sub(pattern[:-3] + "$", repl, k)
        continue
      k = re.sub(pattern, repl, k)
    out[k] = v
  return out


def _hf_w2v2(large: bool, **kw):
  cfg = transformers.Wav2Vec2Config(**{**SMALL, **kw}, feat_extract_norm="layer" if large else
                                    "group", do_stable_layer_norm=large, conv_bias=large)
  torch.manual_seed(1)
  return randomize(transformers.Wav2Vec2Model(cfg), seed=1), cfg


def _wav(n=2, s=6000, seed=0):
  return np.random.default_rng(seed).standard_normal((n, s)).astype(np.float32)


def _check_equal_to_hf(model, params, config):
  wav = _wav()
  out = d2v_forward(params, config, {"audio": wav, "padding_mask": np.zeros(wav.shape, bool)})
  last, layers = hf_layers(model, model.encoder.layers, input_values=torch.from_numpy(wav))
  assert_layers_match(out, last, layers)


def test_wav2vec2_base_with_pretraining_heads():
  """Post-LN, GroupNorm CNN, weight-normed pos_conv (weight_g (1, 1, k)), quantizer + project_q +
  final_proj: every key consumed and the encoder equals HF with the same weights."""
  model, _ = _hf_w2v2(large=False)
  sd = _rename(state_of(model), group_norm=True)
  assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)
  rng = np.random.default_rng(0)
  sd.update({"quantizer.vars": rng.random((1, 2 * 8, 16), np.float32),
             "quantizer.weight_proj.weight": rng.standard_normal((16, 32), np.float32),
             "quantizer.weight_proj.bias": np.zeros(16, np.float32),
             "project_q.weight": rng.standard_normal((32, 32), np.float32),
             "project_q.bias": np.zeros(32, np.float32),
             "final_proj.weight": rng.standard_normal((32, 64), np.float32),
             "final_proj.bias": np.zeros(32, np.float32)})
  ckcfg = {"_name": "wav2vec2", "encoder_attention_heads": 2, "layer_norm_first": False,
           "latent_groups": 2}
  params, config, report = convert.convert_state(sd, "fairseq", ckcfg)
  assert len(report.consumed) == len(sd) and not report.dropped and not report.initialised
  assert (config.model.extractor_mode, config.model.conv_bias) == ("default", False)
  assert (config.model.final_dim, config.model.latent_vars) == (32, 8)
  np.testing.assert_array_equal(params["final_proj"]["kernel"], sd["final_proj.weight"].T)
  _check_equal_to_hf(model, params, config)


class _FakeNode:
  """Pickles like an omegaconf value node (state holds ``_val``)."""

  def __init__(self, val):
    self._val = val


class _FakeDictConfig:
  """Pickles like an omegaconf DictConfig (state holds ``_content`` and ``_metadata``)."""

  def __init__(self, content):
    self._content = content
    self._metadata = None
    self._parent = None


def _save_with_fake_omegaconf(obj, path):
  """torch.save ``obj`` with the fake classes registered under omegaconf's module names, then
  remove those modules again (the reader must work without omegaconf installed)."""
  mods = {"omegaconf": types.ModuleType("omegaconf"),
          "omegaconf.dictconfig": types.ModuleType("omegaconf.dictconfig"),
          "omegaconf.nodes": types.ModuleType("omegaconf.nodes")}
  _FakeDictConfig.__module__, _FakeDictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
  _FakeNode.__module__, _FakeNode.__qualname__ = "omegaconf.nodes", "AnyNode"
  mods["omegaconf.dictconfig"].DictConfig = _FakeDictConfig
  mods["omegaconf.nodes"].AnyNode = _FakeNode
  saved = {k: sys.modules.get(k) for k in mods}
  sys.modules.update(mods)
  try:
    torch.save(obj, path)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def test_wav2vec2_large_pt_file_with_omegaconf_cfg(tmp_path):
  """Pre-LN (layer_norm_first from the checkpoint's own cfg), LayerNorm CNN with conv_bias, a
  CTC fine-tuned checkpoint (``w2v_encoder.w2v_model.`` prefix, ``w2v_encoder.proj`` dropped),
  read from a .pt whose cfg is omegaconf objects, without omegaconf."""
  model, _ = _hf_w2v2(large=True)
  sd = {f"w2v_encoder.w2v_model.{k}": torch.from_numpy(v)
        for k, v in _rename(state_of(model), group_norm=False).items()}
  sd["w2v_encoder.proj.weight"] = torch.zeros(30, 64)
  sd["w2v_encoder.proj.bias"] = torch.zeros(30)
  pre = {"_name": "wav2vec2", "encoder_attention_heads": 2, "layer_norm_first": True}
  cfg = _FakeDictConfig({"model": _FakeDictConfig({
      "_name": _FakeNode("wav2vec_ctc"),
      "w2v_args": _FakeDictConfig({"model": _FakeDictConfig(
          {k: _FakeNode(v) for k, v in pre.items()})})})})
  path = str(tmp_path / "ctc.pt")
  _save_with_fake_omegaconf({"model": sd, "cfg": cfg, "extra_state": None}, path)
  assert "omegaconf" not in sys.modules
  params, config, report = convert.convert(path, "fairseq")
  assert config.model.encoder.layer_norm_first is True
  assert set(report.dropped) == {"w2v_encoder.proj.weight", "w2v_encoder.proj.bias"}
  _check_equal_to_hf(model, params, config)


class _Evil:
  def __reduce__(self):
    return (print, ("this would run",))


def test_unsafe_pickle_is_refused(tmp_path):
  path = str(tmp_path / "evil.pt")
  torch.save({"model": {}, "cfg": _Evil()}, path)
  with pytest.raises(ValueError, match="builtins.print"):
    convert.convert(path, "fairseq")


def test_missing_post_extract_proj_is_identity():
  """Conditional module: with CNN width = model width fairseq has no post_extract_proj. The
  HF twin holds an identity projection; the outputs agree and the report says so."""
  model, _ = _hf_w2v2(large=False, conv_dim=[64] * 7)
  with torch.no_grad():
    model.feature_projection.projection.weight.copy_(torch.eye(64))
    model.feature_projection.projection.bias.zero_()
  sd = {k: v for k, v in _rename(state_of(model), group_norm=True).items()
        if not k.startswith("post_extract_proj.")}
  params, config, report = convert.convert_state(
      sd, "fairseq", {"_name": "wav2vec2", "encoder_attention_heads": 2, "layer_norm_first": False})
  assert "identity" in report.initialised["frontend/projection/kernel"]
  _check_equal_to_hf(model, params, config)


def test_data2vec_audio_with_ema_and_final_proj():
  """data2vec 1.0 audio: conv positional stack ``encoder.pos_conv.{j}.0``, ``final_proj`` →
  regression head, the ``_ema`` teacher copy dropped with its reason."""
  cfg = transformers.Data2VecAudioConfig(**{**SMALL, "num_conv_pos_embeddings": 3,
                                            "conv_pos_kernel_size": 5})
  torch.manual_seed(2)
  model = randomize(transformers.Data2VecAudioModel(cfg), seed=2)
  sd = _rename(state_of(model), group_norm=False)
  assert "encoder.pos_conv.2.0.weight" in sd
  rng = np.random.default_rng(0)
  sd["final_proj.weight"] = rng.standard_normal((64, 64), np.float32)
  sd["final_proj.bias"] = rng.standard_normal(64, np.float32)
  sd["_ema.layers.0.fc1.weight"] = np.zeros((128, 64), np.float32)
  params, config, report = convert.convert_state(
      sd, "fairseq", {"_name": "data2vec_audio", "encoder_attention_heads": 2,
                      "layer_norm_first": False})
  assert list(report.dropped) == ["_ema.layers.0.fc1.weight"]
  assert not report.initialised
  np.testing.assert_array_equal(params["head"]["proj"]["bias"], sd["final_proj.bias"])
  _check_equal_to_hf(model, params, config)


TEXT_NAMES = [
    (r"^embeddings\.word_embeddings\.", "encoder.sentence_encoder.embed_tokens."),
    (r"^embeddings\.position_embeddings\.", "encoder.sentence_encoder.embed_positions."),
    (r"^embeddings\.LayerNorm\.", "encoder.sentence_encoder.layernorm_embedding."),
    (r"^encoder\.layer\.(\d+)\.", r"encoder.sentence_encoder.layers.\1."),
    (r"\.attention\.self\.query\.", ".self_attn.q_proj."),
    (r"\.attention\.self\.key\.", ".self_attn.k_proj."),
    (r"\.attention\.self\.value\.", ".self_attn.v_proj."),
    (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
    (r"\.attention\.output\.LayerNorm\.", ".self_attn_layer_norm."),
    (r"\.intermediate\.dense\.", ".fc1."),
    (r"\.output\.dense\.", ".fc2."),
    (r"\.output\.LayerNorm\.", ".final_layer_norm."),
]


def test_data2vec_text():
  """data2vec 1.0 text: ``encoder.sentence_encoder.*`` + ``encoder.regression_head.{0,2}``; the
  HF twin has a zero token-type row (fairseq has none)."""
  cfg = transformers.Data2VecTextConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=128,
                                        max_position_embeddings=20, type_vocab_size=1,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        layer_norm_eps=1e-5)  # fairseq's LayerNorm epsilon
  torch.manual_seed(3)
  model = randomize(transformers.Data2VecTextModel(cfg, add_pooling_layer=False), seed=3)
  with torch.no_grad():
    model.embeddings.token_type_embeddings.weight.zero_()
  sd = {}
  for k, v in state_of(model).items():
    if "token_type" in k or k.endswith("position_ids"):
      continue
    for pattern, repl in TEXT_NAMES:
      k = re.sub(pattern, repl, k)
    sd[k] = v
  rng = np.random.default_rng(0)
  sd.update({"encoder.regression_head.0.weight": rng.standard_normal((128, 64), np.float32),
             "encoder.regression_head.0.bias": np.zeros(128, np.float32),
             "encoder.regression_head.2.weight": rng.standard_normal((64, 128), np.float32),
             "encoder.regression_head.2.bias": np.zeros(64, np.float32),
             "encoder._ema.layers.0.fc1.weight": np.zeros((128, 64), np.float32)})
  params, config, report = convert.convert_state(sd, "fairseq", {"encoder_attention_heads": 2})
  assert list(report.dropped) == ["encoder._ema.layers.0.fc1.weight"] and not report.initialised
  tokens = rng.integers(3, 50, (2, 9)).astype(np.int32)
  pad = np.zeros(tokens.shape, bool)
  pad[1, 5:] = True
  tokens[pad] = 1
  out = d2v_forward(params, config, {"tokens": tokens, "padding_mask": pad})
  last, layers = hf_layers(model, model.encoder.layer, input_ids=torch.from_numpy(tokens).long(),
                           attention_mask=torch.from_numpy(~pad).long())
  assert_layers_match(out, last, layers, valid=~pad)


# ----------------------------------------------------------------- data2vec 2.0 (spec §12.1)

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
  params, config, report = convert.convert_state(sd, "fairseq", {"num_heads": 4})
  assert len(report.consumed) + len(report.dropped) == len(sd) and not report.initialised
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
  ln = lambda y, w, b: (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * w + b
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
