r"""Checkpoint interop: published fairseq / Hugging Face weights → d2vjax params, and back to
the Hugging Face layout.

``python -m d2vjax.convert --from=hf --in=facebook-wav2vec2-base/ --out=w2v2.msgpack``
``python -m d2vjax.convert --to=hf --in=w2v2.msgpack --out=hf_dir/``

Import: the source family is recognised from ``config.json`` (HF) or the keys (fairseq); the
architecture is read off the checkpoint (its config where it has one, else the tensor shapes)
and written over a d2vjax config (``--config``, default the matching ``configs/*.py``); every
source key is converted, or dropped with a stated reason, or the conversion fails naming it.
The output is an export (``.msgpack`` + ``.json`` sidecar with the config and the key
accounting) that ``d2vjax.export.load_model`` loads. Key names: fairseq-spec §12.1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from types import ModuleType
from typing import Callable

import ml_collections
import numpy as np

from d2vjax.convert import d2v2, rules as R, sources, speech, text, vision

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


@dataclasses.dataclass(frozen=True)
class Family:
  """One checkpoint family: its key tables (``module``) and the d2vjax config it maps onto."""
  name: str
  module: ModuleType
  config: Callable[[int], str]  # model width → default config file in configs/
  hf_type: str | None = None  # HF model_type for export


def _sized(base: str, large: str) -> Callable[[int], str]:
  return lambda dim: large if dim >= 1024 else base


FAMILIES = {
    ("hf", "wav2vec2"): Family("wav2vec2", speech, _sized("w2v2_base.py", "w2v2_large.py"),
                               "wav2vec2"),
    ("hf", "data2vec-audio"): Family("data2vec-audio", speech,
                                     _sized("speech_base.py", "speech_large.py"),
                                     "data2vec-audio"),
    ("hf", "data2vec-vision"): Family("data2vec-vision", vision,
                                      _sized("vision_base.py", "vision_large.py"),
                                      "data2vec-vision"),
    ("hf", "data2vec-text"): Family("data2vec-text", text, lambda d: "text_base.py",
                                    "data2vec-text"),
    ("fairseq", "wav2vec2"): Family("wav2vec2", speech, _sized("w2v2_base.py", "w2v2_large.py")),
    ("fairseq", "data2vec_audio"): Family("data2vec_audio", speech,
                                          _sized("speech_base.py", "speech_large.py")),
    ("fairseq", "data2vec_text"): Family("data2vec_text", text, lambda d: "text_base.py"),
}


def load_config(spec) -> ml_collections.ConfigDict:
  """A d2vjax config from ``'configs/x.py[:args]'`` (or a ConfigDict, copied)."""
  if isinstance(spec, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(spec.to_dict())
  path, _, arg = str(spec).partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(_CONFIGS, path)):
    path = os.path.join(_CONFIGS, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  mod_spec = importlib.util.spec_from_file_location("_d2vjax_convert_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def detect(fmt: str, state: dict, ckcfg: dict | None) -> str:
  """The family name of a checkpoint (HF: ``config.json`` model_type, else the keys)."""
  keys = set(state)
  has = lambda pattern: any(re.match(pattern, k) for k in keys)
  if fmt == "hf":
    if ckcfg and ckcfg.get("model_type"):
      return ckcfg["model_type"]
    if has(r"(\w+\.)?embeddings\.patch_embeddings\."):
      return "data2vec-vision"
    if has(r"(\w+\.)?embeddings\.word_embeddings\."):
      return "data2vec-text"
    if has(r"(\w+\.)?encoder\.pos_conv_embed\.layers\."):
      return "data2vec-audio"
    if has(r"(\w+\.)?feature_extractor\.conv_layers\."):
      return "wav2vec2"
  else:
    if has(r"modality_encoders\."):
      return "data2vec2"
    if has(r"encoder\.sentence_encoder\."):
      return "data2vec_text"
    if has(r"(w2v_encoder\.w2v_model\.)?feature_extractor\.conv_layers\."):
      name = str((ckcfg or {}).get("_name", ""))
      if name in ("wav2vec2", "data2vec_audio"):
        return name
      single = has(r"(w2v_encoder\.w2v_model\.)?encoder\.pos_conv\.0\.weight_v")
      return "wav2vec2" if single or has(r"quantizer\.") else "data2vec_audio"
  raise ValueError(f"unrecognised {fmt} checkpoint (keys like {sorted(keys)[:5]})")


def read(path: str, fmt: str) -> tuple[dict, dict | None]:
  """(numpy state dict, checkpoint config or None)."""
  if fmt == "hf":
    return sources.read_hf(path)
  if fmt == "fairseq":
    return sources.read_fairseq(path)
  raise ValueError(f"--from must be 'hf' or 'fairseq', got {fmt!r}")


def _shapes(objective, config) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  tree = jax.eval_shape(objective.init, jax.random.key(0),
                        objective.modality.dummy_batch(config.data))
  return {k: tuple(v.shape) for k, v in R.flatten(tree).items()}


def convert_state(state: dict, fmt: str, ckcfg: dict | None = None, config=None,
                  source: str = "") -> tuple[dict, ml_collections.ConfigDict, R.Report]:
  """Convert an in-memory state dict (numpy arrays, source key names).

  Args:
    state: source key → array.
    fmt: 'hf' or 'fairseq'.
    ckcfg: the checkpoint's own config (HF config.json / fairseq ``cfg.model``), or None.
    config: d2vjax config (ConfigDict or 'configs/x.py[:args]'); default by family and width.
  Returns:
    (params nested dict of float32 numpy arrays, the derived d2vjax config, the report).
  """
  from d2vjax import registry  # pylint: disable=g-import-not-at-top
  state = sources.to_numpy(state)
  family = detect(fmt, state, ckcfg)
  report = R.Report(source=source or f"{fmt}:{family}")
  if family == "data2vec2":
    flat, c, objective, shapes = d2v2.convert(state, ckcfg, config, report, load_config, _shapes)
    _fill_missing(flat, shapes, d2v2, objective, c, report)
    return R.unflatten(flat), c, report
  if (fmt, family) not in FAMILIES:
    raise ValueError(f"{fmt} family {family!r} is not supported; known: "
                     f"{sorted(f for _, f in FAMILIES)}")
  fam = FAMILIES[(fmt, family)]
  mod = fam.module
  state = mod.strip_prefix(state, fmt)
  if mod is text and fmt == "hf":
    state = text.fold_token_type(state, report)
  c = load_config(config if config is not None else fam.config(_width(state)))
  mod.derive(c, state, ckcfg, fmt, report)
  objective = registry.get("objective", c.objective)(c)
  shapes = _shapes(objective, c)
  flat = R.to_params(state, mod.rules(state, fmt, shapes), shapes, report)
  report.drop(state, mod.drops(fmt))
  report.check_complete(state)
  _fill_missing(flat, shapes, mod, objective, c, report)
  return R.unflatten(flat), c, report


def _width(state: dict) -> int:
  for k, v in state.items():
    if re.search(r"(fc1|intermediate_dense|intermediate\.dense)\.weight$", k):
      return int(v.shape[1])
  return 768


# Jitted fresh-init programs: (config, init data, leaf paths) → jitted init of those leaves.
_FRESH_INIT: dict = {}


def _fill_missing(flat, shapes, mod, objective, config, report) -> None:
  """Params the checkpoint lacks: structural identities, or fresh init where the family says a
  checkpoint may legitimately lack them; anything else is an error."""
  need = {}
  for path in sorted(set(shapes) - set(flat)):
    filled = getattr(mod, "identity_fill", lambda *_: None)(path, shapes[path])
    if filled is not None:
      flat[path], report.initialised[path] = filled
      continue
    reason = next((r for p, r in mod.FRESH if re.fullmatch(p, path)), None)
    if reason is None:
      raise KeyError(f"{report.source}: d2vjax parameter {path} {shapes[path]} has no source "
                     "key in the checkpoint")
    need[path] = reason
  if not need:
    return
  import jax  # pylint: disable=g-import-not-at-top
  # Param shapes do not depend on the input length: init on the family's shortest input. Only
  # the needed leaves leave the jitted init, so XLA drops the rest of the model; what remains is
  # their RNG, slow for XLA:CPU to compile (≈0.3 s per random leaf), so it is compiled at
  # optimisation level 1 (it runs once; values equal the default level's for the HF families)
  # and kept per architecture and leaf set for later conversions in the process.
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(getattr(mod, "INIT_DATA", {}))
  key = (config.to_json_best_effort(), data.to_json_best_effort(), tuple(sorted(need)))
  if key not in _FRESH_INIT:
    keep = frozenset(need)
    init = lambda rng, batch: {p: v for p, v in R.flatten(objective.init(rng, batch)).items()
                               if p in keep}
    _FRESH_INIT[key] = jax.jit(init, compiler_options={"xla_backend_optimization_level": 1})
  fresh = _FRESH_INIT[key](jax.random.key(0), objective.modality.dummy_batch(data))
  for path, reason in need.items():
    flat[path] = np.asarray(fresh[path], np.float32)
    report.initialised[path] = f"fresh init: {reason}"


def convert(path: str, fmt: str, config=None):
  """Read and convert a checkpoint file/directory: ``(params, config, report)``."""
  state, ckcfg = read(path, fmt)
  return convert_state(state, fmt, ckcfg, config, source=path)


def use_fairseq_padding(config, report: R.Report | None = None) -> None:
  """Switch a converted speech config's conv-stack positional encoder to fairseq's padding
  behaviour (``conv_stack_fairseq``: same params), in place; other configs are unchanged."""
  for section, key in ((config.model.get("encoder"), "pos_encoder"),
                       (config.model.get("context"), "rel_pos")):
    if section is not None and section.get(key) == "conv_stack":
      section[key] = "conv_stack_fairseq"
      if report is not None:
        report.notes.append(f"{key}=conv_stack_fairseq: padded frames leak into the last valid "
                            "ones exactly as in fairseq / HF")


def save(params: dict, config, report: R.Report, out: str) -> str:
  """Write ``out`` (msgpack) and its ``.json`` sidecar in ``d2vjax.export``'s format."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from d2vjax import export  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(serialization.msgpack_serialize(params))
  sidecar = {"config": json.loads(config.to_json_best_effort()), "subtree": "student",
             "step": None, "params_sha256": export.params_hash(params),
             "converted_from": report.summary()}
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(sidecar, f, indent=1)
  return out


