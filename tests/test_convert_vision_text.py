"""Parity of converted Hugging Face Data2VecVision (BEiT layout, shared relative bias, layer
scale, mask token) and Data2VecText (RoBERTa layout, padded batches) models (issue #9)."""

import numpy as np
import pytest

from _convert_util import (assert_layers_match, assert_text_matches, d2v_forward, hf_layers,
                           randomize, state_of, torch_or_skip)
from d2vjax import convert

torch, transformers = torch_or_skip()

VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              image_size=32, patch_size=8, use_mask_token=True, use_mean_pooling=False,
              use_shared_relative_position_bias=True, use_relative_position_bias=False,
              use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
TEXT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)


def _vision(**kw):
  cfg = transformers.Data2VecVisionConfig(**{**VISION, **kw})
  torch.manual_seed(0)
  return randomize(transformers.Data2VecVisionModel(cfg)), cfg


def test_vision_every_layer_matches_with_mask_token():
  model, cfg = _vision()
  params, config, report = convert.convert_state(state_of(model), "hf", cfg.to_dict())
  assert set(report.initialised) == {"head/proj/bias", "head/proj/kernel"}, report.initialised
  assert config.data.image_size == 32 and config.model.patch_size == 8
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  mask = rng.random((2, 16)) < 0.5
  pixel = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  for bool_mask in (None, mask):
    inputs = {"image": images}
    kwargs = {"pixel_values": pixel}
    if bool_mask is not None:
      inputs["mask"] = np.concatenate([np.zeros((2, 1), bool), bool_mask], axis=1)
      kwargs["bool_masked_pos"] = torch.from_numpy(bool_mask)
    out = d2v_forward(params, config, inputs)
    last, layers = hf_layers(model, model.encoder.layer, **kwargs)
    assert_layers_match(out, last, layers)


def test_vision_unsupported_layouts_are_named():
  model, cfg = _vision(use_absolute_position_embeddings=True)
  with pytest.raises(ValueError, match="embeddings.position_embeddings"):
    convert.convert_state(state_of(model), "hf", cfg.to_dict())


def _text():
  cfg = transformers.Data2VecTextConfig(**TEXT)
  torch.manual_seed(0)
  return randomize(transformers.Data2VecTextModel(cfg, add_pooling_layer=True)), cfg


def test_text_padded_every_layer_matches():
  """Right-padded batch (pad id 1 and HF's attention mask): valid tokens agree in every layer;
  the pooler is dropped with its reason and the token-type row folded into the positions."""
  model, cfg = _text()
  params, config, report = convert.convert_state(state_of(model), "hf", cfg.to_dict())
  assert set(report.dropped) == {"pooler.dense.weight", "pooler.dense.bias"}
  assert config.model.max_positions == 38 and config.model.vocab_size == 100
  assert_text_matches(model, params, config, length=12, pad_from=5, vocab=100)
