"""Helpers for the conversion parity tests: random HF models, forwards on both sides, errors."""

from __future__ import annotations

import numpy as np
import pytest

from d2vjax.convert import parity
from d2vjax.convert.parity import d2v_layer_outputs as d2v_forward, rel_err  # noqa: F401


def torch_or_skip():
  """(torch, transformers), or skip the calling test module with the reason."""
  torch = pytest.importorskip(
      "torch", reason="parity tests need PyTorch: pip install -e '.[parity]' (torch==2.13.0)")
  transformers = pytest.importorskip(
      "transformers", reason="parity tests need transformers: pip install -e '.[parity]'")
  return torch, transformers

TOL = 1e-4  # max abs error relative to the reference's max abs value (issue #9)


def randomize(model, seed: int = 0, scale: float = 0.2):
  """Perturb every parameter (``parity.perturb``); eval mode."""
  return parity.perturb(model, seed, scale)


def state_of(model) -> dict:
  """HF state dict as float32 numpy."""
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_layers(model, layer_list, **inputs):
  """(last_hidden_state, [per-layer outputs]) of an HF model (``layer_list`` is checked to be
  the encoder's layers)."""
  assert list(layer_list) == list(getattr(model.encoder, "layers", None) or model.encoder.layer)
  return parity.hf_layer_outputs(model, **inputs)


def assert_layers_match(d2v_out, hf_last, hf_layers_out, valid=None, tol=TOL):
  """Every layer's block output and the final output agree within ``tol`` (relative)."""
  errs = parity.layer_errors(d2v_out, hf_last, hf_layers_out, valid)
  assert max(errs) <= tol, errs
  return errs


def assert_text_matches(model, params, config, length: int, pad_from: int, vocab: int, seed=0):
  """Two rows of random tokens in [3, vocab), the second right-padded (pad id 1, HF attention
  mask) from ``pad_from``: every layer agrees on the valid tokens."""
  torch, _ = torch_or_skip()
  tokens = np.random.default_rng(seed).integers(3, vocab, (2, length)).astype(np.int32)
  pad = np.zeros(tokens.shape, bool)
  pad[1, pad_from:] = True
  tokens[pad] = 1
  out = d2v_forward(params, config, {"tokens": tokens, "padding_mask": pad})
  last, layers = parity.hf_layer_outputs(model, input_ids=torch.from_numpy(tokens).long(),
                                         attention_mask=torch.from_numpy(~pad).long())
  return assert_layers_match(out, last, layers, valid=~pad)
