r"""Per-layer speech representations from a pre-trained or fine-tuned model.

API::

  feats = d2vjax.features.extract(params, config, {"audio": wav [B, S], "padding_mask": [B, S]},
                                  layers=(0, 6, -1))
  feats.layers[6]  # float32 [B, T, D]; padded frames are 0, feats.lengths[b] frames are valid

CLI (a folder of audio files → one ``.npy`` (one layer) or ``.npz`` (``layer_<i>`` arrays) per
file, mirroring the folder's layout; each array is ``[T, D]`` with only the file's frames)::

  python -m d2vjax.features --init=RUN_DIR_OR_EXPORT.msgpack --folder=wavs/ --out=feats/ \
      [--layers=0,6,-1] [--batch_size=8]

Layer indices (fairseq's ``extract_features(layer=i)`` / Hugging Face ``hidden_states[i]``
convention): 0 = the projected CNN features that enter the Transformer, i = 1 … L-1 the output of
Transformer block i, L the encoder output (block L's output; for pre-LN models such as wav2vec 2.0
Large, after the final LayerNorm); negative indices count from L (-1 = L).

Padding: the waveform is normalised per utterance over its valid samples when the model was
trained that way (``config.data.normalize``), padded frames are masked in attention and zeroed in
the outputs, so a padded batch gives the unpadded result on the valid frames (user-needs B1).
The one exception is wav2vec 2.0 Base's CNN (``extractor_mode='default'``): its GroupNorm
statistics run over time, padding included, so such rows are encoded one by one at their exact
length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2vjax import registry
from d2vjax.data import audio_io, sources

__all__ = ["Features", "extract", "resolve_layers", "extract_folder"]


@dataclasses.dataclass
class Features:
  """Output of ``extract``.

  Attributes:
    layers: layer index (as resolved, ``0 … L``) → float32 ``[B, T, D]``; padded frames are 0.
    padding_mask: bool ``[B, T]``, True = padded frame.
    lengths: int ``[B]`` valid frames per row.
  """
  layers: dict[int, np.ndarray]
  padding_mask: np.ndarray
  lengths: np.ndarray


def _config_json(config) -> str:
  """Canonical JSON of a ConfigDict or dict (the cache key of the compiled encoders)."""
  if hasattr(config, "to_json_best_effort"):
    config = json.loads(config.to_json_best_effort())
  return json.dumps(config, sort_keys=True, default=repr)


@functools.lru_cache(maxsize=8)
def _objective(config_json: str):
  """The config's objective, its encoder reporting block outputs (same params)."""
  c = ml_collections.ConfigDict(json.loads(config_json))
  c.model.encoder.layer_result = "block"
  return registry.get("objective", c.objective)(c)


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
  """Requested indices → ``0 … L`` (None = all), in request order; out of range is an error."""
  if layers is None:
    return tuple(range(num_layers + 1))
  out = []
  for i in layers:
    j = int(i) + num_layers + 1 if int(i) < 0 else int(i)
    if not 0 <= j <= num_layers:
      raise ValueError(f"layer {i} out of range for a {num_layers}-layer encoder "
                       f"(valid: {-num_layers - 1} … {num_layers})")
    out.append(j)
  return tuple(out)


@functools.lru_cache(maxsize=8)
def _forward(config_json: str):
  """Jitted ``(params, audio, padding_mask) -> (layers [L+1, B, T, D], frame padding [B, T])``:
  every layer, so one program serves any choice of layers (the choice is made on the host)."""
  objective = _objective(config_json)
  model = objective.model

  @jax.jit
  def fn(params, audio, padding_mask):
    inputs = {"audio": audio, "padding_mask": padding_mask}
    f = model.apply({"params": params}, inputs, False, method="features")
    x, blocks = model.apply({"params": params}, f["features"], f["padding_mask"], False,
                            method="contextualize")
    # Padded frames are zeroed on the host: masking here makes XLA:CPU take minutes to compile
    # single-row programs (measured: 200 s for B=1 against 2 s for B=2, jax 0.10.2).
    out = jnp.concatenate([f["features"][None], blocks[:-1], x[None]])
    return out.astype(jnp.float32), f["padding_mask"]

  return fn


