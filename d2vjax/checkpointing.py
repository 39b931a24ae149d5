"""Orbax checkpoints of the full train state, the grain iterator position and the config.

One ``ocp.CheckpointManager`` per workdir (jax-style §5), with three items per step directory:

* ``state``: the train-state dict (params, teacher, opt_state, step, ...) via ``StandardSave``;
  restored through ``StandardRestore(abstract_state)`` so every array lands directly in its target
  sharding, on any mesh or device count (user-needs E3/FM17);
* ``data_iter``: the grain iterator state (one JSON file per process), grain's own orbax handler;
* ``config``: the ConfigDict as JSON, so a checkpoint says how it was made (G3).

Never pickle. Saves are asynchronous by default: ``save`` returns once the arrays are copied to
host, so the caller may donate/overwrite the state right after; files are written in the
background and committed atomically (temporary directory, then rename or commit marker).

Interrupted writes (FM18): orbax itself skips ``*.orbax-checkpoint-tmp-*`` directories, but on a
local filesystem it lists any directory named by digits as a valid step, even one without its
commit marker or its metadata. ``make_manager`` therefore moves such directories aside (to
``<step>.incomplete-<ns>``; a stale, higher step would otherwise make orbax refuse every later
save, since it only saves steps above its latest), and ``restore_latest`` restores the newest step
that is complete and actually loads, falling back to older ones with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

__all__ = [
    "make_manager", "save", "restore_latest", "latest_step", "read_config", "restore_params_only",
    "wait", "PreemptionHandler", "complete_steps",
]

STATE, DATA_ITER, CONFIG = "state", "data_iter", "config"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax step-level metadata (holds the commit timestamp)
_COMMIT_FILE = "commit_success.txt"  # orbax commit marker (all backends since orbax 0.12)
_INCOMPLETE = ".incomplete-"


# --------------------------------------------------------------------------------------------
# Version shims (orbax 0.11 … 0.13, grain 0.2 … 0.3).
# --------------------------------------------------------------------------------------------

def _grain_checkpointing():
  """grain's orbax ``(handler_cls, save_args_cls, restore_args_cls)`` for this grain version."""
  try:
    from grain import checkpoint as gcp  # grain >= 0.2.13
    return gcp.CheckpointHandler, gcp.CheckpointSave, gcp.CheckpointRestore
  except (ImportError, AttributeError):
    import grain.python as gp  # older name of the same classes
    return gp.PyGrainCheckpointHandler, gp.PyGrainCheckpointSave, gp.PyGrainCheckpointRestore


