"""Helpers for the conversion parity tests: random HF models, forwards on both sides, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="parity tests need PyTorch: pip install -e '.[parity]' (torch==2.13.0)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers: pip install -e '.[parity]'")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from d2vjax import registry  # noqa: E402  pylint: disable=wrong-import-position

TOL = 1e-4  # max abs error relative to the reference's max abs value (issue #9)


def randomize(model, seed: int = 0, scale: float = 0.2):
  """Perturb every parameter (norm gains/biases too, which HF inits to 1/0), so each key's
  mapping changes the output."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(scale * p.std().clamp(min=0.05) * torch.randn(p.shape, generator=g))
  return model.eval()


def state_of(model) -> dict:
  """HF state dict as float32 numpy."""
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_layers(model, layer_list, **inputs):
  """(last_hidden_state, [per-layer outputs]) of an HF model, captured by forward hooks."""
  outs = []
  hooks = [m.register_forward_hook(
      lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().numpy()))
      for m in layer_list]
  try:
    with torch.no_grad():
      last = model(**inputs).last_hidden_state.numpy()
  finally:
    for h in hooks:
      h.remove()
  return last, outs


_ENCODERS = {}


def d2v_forward(params: dict, config, inputs: dict):
  """(final [B, T, D], block outputs [L, B, T, D], padding [B, T]) of the converted model
  (jitted once per config, so batches of one shape share a compile)."""
  key = config.to_json_best_effort()
  if key not in _ENCODERS:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.encoder.layer_result = "block"
    objective = registry.get("objective", c.objective)(c)
    _ENCODERS[key] = jax.jit(objective.encode)
  x, results, pad = _ENCODERS[key](jax.tree.map(jax.numpy.asarray, params), inputs)
  return np.asarray(x), np.asarray(results), np.asarray(pad)


def rel_err(got, want, valid=None) -> float:
  """max |got - want| / max |want| over the valid positions ([B, T] bool or None)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if valid is not None:
    got, want = got[valid], want[valid]
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def assert_layers_match(d2v_out, hf_last, hf_layers_out, valid=None, tol=TOL):
  """Every layer's block output and the final output agree within ``tol`` (relative)."""
  x, results, _ = d2v_out
  assert len(hf_layers_out) == results.shape[0]
  errs = [rel_err(results[i], hf_layers_out[i], valid) for i in range(results.shape[0])]
  errs.append(rel_err(x, hf_last, valid))
  assert max(errs) <= tol, errs
  return errs
