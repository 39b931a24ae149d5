"""fairseq checkpoints: synthetic state dicts with the key names of fairseq-spec §12.1 (written
out here, independently of the converter's tables), including the conditional modules, convert
with complete key accounting and compute what the Hugging Face model holding the same weights
computes; ``.pt`` files are read without fairseq/omegaconf and unsafe pickles are refused."""

import re
import sys
import types

import numpy as np
import pytest

from _convert_util import (assert_layers_match, assert_text_matches, d2v_forward, hf_layers,
                           randomize, state_of, torch_or_skip)
from d2vjax import convert

torch, transformers = torch_or_skip()

# HF name → fairseq name (spec §12.1), applied in order.
SPEECH_NAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_extractor\.conv_layers\.0\.layer_norm\.(weight|bias)$GN",
     r"feature_extractor.conv_layers.0.2.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.",
     r"feature_extractor.conv_layers.\1.2.1."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
     "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
     "encoder.pos_conv.0.weight_v"),
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
           "latent_groups": 2,
           "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"}
  with pytest.raises(ValueError, match="conv_feature_layers"):  # strides differ from spec §1.2
    convert.convert_state(sd, "fairseq", dict(ckcfg, conv_feature_layers="[(32, 10, 4)] * 7"))
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
  regression head, the ``_ema`` teacher (a nested dict entry) dropped with its reason."""
  cfg = transformers.Data2VecAudioConfig(**{**SMALL, "num_conv_pos_embeddings": 3,
                                            "conv_pos_kernel_size": 5})
  torch.manual_seed(2)
  model = randomize(transformers.Data2VecAudioModel(cfg), seed=2)
  sd = _rename(state_of(model), group_norm=False)
  assert "encoder.pos_conv.2.0.weight" in sd
  rng = np.random.default_rng(0)
  sd["final_proj.weight"] = rng.standard_normal((64, 64), np.float32)
  sd["final_proj.bias"] = rng.standard_normal(64, np.float32)
  # fairseq's state_dict stores the EMA teacher as ONE entry holding a dict of tensors.
  sd["_ema"] = {"layers.0.fc1.weight": np.zeros((128, 64), np.float32)}
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
  assert_text_matches(model, params, config, length=9, pad_from=5, vocab=50)
