"""Multi-process start-up: ``jax.distributed.initialize`` when (and only when) the job is
multi-process (jax-style §4 "Multi-host initialisation").

Detection, in order:
1. explicit settings (flags or env ``D2V_COORDINATOR_ADDRESS``, ``D2V_NUM_PROCESSES``,
   ``D2V_PROCESS_ID``; e.g. the plain multi-node GPU launcher);
2. a cluster JAX auto-detects: Cloud TPU pod slices (``TPU_WORKER_HOSTNAMES`` with several hosts,
   or ``MEGASCALE_COORDINATOR_ADDRESS`` for multi-slice), SLURM with ``SLURM_NTASKS`` > 1, Open MPI
   (``OMPI_COMM_WORLD_SIZE`` > 1);
3. otherwise single-process: nothing to do.
Must run before any JAX computation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np


def _explicit(coordinator, num_processes, process_id):
  coordinator = coordinator or os.environ.get("D2V_COORDINATOR_ADDRESS")
  num = num_processes if num_processes is not None else os.environ.get("D2V_NUM_PROCESSES")
  pid = process_id if process_id is not None else os.environ.get("D2V_PROCESS_ID")
  given = [coordinator is not None, num is not None, pid is not None]
  if any(given) and not all(given):
    raise ValueError("multi-process settings need all of D2V_COORDINATOR_ADDRESS, "
                     f"D2V_NUM_PROCESSES and D2V_PROCESS_ID (got coordinator={coordinator!r}, "
                     f"num_processes={num!r}, process_id={pid!r})")
  return (coordinator, int(num), int(pid)) if all(given) else None


def _auto_detected_cluster() -> bool:
  env = os.environ
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return (len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialise the JAX multi-controller runtime if the job is multi-process; returns whether it
  did. A no-op when already initialised or when ``D2V_SINGLE_PROCESS=1``."""
  if os.environ.get("D2V_SINGLE_PROCESS") == "1" or jax.distributed.is_initialized():
    return False
  explicit = _explicit(coordinator, num_processes, process_id)
  if explicit is None and not _auto_detected_cluster():
    return False
  if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
    # Cross-process collectives on CPU (tests, CPU clusters) need an implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit is None:
    jax.distributed.initialize()
  else:
    coordinator, num, pid = explicit
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)
  return True


def fingerprint(*objs) -> str:
  """sha256 hex digest of plain data: dataclasses (field by field), NumPy arrays (dtype, shape,
  bytes), sequences, dicts, and scalars/strings by ``repr``. Equal on every host for equal data,
  unlike ``hash()`` (salted per process)."""
  h = hashlib.sha256()

  def feed(o):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
      h.update(type(o).__name__.encode())
      for f in dataclasses.fields(o):
        feed(getattr(o, f.name))
    elif isinstance(o, np.ndarray):
      h.update(f"{o.dtype}{o.shape}".encode())
      h.update(np.ascontiguousarray(o).tobytes())
    elif isinstance(o, dict):
      feed(sorted(o.items(), key=lambda kv: repr(kv[0])))
    elif isinstance(o, (list, tuple)):
      h.update(b"[")
      for x in o:
        feed(x)
      h.update(b"]")
    else:
      h.update(repr(o).encode())
    h.update(b";")

  for o in objs:
    feed(o)
  return h.hexdigest()


def check_same_across_processes(digest: str, what: str) -> None:
  """Raises in EVERY process if the hex ``digest`` differs between processes (a collective: all
  processes must call it). Hosts that cut different global batch plans would otherwise run
  different step counts or shapes and hang in a collective (user-needs D1)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  differ = [p for p in range(everyone.shape[0]) if not np.array_equal(everyone[p], everyone[0])]
  if differ:
    raise RuntimeError(
        f"{what} differs between processes: process(es) {differ} disagree with process 0 "
        f"(this is process {jax.process_index()}, digest {digest[:12]}). Every host must list "
        "the same examples (same manifest / folder / tfds split) so all walk one global plan")
