"""Reading PyTorch checkpoints as plain numpy state dicts, without fairseq or omegaconf.

Hugging Face: a directory (``model.safetensors`` or ``pytorch_model.bin`` + ``config.json``) or
one weights file. fairseq: a ``.pt`` file (``{'model': state_dict, 'cfg': …}``). PyTorch files are
read with ``torch.load(weights_only=True)``; fairseq's config objects (omegaconf / argparse /
fairseq dataclasses) are rebuilt as inert records that only hold their pickled state, so no code
from those packages runs. Any other global in a pickle refuses the file.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np

# Modules whose pickled objects are plain configuration: rebuilt as ``_Inert`` records.
_INERT_MODULES = ("omegaconf", "fairseq", "examples", "argparse", "typing", "enum", "numpy",
                  "pathlib", "collections")


class _Inert:
  """Stand-in for a pickled config object: keeps constructor args and state, runs nothing."""

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__["_args"] = args
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
      state = {**(state[0] or {}), **(state[1] or {})}
    self.__dict__["_state"] = state


def plain(obj):
  """Inert records / containers → plain Python (dicts, lists, scalars); tensors untouched."""
  if isinstance(obj, _Inert):
    state = obj.__dict__.get("_state")
    if isinstance(state, dict):
      if "_content" in state:  # omegaconf DictConfig / ListConfig
        return plain(state["_content"])
      if "_val" in state:  # omegaconf value node
        return plain(state["_val"])
      return {k: plain(v) for k, v in state.items() if not str(k).startswith("_")}
    args = obj.__dict__.get("_args", ())
    return plain(args[0]) if len(args) == 1 else [plain(a) for a in args]
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  return obj


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install -e '.[parity]'") from e
  return torch


def torch_load(path: str):
  """``torch.load(weights_only=True)``; fairseq config objects become inert records. A pickle
  that needs any other global (code execution) is refused with the globals named."""
  torch = _torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as first:  # pylint: disable=broad-except
    if not isinstance(first, pickle.UnpicklingError):
      raise
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    unsafe = [n for n in names if n.split(".")[0] not in _INERT_MODULES]
    if unsafe:
      raise ValueError(f"{path}: refusing to unpickle: the file needs globals {unsafe}, which "
                       "could run code (only tensors and fairseq/omegaconf config records are "
                       "read)") from first
    with torch.serialization.safe_globals([(_Inert, n) for n in names]):
      return torch.load(path, map_location="cpu", weights_only=True)


def to_numpy(state: dict, prefix: str = "") -> dict:
  """State dict of torch tensors (any float dtype) → float32/int numpy arrays. Nested dicts
  (fairseq stores the EMA teacher as one entry ``_ema`` holding a dict of tensors) are
  flattened to ``_ema.<name>`` keys."""
  out = {}
  for k, v in state.items():
    k = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(to_numpy(v, f"{k}."))
      continue
    if hasattr(v, "detach"):
      v = v.detach().cpu()
      v = v.float() if v.is_floating_point() else v
      v = v.numpy()
    out[k] = np.asarray(v)
  return out


def read_hf(path: str) -> tuple[dict, dict | None]:
  """(state dict, config.json dict or None) from an HF model directory or weights file."""
  directory, weights = (path, None) if os.path.isdir(path) else (os.path.dirname(path), path)
  if weights is None:
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(directory, name)):
        weights = os.path.join(directory, name)
        break
    else:
      raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (sharded "
                              "checkpoints: merge them first)")
  if weights.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = load_file(weights)
    except TypeError:  # bf16 tensors have no numpy dtype: read through torch
      from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
      state = to_numpy(load_torch(weights))
    state = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()}
  else:
    state = to_numpy(torch_load(weights))
  cfg_path = os.path.join(directory, "config.json")
  config = None
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      config = json.load(f)
  return state, config


def read_fairseq(path: str) -> tuple[dict, dict | None]:
  """(model state dict, model config dict or None) from a fairseq ``.pt`` checkpoint."""
  ckpt = torch_load(path)
  if not isinstance(ckpt, dict) or "model" not in ckpt:
    raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
  cfg = plain(ckpt.get("cfg"))
  model_cfg = None
  if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
    model_cfg = cfg["model"]
  elif ckpt.get("args") is not None:  # pre-hydra checkpoints: an argparse.Namespace
    model_cfg = plain(ckpt["args"])
  return to_numpy(ckpt["model"]), model_cfg
