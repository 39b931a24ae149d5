r"""Self-supervised pre-training: ``python -m d2vjax.train --config=configs/speech_base.py --workdir=DIR``.

Read top to bottom: config → devices → data (host) → model/objective → state → checkpoint/resume →
jitted step → loop (metrics, guards, checkpoints, preemption) → export. Everything modality- or
objective-specific comes from the registry (``config.modality``, ``config.objective``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

from absl import app, flags, logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from d2vjax import checkpointing, configs_lib, distributed, loop, metrics as metrics_lib
from d2vjax import optim, probe, registry, sharding, step as step_lib

# Exit codes of `run` (0 = finished or preempted-and-saved).
EXIT_COLLAPSED = 3


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
  """EMA decay schedule with the anneal length resolved to steps."""
  decay: float
  end_decay: float
  anneal_steps: int


# Device arrays / host metadata of a pipeline batch (tests and bench/ use it too).
_host_batch = loop.split_host


@dataclasses.dataclass
class Setup:
  """What ``build`` derives from a config before any data is loaded or state created: the mesh,
  the objective, the data plan, the abstract state with its shardings, and the jitted
  step. ``run`` trains with it; ``bench/aot_memory.py`` compiles its step ahead of time."""
  mesh: Any
  objective: Any
  examples: Any
  skipped: dict
  plan: Any
  total_steps: int
  rng: jax.Array
  init_fn: Any
  state_shape: Any
  state_sharding: Any
  batch_sharding: NamedSharding
  row_multiple: int
  total_params: int
  train_step: sharding.MeshStep

  @property
  def modality(self):
    return self.objective.modality


def build(config, devices) -> Setup:
  """Mesh over ``devices`` (``config.mesh``, ``config.dcn_mesh``), data plan, model, optimizer,
  sharded abstract state and the jitted, mesh-aware, compile-counting train step."""
  mesh = sharding.make_mesh(config.mesh, devices, config.get("dcn_mesh", ()))
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  # Every micro-batch must split evenly over the data-parallel devices.
  row_multiple = sharding.batch_size_multiple(mesh) * config.accum_steps
  print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices, {jax.process_count()} "
        "process(es)", flush=True)

  # ------------------------------------------------------------------ data plan (host, NumPy)
  objective = registry.get("objective", config.objective)(config)
  modality = objective.modality
  examples, skipped = modality.examples(config.data, "train")
  logging.info("train examples: %d (skipped at scan: %s)", len(examples), skipped)
  plan = modality.batch_plan(config.data, examples, row_multiple)
  steps_per_epoch = plan.total_batches
  shapes = sorted(plan.shapes())
  print(f"batch shapes (rows, samples): {shapes} — {len(shapes)} compiled step programs at most; "
        f"{steps_per_epoch} steps per epoch", flush=True)
  total_steps = configs_lib.resolve_steps(config, "total", steps_per_epoch=steps_per_epoch,
                                          total_steps=None)
  if objective.ema_scope:
    ema_cfg = EmaSchedule(config.ema.decay, config.ema.end_decay, configs_lib.resolve_steps(
        config.ema, "anneal", steps_per_epoch=steps_per_epoch, total_steps=total_steps))
  else:  # no teacher (wav2vec 2.0): a frozen, empty EMA
    ema_cfg = EmaSchedule(1.0, 1.0, 0)
  warmup = configs_lib.resolve_steps(config.optim, "warmup", steps_per_epoch=steps_per_epoch,
                                     total_steps=total_steps, default=0)

  # ------------------------------------------------------------------ model, optimizer, state
  lr_fn = optim.make_schedule(config.optim, total_steps, warmup)
  dummy = modality.dummy_batch(config.data)
  rng = jax.random.key(config.seed)
  params_shape = jax.eval_shape(objective.init, rng, dummy)
  tx = optim.make_optimizer(config.optim, lr_fn, params_shape, objective.frozen)
  init_fn = lambda r: step_lib.init_state(objective, tx, r, dummy)
  state_shape = jax.eval_shape(init_fn, rng)
  state_sharding = sharding.state_shardings(state_shape, mesh, config.sharding_rules)
  rows, total_params = metrics_lib.parameter_table(state_shape["params"])
  print(metrics_lib.format_parameter_table(rows, total_params), flush=True)

  # ------------------------------------------------------------------ jitted step
  step_fn = step_lib.make_train_step(objective, tx, lr_fn, ema_cfg, config.seed,
                                     config.accum_steps)
  max_compiles = config.get("max_step_compiles", 0) or len(shapes)
  train_step = sharding.MeshStep(step_fn, mesh, in_shardings=(state_sharding, batch_sharding),
                                 out_shardings=(state_sharding, replicated), donate_argnums=(0,),
                                 max_compiles=max_compiles, name="train step")
  return Setup(mesh, objective, examples, skipped, plan, total_steps, rng, init_fn,
               state_shape, state_sharding, batch_sharding, row_multiple, total_params,
               train_step)


def abstract_state(setup: Setup):
  """The train state as ``ShapeDtypeStruct``s carrying their shardings (restore / AOT target)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      setup.state_shape, setup.state_sharding)