def _cli() -> None:
  """Command line (``python -m d2vjax.convert``, see ``__main__``); flags are defined here so
  importing the package defines none."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  src = flags.DEFINE_enum("from", None, ["hf", "fairseq"], "Source checkpoint format.")
  dst = flags.DEFINE_enum("to", None, ["hf"], "Export a d2vjax .msgpack to this layout.")
  path = flags.DEFINE_string("in", None, "Checkpoint file/directory, or .msgpack with --to.")
  config = flags.DEFINE_string("config", None, "d2vjax config (configs/x.py[:args]) to map "
                               "onto; default: the family's configs/*.py")
  out = flags.DEFINE_string("out", None, "Output .msgpack (import) or directory (export).")
  inspect = flags.DEFINE_bool("inspect", False, "Only read and account for the keys.")
  fairseq_padding = flags.DEFINE_bool(
      "fairseq_padding", False, "Speech conv-stack positions: reproduce fairseq/HF on padded "
      "batches (padding zeroed once, pos_encoder=conv_stack_fairseq) instead of d2vjax's "
      "padding-invariant stack.")

  def main(argv):
    del argv
    if not path.value or (src.value is None) == (dst.value is None):
      raise app.UsageError("give --in and exactly one of --from / --to")
    if dst.value:
      if not out.value:
        raise app.UsageError("--out (a directory) is required")
      from d2vjax import export  # pylint: disable=g-import-not-at-top
      from d2vjax.convert import hf_export  # pylint: disable=g-import-not-at-top
      _, params, cfg = export.load_model(path.value)
      print(f"wrote {hf_export.export_hf(params, cfg, out.value)}")
      return
    if inspect.value:
      state, ckcfg = read(path.value, src.value)
      family = detect(src.value, state, ckcfg)
      if family == "data2vec2":
        inv = d2v2.inventory(state, ckcfg)
        inv["consumed"] = len(inv["consumed"])
        print(json.dumps(inv, indent=1, default=str))
        return
    if not out.value and not inspect.value:
      raise app.UsageError("--out is required (or --inspect)")
    params, cfg, report = convert(path.value, src.value, config.value)
    if fairseq_padding.value:
      use_fairseq_padding(cfg, report)
    print(json.dumps(report.summary(), indent=1))
    if not inspect.value:
      print(f"wrote {save(params, cfg, report, out.value)}")

  app.run(main)
