"""d2vjax params → Hugging Face PyTorch layout (``model.safetensors`` + ``config.json``) for the
families Hugging Face implements: wav2vec 2.0, data2vec 1.0 audio / vision / text.

The key table is the import table run backwards (``rules.to_state_dict``); the HF model class,
built on the meta device from the written config, supplies the exact key set and shapes, so a
key the export misses or mis-shapes is an error here rather than a silent re-init at load time.
"""

from __future__ import annotations

import json
import os

import numpy as np

from d2vjax.convert import rules as R, speech, text, vision

# d2vjax modality → (family module, HF model_type) for data2vec 1.0 exports; wav2vec 2.0
# (objective 'wav2vec2') and data2vec audio with the single weight-normed conv go to Wav2Vec2.
_BY_MODALITY = {"speech": (speech, "data2vec-audio"), "vision": (vision, "data2vec-vision"),
                "text": (text, "data2vec-text")}


def hf_family(config) -> tuple:
  """(family module, HF model_type) for a d2vjax config."""
  if config.modality not in _BY_MODALITY:
    raise ValueError(f"no Hugging Face family for modality {config.modality!r}")
  mod, model_type = _BY_MODALITY[config.modality]
  if mod is speech and (config.objective == "wav2vec2" or
                        config.model.encoder.pos_encoder == "conv"):
    model_type = "wav2vec2"
  return mod, model_type


def _template(hf_cfg: dict, model_kwargs: dict) -> dict:
  """Key → shape of the HF model that ``hf_cfg`` describes (built on the meta device)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.AutoConfig.for_model(**hf_cfg)
  cls = getattr(transformers, hf_cfg["architectures"][0])
  with torch.device("meta"):
    model = cls(cfg, **model_kwargs)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_hf_state(params: dict, config) -> tuple[dict, dict]:
  """(HF state dict of float32 numpy arrays, config.json dict) for d2vjax ``params``."""
  mod, model_type = hf_family(config)
  hf_cfg = mod.hf_config(config, model_type)
  template = _template(hf_cfg, getattr(mod, "HF_MODEL_KWARGS", {}))
  stripped = mod.strip_prefix({k: np.zeros(s, np.float32) for k, s in template.items()}, "hf")
  full_key = dict(zip(stripped, template))
  flat = {k: np.asarray(v) for k, v in R.flatten(params).items()}
  shapes = {k: v.shape for k, v in flat.items()}
  table = mod.rules(stripped, "hf", shapes)
  state = R.to_state_dict(flat, table)
  if mod is text:
    state.update(text.hf_extra(flat))
  out = {}
  for key, arr in state.items():
    if key not in full_key:
      raise KeyError(f"export: {key!r} is not a key of HF {hf_cfg['architectures'][0]}")
    want = template[full_key[key]]
    if tuple(arr.shape) != want:
      raise ValueError(f"export: {key!r} has shape {arr.shape}, HF expects {want}")
    out[full_key[key]] = arr
  # Non-persistent-looking buffers HF recomputes are in the template too; anything else left
  # would load as a fresh random init.
  left = [k for k in template if k not in out and not k.endswith("relative_position_index")]
  if left:
    raise KeyError(f"export: no d2vjax value for HF keys {left[:10]}")
  return out, hf_cfg


def export_hf(params: dict, config, out_dir: str) -> str:
  """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns ``out_dir``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state, hf_cfg = to_hf_state(params, config)
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
  return out_dir