def extract(params, config, inputs: dict, layers: Sequence[int] | None = None, *,
            normalize: bool | None = None) -> Features:
  """Per-layer representations of a batch of raw waveforms.

  Args:
    params: the model's params (a pre-training student or a fine-tuned CTC model), host or device
      arrays, as ``export.load_params`` / ``checkpointing.restore_params_only`` return them.
    config: the run's config (ConfigDict or dict) that built ``params``.
    inputs: ``audio`` float ``[B, S]`` 16 kHz waveforms (not normalised), optional
      ``padding_mask`` bool ``[B, S]`` (True = padded sample; default none).
    layers: indices (module docstring), default all ``0 … L``.
    normalize: per-utterance zero-mean/unit-variance over the valid samples; default what the
      model was trained with (``config.data.normalize``).
  Returns:
    ``Features`` (host numpy).
  """
  cj = _config_json(config)
  objective = _objective(cj)
  cfg = objective.config
  layers = resolve_layers(layers, objective.encoder_cfg.num_layers)
  audio = np.asarray(inputs["audio"], np.float32)
  if audio.ndim != 2:
    raise ValueError(f"inputs['audio'] must be [B, S], got shape {audio.shape}")
  pad = inputs.get("padding_mask")
  pad = np.zeros(audio.shape, bool) if pad is None else np.asarray(pad, bool)
  valid = (~pad).sum(axis=1)
  if normalize is None:
    normalize = bool(cfg.data.get("normalize", False))
  if normalize:
    audio = audio_io.normalize_waveform(audio, valid)
  audio = np.where(pad, 0.0, audio).astype(np.float32)
  fn = _forward(cj)
  pick = np.asarray(layers)
  if cfg.model.get("extractor_mode") == "default" and pad.any():
    # GroupNorm over time sees padding: encode each row alone at its exact length.
    t = audio_io.num_frames(audio.shape[1])
    out = np.zeros((len(layers), audio.shape[0], t, objective.encoder_cfg.dim), np.float32)
    for b in range(audio.shape[0]):
      n = int(valid[b])
      if n < audio_io.RECEPTIVE_FIELD:  # no frame at all: the row stays zero and fully padded
        continue
      y, _ = fn(params, audio[b:b + 1, :n], np.zeros((1, n), bool))
      out[:, b, :y.shape[2]] = np.asarray(y)[pick, 0]
    frame_pad = np.arange(t)[None, :] >= audio_io.num_frames(valid)[:, None]
  else:
    y, frame_pad = fn(params, audio, pad)
    frame_pad = np.asarray(frame_pad)
    out = np.where(frame_pad[None, :, :, None], 0.0, np.asarray(y)[pick]).astype(np.float32)
  return Features(layers={i: out[k] for k, i in enumerate(layers)}, padding_mask=frame_pad,
                  lengths=(~frame_pad).sum(axis=1))


def extract_folder(params, config, folder: str, out_dir: str, layers: Sequence[int] | None = None,
                   *, batch_size: int = 8, quantum: int = 16000) -> dict:
  """Writes features for every audio file under ``folder`` into ``out_dir``.

  Files are read at 16 kHz, grouped by length (padded up to a multiple of ``quantum`` samples,
  so at most one compiled program per length class) into batches of ``batch_size``. Unreadable
  or too-short files are skipped and counted. Returns ``{'written': n, 'skipped': {reason: n}}``.
  """
  objective = _objective(_config_json(config))
  resolved = resolve_layers(layers, objective.encoder_cfg.num_layers)
  files = sources.list_audio_files(folder)
  loaded, skipped = [], {}
  for path, key, _ in files:
    try:
      loaded.append((key, sources.load_waveform(path)))
    except audio_io.BadAudioError as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
  groups: dict[int, list] = {}
  for key, wav in loaded:
    groups.setdefault(-(-wav.size // quantum) * quantum, []).append((key, wav))
  written = 0
  for s, items in sorted(groups.items()):
    for i in range(0, len(items), batch_size):
      chunk = items[i:i + batch_size]
      audio = np.zeros((len(chunk), s), np.float32)
      pad = np.ones((len(chunk), s), bool)
      for r, (_, wav) in enumerate(chunk):
        audio[r, :wav.size], pad[r, :wav.size] = wav, False
      feats = extract(params, config, {"audio": audio, "padding_mask": pad}, resolved)
      for r, (key, _) in enumerate(chunk):
        n = int(feats.lengths[r])
        arrays = {f"layer_{j}": feats.layers[j][r, :n] for j in resolved}
        base = os.path.join(out_dir, key)
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        if len(resolved) == 1:
          np.save(base + ".npy", next(iter(arrays.values())))
        else:
          np.savez(base + ".npz", **arrays)
        written += 1
  return {"written": written, "skipped": skipped, "layers": list(resolved)}


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  init = flags.DEFINE_string("init", None, "Pre-training or fine-tuning run directory, or an "
                             "exported .msgpack (with its .json sidecar).")
  folder = flags.DEFINE_string("folder", None, "Folder of audio files (searched recursively).")
  out = flags.DEFINE_string("out", None, "Output folder.")
  layers = flags.DEFINE_list("layers", None, "Layer indices (default: all, 0 … L); one layer "
                             "writes .npy, several .npz.")
  batch_size = flags.DEFINE_integer("batch_size", 8, "Files per forward pass.")

  def main(argv: Any) -> None:
    del argv
    if not (init.value and folder.value and out.value):
      raise app.UsageError("--init, --folder and --out are required")
    from d2vjax import finetune  # pylint: disable=g-import-not-at-top
    params, config = finetune.load_init(init.value)
    chosen = None if layers.value is None else [int(x) for x in layers.value]
    result = extract_folder(params, config, folder.value, out.value, chosen,
                            batch_size=batch_size.value)
    print(f"wrote features of {result['written']} files (layers {result['layers']}) to "
          f"{out.value}; skipped {result['skipped'] or 'none'}")

  jax.config.config_with_absl()
  app.run(main)


if __name__ == "__main__":
  _cli()