def _manager_options(max_to_keep: int | None, save_interval_steps: int, async_save: bool,
                     cleanup_tmp: bool) -> ocp.CheckpointManagerOptions:
  fields = {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
  kw: dict[str, Any] = dict(enable_async_checkpointing=async_save, create=True,
                            cleanup_tmp_directories=cleanup_tmp)
  policies = getattr(ocp, "checkpoint_managers", None)
  if "save_decision_policy" in fields and hasattr(policies, "FixedIntervalPolicy"):
    # Explicit policy: the default one also saves the very first step it is asked about
    # (InitialSavePolicy), which is a surprise for "every N steps".
    kw["save_decision_policy"] = policies.AnySavePolicy([
        policies.FixedIntervalPolicy(max(1, int(save_interval_steps))),
        policies.PreemptionCheckpointingPolicy()])
  else:
    kw["save_interval_steps"] = max(1, int(save_interval_steps))
  if max_to_keep is not None:
    if "preservation_policy" in fields and hasattr(policies, "LatestN"):
      kw["preservation_policy"] = policies.LatestN(n=int(max_to_keep))  # max_to_keep is deprecated
    else:
      kw["max_to_keep"] = int(max_to_keep)
  return ocp.CheckpointManagerOptions(**kw)


def _tree_metadata(handler, path: epath.Path):
  """The saved pytree's metadata (ArrayMetadata leaves) of one ``state`` item directory."""
  md = handler.metadata(path)
  # orbax >= 0.11.x wraps the tree in a StepMetadata; older versions return the tree.
  return getattr(md, "item_metadata", md)


def _partial_restore_args(item, restore_args) -> ocp.args.PyTreeRestore:
  params = inspect.signature(ocp.args.PyTreeRestore).parameters
  if "partial_restore" in params:
    return ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  # Before partial_restore existed, an empty transform dict meant "only what the target names".
  return ocp.args.PyTreeRestore(item=item, restore_args=restore_args, transforms={})


# --------------------------------------------------------------------------------------------
# Step discovery and validation.
# --------------------------------------------------------------------------------------------

def _step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
  if not directory.exists():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def _is_complete(step_dir: epath.Path, require_commit_file: bool) -> bool:
  """Whether orbax finished committing ``step_dir`` (see the module docstring)."""
  meta = step_dir / _STEP_METADATA
  try:
    commit_ns = json.loads(meta.read_text()).get("commit_timestamp_nsecs")
  except (OSError, ValueError, AttributeError):
    return False
  if commit_ns is None:  # written at finalisation, before the rename / commit marker
    return False
  if require_commit_file and not (step_dir / _COMMIT_FILE).exists():
    return False
  return (step_dir / STATE).is_dir()


def _classify(directory: epath.Path) -> tuple[list[int], list[int]]:
  """``(complete, incomplete)`` step numbers, ascending."""
  dirs = _step_dirs(directory)
  # Orbax versions that write a commit marker write it in every finalised step directory; a
  # directory from such a version without it was interrupted. Older versions (atomic rename
  # only) wrote none, and their directories are judged by the commit timestamp alone.
  require = any((p / _COMMIT_FILE).exists() for p in dirs.values())
  complete, incomplete = [], []
  for step in sorted(dirs):
    (complete if _is_complete(dirs[step], require) else incomplete).append(step)
  return complete, incomplete


def complete_steps(directory) -> list[int]:
  """Ascending steps under ``directory`` whose checkpoint write was committed."""
  return _classify(epath.Path(directory))[0]


def latest_step(directory) -> int | None:
  """Newest committed step under ``directory``, or None (missing directory, no checkpoint)."""
  steps = complete_steps(directory)
  return steps[-1] if steps else None


def _quarantine_incomplete(directory: epath.Path) -> None:
  """Renames interrupted step directories so orbax neither lists nor counts them."""
  if jax.process_index() == 0 and directory.exists():
    _, incomplete = _classify(directory)
    for step in incomplete:
      src = directory / str(step)
      dst = directory / f"{step}{_INCOMPLETE}{time.time_ns()}"
      logging.warning("checkpointing: step %d in %s was not committed (interrupted write?); "
                      "moving it to %s and ignoring it.", step, directory, dst.name)
      src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("d2vjax_checkpoint_quarantine")


# --------------------------------------------------------------------------------------------
# Manager, save, restore.
# --------------------------------------------------------------------------------------------

def make_manager(directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 1000,
                 async_save: bool = True, with_data_iter: bool = True,
                 cleanup_incomplete: bool = True) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager (items ``state``, ``config`` and optionally ``data_iter``).

  Args:
    directory: checkpoint root (local path or any etils/epath URL such as ``gs://``); created.
    max_to_keep: newest steps kept on disk (None keeps all).
    save_interval_steps: ``save`` without ``force`` writes only steps divisible by this (and
      steps where JAX's preemption sync point was reached, on multi-host TPU/GPU runs).
    async_save: write in a background thread after the device-to-host copy.
    with_data_iter: register grain's iterator handler (disable for data pipelines without state).
    cleanup_incomplete: move interrupted step directories aside and let orbax delete its
      temporary ones (module docstring). Only the job that writes the directory may do this: set
      False in a job that merely watches another job's checkpoints (on object stores an
      in-flight save looks exactly like an interrupted one).

  Call from every process; on multi-host runs the clean-up synchronises them.
  """
  directory = epath.Path(directory)
  if cleanup_incomplete:
    _quarantine_incomplete(directory)
  handlers: dict[str, Any] = {STATE: ocp.StandardCheckpointHandler(),
                              CONFIG: ocp.JsonCheckpointHandler()}
  if with_data_iter:
    handlers[DATA_ITER] = _grain_checkpointing()[0]()
  return ocp.CheckpointManager(
      directory, options=_manager_options(max_to_keep, save_interval_steps, async_save,
                                          cleanup_tmp=cleanup_incomplete),
      item_handlers=handlers)


def _config_json(config) -> dict:
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict / FrozenConfigDict
    return json.loads(config.to_json_best_effort())
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(json.dumps(dict(config), default=repr))


def save(manager: ocp.CheckpointManager, step: int, state, *, data_iter=None, config=None,
         force: bool = False) -> bool:
  """Starts saving ``state`` (and the iterator position and config) as ``step``.

  Args:
    manager: from ``make_manager``.
    step: the number of updates done; the step directory's name.
    state: pytree of (possibly sharded) jax.Arrays. Safe to donate once this returns.
    data_iter: a grain ``DatasetIterator`` / ``DataLoaderIterator``; its position is captured
      during this call (grain's handler is synchronous).
    config: ConfigDict, dict or JSON string, stored as JSON.
    force: save even off the interval (preemption, end of training).

  Returns:
    True if a save was started; False when the interval says no, or ``step`` is already saved
    (e.g. a forced save right after the periodic one). With async saving, call ``wait`` before
    relying on the files.
  """
  step = int(step)
  if step in manager.all_steps():
    return False
  if not force and not manager.should_save(step):
    return False
  args = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    args[DATA_ITER] = _grain_checkpointing()[1](data_iter)
  if config is not None:
    args[CONFIG] = ocp.args.JsonSave(_config_json(config))
  # should_save was decided above; force=True skips orbax's second, identical check.
  return bool(manager.save(step, args=ocp.args.Composite(**args), force=True))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, data_iter=None):
  """Restores the newest complete checkpoint into the shardings named by ``abstract_state``.

  Args:
    manager: from ``make_manager``.
    abstract_state: pytree matching the saved state, of ``jax.ShapeDtypeStruct`` with
      ``.sharding`` set (e.g. ``jax.eval_shape(init)`` plus the trainer's shardings). The mesh may
      differ from the one that saved (another device count or layout).
    data_iter: a fresh grain iterator; its state is set in place from the same step.

  Returns:
    ``(state, step)`` or None when there is no checkpoint. A step that fails to load (truncated
    files) is skipped with a warning in favour of the previous one; if every step fails, the
    newest step's error is raised.
  """
  manager.reload()
  directory = epath.Path(manager.directory)
  complete = set(complete_steps(directory))
  steps = sorted((s for s in manager.all_steps() if s in complete), reverse=True)
  first_error = None
  for step in steps:
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if (directory / str(step) / DATA_ITER).exists():
        args[DATA_ITER] = _grain_checkpointing()[2](data_iter)
      else:
        logging.warning("checkpointing: step %d has no data-iterator state; the iterator starts "
                        "from its beginning.", step)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpointing: could not restore step %d from %s (%s: %s); trying the "
                      "previous step.", step, directory, type(e).__name__, e)
      first_error = first_error or e
      continue
    logging.info("checkpointing: restored step %d from %s", step, directory)
    return restored[STATE], step
  if first_error is not None:
    raise RuntimeError(f"no checkpoint in {directory} could be restored") from first_error
  return None


def read_config(directory, step: int | None = None) -> dict | None:
  """The config JSON stored with ``step`` (default: the newest complete one), or None.

  Any single process may call it (no cross-process synchronisation).
  """
  directory = epath.Path(directory)
  step = latest_step(directory) if step is None else step
  if step is None or not (directory / str(step) / CONFIG).exists():
    return None
  # Handler level, not a Checkpointer: no cross-process barrier, so one process may call this.
  return ocp.JsonCheckpointHandler().restore(directory / str(step) / CONFIG,
                                             args=ocp.args.JsonRestore())


def restore_params_only(directory, step: int | None = None, *, subtree: str = "params") -> dict:
  """One subtree of a saved state as host numpy arrays, without any target or mesh.

  For export and fine-tuning: the teacher and optimizer state are never read. Works on any
  machine, CPU included, whatever mesh saved the checkpoint, and from a single process of a
  multi-host job.

  Args:
    directory: checkpoint root written by ``make_manager``.
    step: default the newest complete step.
    subtree: key of the state dict to load (``params``, ``teacher``, …); ``a/b`` for nested keys.

  Returns:
    Nested dict of ``numpy.ndarray`` with the saved shapes and dtypes.
  """
  directory = epath.Path(directory)
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}")
  path = directory / str(step) / STATE
  keys = [k for k in subtree.split("/") if k]
  # Handler level, not a Checkpointer: no cross-process barrier (export runs on process 0).
  handler = ocp.PyTreeCheckpointHandler()
  try:
    sub = _tree_metadata(handler, path)
    for i, k in enumerate(keys):
      try:
        sub = sub[k]
      except (KeyError, TypeError):
        have = sorted(sub.keys()) if hasattr(sub, "keys") else type(sub).__name__
        raise KeyError(f"{'/'.join(keys[:i + 1])!r} not in the checkpoint at {path}; "
                       f"found {have}") from None
    as_np = lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
    leaf_args = lambda m: ocp.RestoreArgs(restore_type=np.ndarray)
    item, restore_args = jax.tree.map(as_np, sub), jax.tree.map(leaf_args, sub)
    for k in reversed(keys):
      item, restore_args = {k: item}, {k: restore_args}
    restored = handler.restore(path, args=_partial_restore_args(item, restore_args))
  finally:
    handler.close()
  for k in keys:
    restored = restored[k]
  return jax.tree.map(np.asarray, restored)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until background saves are committed (before exit, eval-only runs, export)."""
  manager.wait_until_finished()


# --------------------------------------------------------------------------------------------
# Preemption.
# --------------------------------------------------------------------------------------------

def _default_signals() -> tuple[int, ...]:
  return tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None))
               if s is not None)


class PreemptionHandler:
  """SIGTERM/SIGUSR1 → a stop flag the trainer polls (user-needs E2, FM19).

  The signal handler only sets the flag (no I/O, no locks: it runs between bytecodes of the main
  thread, possibly inside orbax or logging). The trainer polls ``should_stop`` in the train loop
  and in eval/host loops; on True it saves with ``force=True``, waits, and exits 0 so Slurm
  requeue / spot VMs resume from this step.

  With several processes, each sees only its own signal: either agree inside the step (feed the
  flag in and max-reduce it) or pass ``all_processes=True`` to ``should_stop`` (a host collective,
  so every process must call it at the same steps). ``manager.reached_preemption(step)``, JAX's
  own multi-host preemption notice, is consulted too.

  Usage::

    with PreemptionHandler() as stop:
      for step in ...:
        ...
        if stop.should_stop(manager, step):
          save(manager, step, state, data_iter=it, force=True); wait(manager); return
  """

  def __init__(self, signals: tuple[int, ...] | None = None):
    self.signals = tuple(_default_signals() if signals is None else signals)
    self._previous: dict[int, Any] = {}
    self._requested = False
    self._signum: int | None = None
    self._reported = False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._signum = signum
    self._requested = True

  def install(self) -> "PreemptionHandler":
    """Installs the handlers (main thread only), remembering the previous ones."""
    if self._previous:
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler.install must run in the main thread")
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were installed before ``install``."""
    for s, prev in self._previous.items():
      # None: the previous handler was not set from Python; the default action is the best guess.
      signal.signal(s, signal.SIG_DFL if prev is None else prev)
    self._previous = {}

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  @property
  def requested(self) -> bool:
    """Whether a stop signal arrived in this process."""
    return self._requested

  @property
  def signal_number(self) -> int | None:
    return self._signum

  def request(self) -> None:
    """Sets the flag by hand (time limits, tests)."""
    self._requested = True

  def reset(self) -> None:
    self._requested, self._signum, self._reported = False, None, False

  def should_stop(self, manager: ocp.CheckpointManager | None = None, step: int | None = None,
                  *, all_processes: bool = False) -> bool:
    """True when this process got a stop signal or JAX reached a preemption sync point.

    Args:
      manager: consulted via ``manager.reached_preemption(step)`` when both are given.
      step: current step.
      all_processes: OR the local flag over processes (a collective on every call).
    """
    stop = self._requested
    if all_processes and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.asarray([int(stop)], np.int32))
      stop = bool(np.max(flags))
    if not stop and manager is not None and step is not None:
      reached = getattr(manager, "reached_preemption", None)
      stop = bool(reached(int(step))) if reached is not None else False
    if stop and not self._reported:
      self._reported = True
      name = signal.Signals(self._signum).name if self._signum is not None else "preemption"
      logging.warning("Stop requested (%s) at step %s: saving and exiting.", name, step)
    return stop