def run(config, workdir: str) -> int:
  """Trains according to ``config`` in ``workdir``; resumes from the newest checkpoint there.

  Returns the process exit code: 0 when finished (or preempted after saving), 3 when the collapse
  guard stopped the run (after saving).
  """
  os.makedirs(workdir, exist_ok=True)
  logging.info("config:\n%s", config)

  devices = jax.devices()
  n_dev = config.num_devices or len(devices)
  if n_dev > len(devices):
    raise ValueError(f"num_devices={n_dev} but only {len(devices)} devices are visible")
  setup = build(config, devices[:n_dev])
  modality, examples, total_steps = setup.modality, setup.examples, setup.total_steps
  total_params, train_step, batch_sharding = setup.total_params, setup.train_step, \
      setup.batch_sharding
  process_index, process_count = jax.process_index(), jax.process_count()
  # All hosts must cut the same global batches (same count per epoch, same shapes): fail loudly
  # in every process, before any step, if their example lists differ.
  distributed.check_same_across_processes(
      distributed.fingerprint(setup.plan, len(examples)), "the global batch plan")

  # ------------------------------------------------------------------ checkpoint / resume
  manager = checkpointing.make_manager(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
      save_interval_steps=config.ckpt_every, async_save=config.async_checkpointing)
  data_iter = modality.make_iterator(
      config.data, examples=examples, seed=config.data.seed, batch_multiple=setup.row_multiple,
      process_index=process_index, process_count=process_count,
      batch_fn=modality.mask_fn(config.masking))
  abstract = abstract_state(setup)
  restored = checkpointing.restore_latest(manager, abstract, data_iter=data_iter)
  if restored is not None:
    state, start_step = restored
    print(f"resumed from step {start_step} in {workdir}", flush=True)
  else:
    state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(setup.rng)
    start_step = 0

  # ------------------------------------------------------------------ loop
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  writer.write_text(start_step, "config", config.to_json_best_effort())
  log = loop.StepLog(writer, total_steps, modality.unit, start_step, bad_counts=setup.skipped,
                     total_params=total_params)
  guard = metrics_lib.CollapseGuard(config.guard.min_value, config.guard.patience,
                                    key=config.guard.key)
  # Optional linear probes on frozen features (config.probe.every > 0); labelled data is read once.
  prober = probe.make_prober(config, setup.objective, batch_sharding,
                             sharding.batch_size_multiple(setup.mesh))
  preemption = checkpointing.PreemptionHandler().install()
  exit_code, stop_reason = 0, "finished"
  last_scalars: dict[str, float] = {}
  # Last logged losses, in every process's summary (hosts must agree step by step).
  recent_losses: collections.deque = collections.deque(maxlen=16)
  step = start_step
  try:
    while step < total_steps:
      batch, units = log.device_batch(next(data_iter), batch_sharding, modality.batch_units,
                                      process_count)
      state, _ = log.run_step(train_step, state, batch, step + 1, units)
      step += 1
      # The log flush leaves the newest step pending: no stall on the device.
      flushed = log.maybe_log(step, config.log_every, {"compiles": train_step.compiles})
      if flushed is not None:
        log_step, scalars = flushed
        last_scalars = scalars
        recent_losses.append((log_step, scalars.get("loss")))
        message = guard.check(log_step, scalars) if log_step >= config.guard.start_step else None
        if message:
          print(message, flush=True)
          exit_code, stop_reason = EXIT_COLLAPSED, "collapsed"
          break
      probed = prober.maybe_run(step, state["params"]) if prober is not None else None
      if probed:
        writer.write_scalars(step, probed)
      checkpointing.save(manager, step, state, data_iter=data_iter, config=config)
      stop = loop.stop_reason(config, manager, preemption, step)
      if stop:
        stop_reason = stop
        break
    # Whatever stopped the loop, nothing already trained is lost.
    tail = log.drain({"compiles": train_step.compiles})
    if tail is not None:
      last_scalars = tail[1]
      recent_losses.append((tail[0], tail[1].get("loss")))
    checkpointing.save(manager, step, state, data_iter=data_iter, config=config, force=True)
    checkpointing.wait(manager)
  finally:
    loop.close_all(preemption, log, writer, data_iter)

  summary = {"stop_reason": stop_reason, "step": step, "compiles": train_step.compiles,
             "last_loss": last_scalars.get("loss"), "recent_losses": list(recent_losses),
             "process_index": process_index, **log.summary()}
  loop.finish(workdir, stop_reason, step, summary, what="student")
  manager.close()
  return exit_code


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exports.")

  def main(argv: Any) -> None:
    del argv
    distributed.maybe_initialize()
    if workdir.value is None:
      raise app.UsageError("--workdir is required")
    code = run(config.value, workdir.value)
    if code:
      raise SystemExit(code)

  jax.config.config_with_absl()
  app.run(main)


if __name__ == "__main__":
  _cli()
