"""Meshes and shardings: a (data, fsdp[, tensor]) mesh with Auto axes (hybrid ICI × DCN for
multi-slice TPU), big_vision-style regex rules for the state (FSDP and Megatron-style tensor
parallelism), activation constraints, global batches from per-process NumPy data (jax-style §4),
and the jitted step wrapper that runs under the mesh and counts its compiled programs.

The partitioner (XLA SPMD / Shardy) does the communication: parameters, optimizer state and the
EMA teacher are sharded by the rules, the batch is split over ``data × fsdp``, and ``jax.jit``
inserts the all-gathers, reduce-scatters and all-reduces.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from d2vjax.ema import path_str

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both (FSDP is data-parallel)


def _resolve_sizes(axes: Sequence[tuple[str, int]], num_devices: int) -> list[int]:
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {axes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {axes}: {num_devices} devices not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {axes} needs {int(np.prod(sizes))} devices, {num_devices} given")
  return sizes


def device_grid(axes: Sequence[tuple[str, int]], devices: Sequence[Any],
                dcn_axes: Sequence[tuple[str, int]] = ()) -> np.ndarray:
  """Devices arranged as the mesh ``axes`` (``[(name, size), ...]``, sizes are GLOBAL, one may be
  -1 = the rest), an object array of shape ``[size, ...]``.

  ``dcn_axes`` (``[(name, slices), ...]``, names among ``axes``): how many slices each axis spans
  over the data-centre network on multi-slice TPU. The product must equal the number of slices
  (distinct ``device.slice_index``); each axis is then ``slices × (size / slices)``, the inner
  factor inside one slice on ICI (``mesh_utils.create_hybrid_device_mesh``). Devices without
  ``slice_index`` (CPU, GPU) cannot form a hybrid mesh: a clear error unless every DCN size is 1.
  """
  devices = list(devices)
  names = [n for n, _ in axes]
  sizes = _resolve_sizes(axes, len(devices))
  dcn = dict(dcn_axes or ())
  unknown = sorted(set(dcn) - set(names))
  if unknown:
    raise ValueError(f"dcn_mesh axes {unknown} are not mesh axes {names}")
  dcn_sizes = [int(dcn.get(n, 1)) for n in names]
  if int(np.prod(dcn_sizes)) > 1:
    if not all(hasattr(d, "slice_index") for d in devices):
      kinds = sorted({getattr(d, "platform", type(d).__name__) for d in devices})
      raise ValueError(f"dcn_mesh={tuple(dcn_axes)} needs multi-slice TPU devices (with "
                       f"slice_index); these are {kinds} devices: set dcn_mesh=() and use mesh")
    slices = len({d.slice_index for d in devices})
    if slices != int(np.prod(dcn_sizes)):
      raise ValueError(f"dcn_mesh={tuple(dcn_axes)} spans {int(np.prod(dcn_sizes))} slices but the "
                       f"devices come from {slices} slice(s)")
    for n, s, k in zip(names, sizes, dcn_sizes):
      if s % k:
        raise ValueError(f"mesh axis {n}={s} is not divisible by its dcn_mesh size {k}")
    ici = [s // k for s, k in zip(sizes, dcn_sizes)]
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_sizes, devices)
  try:
    return mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    return np.asarray(devices).reshape(sizes)  # e.g. fake CPU devices, uneven topologies


def make_mesh(axes: Sequence[tuple[str, int]], devices=None,
              dcn_axes: Sequence[tuple[str, int]] = ()) -> Mesh:
  """Mesh from ``[(name, size), ...]`` (see ``device_grid``; ``dcn_axes`` for multi-slice).

  Axis types are Auto (``jax.make_mesh`` defaults to Explicit, under which Linen sharding
  constraints become assertions). Devices are laid out by ``mesh_utils`` so the innermost axis
  follows the fastest interconnect on TPU/GPU.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(n for n, _ in axes)
  grid = device_grid(axes, devices, dcn_axes)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def batch_size_multiple(mesh: Mesh) -> int:
  """Rows of a global batch must be a multiple of this (the data-parallel device count)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data × fsdp; other dimensions replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


# Rule ops, joined with '+' (e.g. 'tensor_out+fsdp'). Megatron-style tensor parallelism: the
# first projection of a block (fc1, q/k/v) is split on its output dimension, the second (fc2,
# out_proj) on its input dimension, so the pair needs one all-reduce and no gather in between.
OPS = ("replicate", "fsdp", "tensor_out", "tensor_in")
_MIN_SIZE = 2 ** 14  # elements; smaller tensors (biases, norms, scalars) are never fsdp-sharded


def _param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """The first rule whose regex fully matches ``path`` decides.

  ``fsdp``: the largest free dimension divisible by the fsdp size (never the stacked-layer axis of
  scanned params; tensors below ``_MIN_SIZE`` elements stay replicated). ``tensor_out`` /
  ``tensor_in``: a kernel ``[in, *out]`` (after the stacked-layer axis) is split over ``tensor``
  on its first output / its input dimension; an indivisible dimension is an error (silently
  replicating would drop the model parallelism the config asked for).
  """
  for pattern, op in rules:
    if not re.fullmatch(pattern, path):
      continue
    ops = op.split("+")
    bad = [o for o in ops if o not in OPS]
    if bad:
      raise ValueError(f"sharding rule ({pattern!r}, {op!r}): unknown op(s) {bad}; known {OPS}")
    spec = [None] * len(shape)
    if "replicate" in ops:
      return P()
    skip = 1 if re.search(r"(^|/)layers/", path) else 0
    t = mesh.shape.get("tensor", 1)
    for name, offset in (("tensor_in", 0), ("tensor_out", 1)):
      if name in ops and t > 1:
        d = skip + offset
        if d >= len(shape) or shape[d] % t:
          raise ValueError(f"sharding rule ({pattern!r}, {op!r}): {path} {shape} has no "
                           f"dimension {d} divisible by tensor={t}")
        spec[d] = "tensor"
    n = mesh.shape.get("fsdp", 1)
    if "fsdp" in ops and n > 1 and int(np.prod(shape or (1,))) >= _MIN_SIZE:
      free = [d for d in range(skip, len(shape)) if spec[d] is None and shape[d] % n == 0]
      if free:
        spec[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    return P(*spec) if any(spec) else P()
  return P()


def state_shardings(abstract_state, mesh: Mesh, rules=((".*", "fsdp"),)):
  """NamedShardings for every leaf of ``abstract_state`` (arrays or ShapeDtypeStructs).

  ``rules``: ``[(path regex, ops), ...]`` (ops from ``OPS`` joined by '+') matched against
  '/'-joined paths such as ``params/encoder/layers/fc1/kernel`` or ``opt_state/0/mu/encoder/...``;
  the optimizer moments and the teacher get the same layout as the params they mirror because the
  rule depends only on the path suffix and the shape.
  """
  def one(path, leaf):
    return NamedSharding(mesh, _param_spec(path_str(path), tuple(leaf.shape), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def constrain_activation(x: jax.Array, tensor_dim: int | None = None) -> jax.Array:
  """Pins an activation's layout when a mesh is active (``jax.set_mesh``), else returns ``x``.

  Dimension 0 (batch) goes over ``data × fsdp``, ``tensor_dim`` (if given) over ``tensor``;
  dimensions that do not divide evenly, and axes the mesh lacks, are left to the partitioner.
  A no-op without a mesh (single device, unit tests), so model code can call it unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim == 0:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  spec = [None] * x.ndim
  batch = tuple(a for a in BATCH_AXES if a in sizes)
  if batch and x.shape[0] % int(np.prod([sizes[a] for a in batch])) == 0:
    spec[0] = batch
  if tensor_dim is not None and "tensor" in sizes and x.shape[tensor_dim] % sizes["tensor"] == 0:
    spec[tensor_dim] = "tensor"
  if all(s is None for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This process's rows (NumPy) → global ``jax.Array``s (``make_array_from_process_local_data``)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class CompileLimitError(RuntimeError):
  """More step programs were compiled than the configured bound (a shape is not static)."""


class MeshStep:
  """``jax.jit(fn, in_shardings, out_shardings, donate_argnums)`` called under ``jax.set_mesh``
  (so ``constrain_activation`` is active while tracing) and counting its compiled programs.

  ``compiles`` is the number of traces, i.e. of distinct input signatures (shapes, dtypes,
  shardings) that produced a new program. With ``max_compiles > 0`` the trace that would exceed
  it raises ``CompileLimitError`` before compiling (and before the donated state is consumed).
  """

  def __init__(self, fn: Callable, mesh: Mesh, *, in_shardings=None, out_shardings=None,
               donate_argnums=(), max_compiles: int = 0, name: str = "step"):
    self.mesh, self.max_compiles, self.name = mesh, int(max_compiles), name
    self.compiles = 0
    self.signatures: list[Any] = []

    def traced(*args):
      self.compiles += 1
      self.signatures.append(jax.tree.map(lambda a: (a.shape, str(a.dtype)), args[1:]))
      if self.max_compiles and self.compiles > self.max_compiles:
        raise CompileLimitError(
            f"{self.name}: compiling program #{self.compiles} exceeds max_step_compiles="
            f"{self.max_compiles}; input shapes so far: {self.signatures}. Every batch shape "
            "must come from the bucket plan (set config.max_step_compiles to raise the bound)")
      return fn(*args)

    self._jit = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                        donate_argnums=donate_argnums)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self._jit(*args)

  def lower(self, *args):
    """``jax.jit(...).lower`` under the mesh (ahead-of-time compilation, HLO inspection)."""
    with jax.set_mesh(self.mesh):
      return self._jit.lower(*args)
