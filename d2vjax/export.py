r"""Export trained parameters to msgpack, and load them back into the model.

``python -m d2vjax.export --workdir=DIR --out=FILE.msgpack [--teacher]``

Writes ``FILE.msgpack`` (flax.serialization msgpack of a plain nested dict of arrays; never pickle)
and ``FILE.json`` (the run's config, the exported subtree and a parameter hash), so the loader can
rebuild the model without the checkpoint or the mesh that trained it.
"""

from __future__ import annotations

import hashlib
import json
import os

from absl import app, flags
from flax import serialization
import ml_collections
import numpy as np

from d2vjax import checkpointing, registry


def params_hash(params) -> str:
  """sha256 over the sorted leaf paths, shapes, dtypes and bytes (identifies an export)."""
  flat = serialization.to_state_dict(params)
  h = hashlib.sha256()

  def walk(prefix, node):
    if isinstance(node, dict):
      for k in sorted(node):
        walk(f"{prefix}/{k}", node[k])
    else:
      a = np.asarray(node)
      h.update(f"{prefix}:{a.shape}:{a.dtype}".encode())
      h.update(np.ascontiguousarray(a).tobytes())

  walk("", flat)
  return h.hexdigest()


def export_workdir(workdir: str, out: str, *, teacher: bool = False, step: int | None = None) -> str:
  """Write the student params (or, with ``teacher``, the teacher merged over the student) of the
  newest checkpoint in ``workdir`` to ``out`` (msgpack) plus ``out``'s ``.json`` sidecar.

  Returns the msgpack path. Runs on one process, on any machine (no mesh needed).
  """
  ckpt = os.path.join(workdir, "checkpoints")
  params = checkpointing.restore_params_only(ckpt, step)
  if teacher:
    # The teacher holds only the EMA'd subtrees; the rest of the network is the student's.
    params = {**params, **checkpointing.restore_params_only(ckpt, step, subtree="teacher")}
  config = checkpointing.read_config(ckpt, step)
  if config is None:
    raise FileNotFoundError(f"no config stored with the checkpoint in {ckpt}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(serialization.msgpack_serialize(params))
  sidecar = {"config": config, "subtree": "teacher" if teacher else "student",
             "step": step if step is not None else checkpointing.latest_step(ckpt),
             "params_sha256": params_hash(params)}
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(sidecar, f, indent=1)
  return out


def load_params(path: str) -> dict:
  """The nested dict of numpy arrays stored in a msgpack export."""
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def load_model(path: str):
  """``(objective, params, config)`` from an export: the objective (``encode`` gives features)
  rebuilt from the sidecar config, and params whose structure is checked against it."""
  with open(os.path.splitext(path)[0] + ".json") as f:
    sidecar = json.load(f)
  config = ml_collections.ConfigDict(sidecar["config"])
  objective = registry.get("objective", config.objective)(config)
  params = load_params(path)
  import jax  # pylint: disable=g-import-not-at-top
  expected = jax.eval_shape(objective.init, jax.random.key(0),
                            objective.modality.dummy_batch(config.data))
  got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
  want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), expected)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError(f"{path}: parameter tree does not match the model built from its config")
  return objective, params, config


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  workdir = flags.DEFINE_string("workdir", None, "Training run directory.")
  out = flags.DEFINE_string("out", None, "Output .msgpack path.")
  teacher = flags.DEFINE_bool("teacher", False, "Export the EMA teacher instead of the student.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")

  def main(argv):
    del argv
    if not workdir.value or not out.value:
      raise app.UsageError("--workdir and --out are required")
    path = export_workdir(workdir.value, out.value, teacher=teacher.value, step=step.value)
    print(f"wrote {path}")

  app.run(main)


if __name__ == "__main__":
  _cli()
