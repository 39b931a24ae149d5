"""Meshes and shardings: a (data, fsdp[, tensor]) mesh with Auto axes, big_vision-style regex FSDP
rules for the state, and global batches from per-process NumPy data (jax-style §4).

The partitioner (XLA SPMD / Shardy) does the communication: parameters, optimizer state and the
EMA teacher are sharded by the rules, the batch is split over ``data × fsdp``, and ``jax.jit``
inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from d2vjax.ema import path_str

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both (FSDP is data-parallel)


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Mesh from ``[(name, size), ...]``; one size may be -1 (fills the remaining devices).

  Axis types are Auto (``jax.make_mesh`` defaults to Explicit, under which Linen sharding
  constraints become assertions). Devices are laid out by ``mesh_utils.create_device_mesh`` so the
  innermost axis follows the fastest interconnect on TPU/GPU.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(n for n, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {axes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {axes}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {axes} needs {int(np.prod(sizes))} devices, {len(devices)} given")
  try:
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    arr = np.asarray(devices).reshape(sizes)  # e.g. fake CPU devices, uneven topologies
  return Mesh(arr, names, axis_types=(AxisType.Auto,) * len(names))


def batch_size_multiple(mesh: Mesh) -> int:
  """Rows of a global batch must be a multiple of this (the data-parallel device count)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data × fsdp; other dimensions replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


def _fsdp_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """First matching rule decides: ``replicate`` or ``fsdp`` (largest divisible dimension,
  never the stacked-layer axis of scanned params, tensors below ``min_size`` replicated)."""
  n = mesh.shape.get("fsdp", 1)
  for pattern, op in rules:
    if not re.fullmatch(pattern, path):
      continue
    if op == "replicate" or n == 1 or int(np.prod(shape or (1,))) < _MIN_SIZE:
      return P()
    if op != "fsdp":
      raise ValueError(f"sharding rule op must be 'fsdp' or 'replicate', got {op!r}")
    skip = 1 if re.search(r"(^|/)layers/", path) else 0
    dims = sorted(range(skip, len(shape)), key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % n == 0:
        spec = [None] * len(shape)
        spec[d] = "fsdp"
        return P(*spec)
    return P()
  return P()


_MIN_SIZE = 2 ** 14  # elements; smaller tensors (biases, norms, scalars) stay replicated


def state_shardings(abstract_state, mesh: Mesh, rules=((".*", "fsdp"),)):
  """NamedShardings for every leaf of ``abstract_state`` (arrays or ShapeDtypeStructs).

  ``rules``: ``[(path regex, 'fsdp' | 'replicate'), ...]`` matched against '/'-joined paths such
  as ``params/encoder/layers/fc1/kernel`` or ``opt_state/0/mu/encoder/...``; the optimizer moments
  and the teacher get the same layout as the params they mirror because the rule depends only on
  the path suffix and the shape.
  """
  def one(path, leaf):
    return NamedSharding(mesh, _fsdp_spec(path_str(path), tuple(leaf.shape), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This process's rows (NumPy) → global ``jax.Array``s (``make_array_from_process_local_data``)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
