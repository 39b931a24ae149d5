r"""python bench/aot_memory.py --config=configs/speech_base.py [--topology=v5e:4x4] [--rows=R --bucket=S]

Ahead-of-time memory check: builds the trainer's exact step (``train.build``: mesh, sharding
rules, accumulation, remat, dtype), lowers it for the abstract sharded state and the first global
batch of the plan (the longest bucket: the memory-hungriest shape, which the trainer also runs
first) or an all-zero batch of ``--rows`` rows, compiles it and prints XLA's per-device memory
analysis. Nothing is allocated or run.

Devices: the local ones by default (e.g. 8 fake CPU devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), or a Cloud TPU topology that needs no TPU
attached (``--topology=v5e:4x4``, ``jax.experimental.topologies``; needs libtpu installed).
Numbers are bytes per device: arguments (state shard + batch shard), outputs, donated (aliased)
bytes, XLA temporaries (activations, gradients, collectives buffers), and their sum minus the
aliased bytes — the program's peak footprint on one device.
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from d2vjax import train


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:9.3f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:9.1f} MiB"


def devices_for(topology: str):
  """Local devices, or the compile-only devices of a TPU topology such as ``v5e:4x4``."""
  if not topology:
    return jax.devices()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"--topology={topology}: no compile-only TPU topology ({type(e).__name__}: "
                     f"{e}); this needs libtpu (pip install 'jax[tpu]')") from e


def state_bytes_per_device(abstract) -> int:
  """Σ over leaves of the bytes of one device's shard (the sharding rules' analytic answer)."""
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(abstract)))


def abstract_batch(config, setup, rows: int) -> dict:
  """Global batch as ShapeDtypeStructs: the plan's first batch (the longest bucket) read from the
  configured data, or with ``rows > 0`` the modality's all-zero batch of ``rows`` rows (its
  shortest configured bucket: pick it with ``--bucket=250000``), for
  shapes the local data cannot fill."""
  if rows:
    host = setup.modality.dummy_batch(config.data, rows)
  else:
    it = setup.modality.make_iterator(config.data, examples=setup.examples,
                                      seed=config.data.seed, batch_multiple=setup.row_multiple,
                                      batch_fn=setup.modality.mask_fn(config.masking))
    host, _ = train._host_batch(next(it))  # pylint: disable=protected-access
    close = getattr(it, "close", None)
    if close is not None:
      close()
  if rows % setup.row_multiple:
    raise SystemExit(f"--rows={rows} is not a multiple of {setup.row_multiple} (data × fsdp × "
                     "accum_steps)")
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
          for k, v in host.items()}


def analyse(config, devices, rows: int = 0) -> dict:
  """Lower + compile the train step for ``devices``; returns the memory numbers (bytes/device)."""
  setup = train.build(config, devices)
  abstract = train.abstract_state(setup)
  batch = abstract_batch(config, setup, rows)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(abstract, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out = {
      "devices": len(devices), "platform": devices[0].platform,
      "mesh": dict(setup.mesh.shape),
      "batch": {k: tuple(v.shape) for k, v in batch.items()},
      "compile_s": seconds,
      "state_shard_bytes": state_bytes_per_device(abstract),
  }
  if mem is None:  # some backends report nothing
    return out
  out.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
             alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
             code_bytes=mem.generated_code_size_in_bytes)
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def report(r: dict) -> str:
  lines = [f"{r['devices']} {r['platform']} devices, mesh {r['mesh']}, global batch {r['batch']}",
           f"compile {r['compile_s']:.1f} s",
           f"per device: train state shard {_gib(r['state_shard_bytes'])} (from the shardings)"]
  for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes",
              "peak_bytes"):
    if key in r:
      lines.append(f"  {key[:-6]:<9} {_gib(r[key])}  ({r[key]:,} B)")
  return "\n".join(lines)


def main():
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                           lock_config=True)
  topology = flags.DEFINE_string("topology", "", "TPU topology to compile for, e.g. v5e:4x4 "
                                 "(default: the local devices).")
  rows = flags.DEFINE_integer("rows", 0, "Global rows of an all-zero batch of the shortest "
                              "configured bucket (0: the first batch of the data plan).")
  bucket = flags.DEFINE_integer("bucket", 0, "Replace data.buckets by this one length (a list "
                                "field cannot be overridden by --config flags).")

  def run(argv):
    del argv
    cfg = config.value
    if bucket.value:
      cfg.data.buckets = [bucket.value]
    print(report(analyse(cfg, devices_for(topology.value), rows.value)), flush=True)

  app.run(run)


if __name__ == "__main__":
  main()
