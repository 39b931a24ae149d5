r"""Check a conversion numerically: run the Hugging Face model and the converted d2vjax model on
the same random batch and compare every layer's output.

``python -m d2vjax.convert.parity --in=HF_DIR`` (a real checkpoint) or
``python -m d2vjax.convert.parity --random=wav2vec2`` (a randomly initialised model of the HF
default — Base — config; families: wav2vec2, wav2vec2-large, data2vec-audio, data2vec-vision,
data2vec-text). Prints, per layer, ``max |d2vjax − torch| / max |torch|`` over the valid
positions of a padded batch, and the timings.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from d2vjax import convert, registry

_ENCODERS: dict = {}


def d2v_layer_outputs(params: dict, config, inputs: dict):
  """(final ``[B, T, D]``, block outputs ``[L, B, T, D]``, padding ``[B, T]``) of a d2vjax model
  (the config's objective, with ``layer_result='block'``); jitted once per config."""
  key = config.to_json_best_effort()
  if key not in _ENCODERS:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.encoder.layer_result = "block"
    objective = registry.get("objective", c.objective)(c)
    _ENCODERS[key] = jax.jit(objective.encode)
  x, results, pad = _ENCODERS[key](jax.tree.map(jax.numpy.asarray, params), inputs)
  return np.asarray(x), np.asarray(results), np.asarray(pad)


def hf_layer_outputs(model, **inputs):
  """(last_hidden_state, [per-layer outputs]) of an HF base model, captured by forward hooks on
  its encoder layers (``encoder.layers`` or ``encoder.layer``)."""
  import torch  # pylint: disable=g-import-not-at-top
  layer_list = getattr(model.encoder, "layers", None) or model.encoder.layer
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


def rel_err(got, want, valid=None) -> float:
  """``max |got − want| / max |want|`` over the valid positions (bool ``[B, T]`` or None)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if valid is not None:
    got, want = got[valid], want[valid]
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def layer_errors(d2v_out, hf_last, hf_outs, valid=None) -> list[float]:
  """Relative error of every layer's block output, then of the final output."""
  x, results, _ = d2v_out
  if len(hf_outs) != results.shape[0]:
    raise ValueError(f"{len(hf_outs)} HF layers vs {results.shape[0]} d2vjax layers")
  errs = [rel_err(results[i], hf_outs[i], valid) for i in range(results.shape[0])]
  return errs + [rel_err(x, hf_last, valid)]


def compare(model, params: dict, config, seed: int = 0) -> dict:
  """Per-layer relative errors of ``params`` (converted from the HF base ``model``) on a random
  batch of 2 rows built by the family's converter module (``parity_batch``: 1 s of audio, an
  image, or 64 tokens per row; audio and text have the second row padded).

  HF runs the padded batch with its attention mask, or each row alone where the family's HF
  model cannot honour padding the way d2vjax does (data2vec audio, docs/interop.md).

  Returns:
    ``{'per_layer': [L + 1] errors (every block output, then the final output), 'rows': 2,
    'padded_rows': rows of the d2vjax batch with padded positions}``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  family = convert.FAMILIES.get(("hf", model.config.model_type))
  if family is None:
    raise ValueError(f"no Hugging Face family {model.config.model_type!r}; known: "
                     f"{sorted(f for fmt, f in convert.FAMILIES if fmt == 'hf')}")
  inputs, calls = family.module.parity_batch(config, np.random.default_rng(seed))
  x, results, pad = d2v_layer_outputs(params, config, inputs)
  errs = []
  for rows, kwargs in calls:
    last, outs = hf_layer_outputs(model, **{
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in kwargs.items()})
    valid = ~pad[rows]
    if last.shape[1] == x.shape[1]:  # HF ran the rows padded to the batch length
      errs.append(layer_errors((x[rows], results[:, rows], None), last, outs, valid))
      continue
    if len(rows) != 1 or last.shape[1] != valid.sum():
      raise ValueError(f"HF output of rows {rows} has {last.shape[1]} positions: neither the "
                       f"batch length {x.shape[1]} nor one row's {valid.sum()} valid ones")
    # HF ran one row alone, unpadded: its positions are the row's valid ones.
    errs.append(layer_errors((x[rows][valid], results[:, rows][:, valid], None), last[0],
                             [o[0] for o in outs]))
  return {"per_layer": [float(e) for e in np.max(errs, axis=0)], "rows": int(x.shape[0]),
          "padded_rows": int(pad.any(axis=1).sum())}


# Randomly initialised HF models: family → (config class, model class, config overrides).
RANDOM = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", {}),
    "wav2vec2-large": ("Wav2Vec2Config", "Wav2Vec2Model", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel", {}),
    "data2vec-vision": ("Data2VecVisionConfig", "Data2VecVisionModel", dict(
        use_mask_token=True, use_mean_pooling=False, use_shared_relative_position_bias=True,
        use_relative_position_bias=False, layer_scale_init_value=0.1)),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextModel", dict(type_vocab_size=1)),
}


def random_model(family: str, seed: int = 0):
  """A randomly initialised HF base model of the family's default (Base) config, every
  parameter perturbed so LayerNorm gains/biases are not the trivial 1/0."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg_name, model_name, kw = RANDOM[family]
  cfg = getattr(transformers, cfg_name)(**kw)
  torch.manual_seed(seed)
  extra = {"add_pooling_layer": False} if "Text" in model_name else {}
  return perturb(getattr(transformers, model_name)(cfg, **extra), seed)


def perturb(model, seed: int = 0, scale: float = 0.2):
  """Add Gaussian noise of std ``scale · max(std(p), 0.05)`` to every parameter ``p`` of a torch
  model (LayerNorm gains/biases too, which HF inits to 1/0), so a key mapped to the wrong place
  changes the output. Returns it in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      # alpha= scales inside add_: no noise-sized temporary (a Base model has 95M–125M params).
      p.add_(torch.randn(p.shape, generator=g), alpha=scale * max(float(p.std()), 0.05))
  return model.eval()


def check(model, seed: int = 0) -> dict:
  """Convert an HF base model in memory and ``compare`` it: errors per layer (``per_layer``,
  worst ``max_rel_err``), batch coverage (``rows``, ``padded_rows``), timings (``convert_s``,
  ``compare_s``) and the freshly initialised d2vjax params (``initialised``)."""
  t0 = time.time()
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  params, config, report = convert.convert_state(state, "hf", model.config.to_dict())
  t1 = time.time()
  res = compare(model, params, config, seed)
  errs = res["per_layer"]
  return {"family": model.config.model_type, "layers": len(errs) - 1,
          "max_rel_err": max(errs), "per_layer": [float(f"{e:.3g}") for e in errs],
          "rows": res["rows"], "padded_rows": res["padded_rows"],
          "convert_s": round(t1 - t0, 1), "compare_s": round(time.time() - t1, 1),
          "initialised": sorted(report.initialised)}


def _cli() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  path = flags.DEFINE_string("in", None, "HF model directory (base model or task model).")
  family = flags.DEFINE_enum("random", None, sorted(RANDOM), "Random model of this family.")

  def main(argv):
    del argv
    import transformers  # pylint: disable=g-import-not-at-top
    if (path.value is None) == (family.value is None):
      raise app.UsageError("give exactly one of --in / --random")
    if family.value:
      model = random_model(family.value)
    else:
      model = transformers.AutoModel.from_pretrained(path.value).eval()
    print(json.dumps(check(model), indent=1))

  app.run(main)


if __name__ == "__main__":
  _cli()
