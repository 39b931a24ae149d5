r"""Fine-tuning of a pre-trained model: CTC speech recognition, image classification, sentence
classification / regression.

``python -m d2vjax.finetune --config=configs/ctc_base_10m.py --init=PRE --workdir=DIR``
(also ``configs/vision_cls_base.py``, ``configs/text_cls_base.py``, docs/finetuning.md)

``--init`` is a pre-training run directory (its newest checkpoint) or an exported ``.msgpack``
(with its ``.json`` sidecar); without it the model trains from scratch. The pre-trained config
supplies the architecture and the pre-training objective; the pre-training heads are dropped.
Everything task-specific — data and labels, the batch hook, checks against the pre-trained model
(e.g. the CTC waveform normalisation, spec §1.1), validation and the metric that picks the best
checkpoint — comes from the registry's ``finetune_task`` named like ``config.objective``
(``d2vjax/tasks/``).

Read top to bottom, like ``train.py``: config + pre-trained checkpoint → devices → data
(host) → resolved config → model/objective → state → checkpoint/resume → jitted step → loop
(metrics, validation at an interval, best checkpoint, preemption) → export.

What a run leaves in ``--workdir`` besides ``train.py``'s files: ``best/<step>/`` (params of the
best validation score so far), ``best.json`` (its step and scores) and the task's files (CTC:
``dict.ltr.txt``, fairseq's letter dictionary).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np

from d2vjax import checkpointing, configs_lib, distributed, evaluate, export, loop
from d2vjax import metrics as metrics_lib, optim, registry, sharding, train
from d2vjax import step as step_lib
# The CTC task's config helpers, under the names the fine-tuning API has always exported.
from d2vjax.tasks.ctc import NormalizeMismatchError, check_normalize, resolve_config  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Pre-trained checkpoints.


def load_init(path: str, *, with_params: bool = True) -> tuple[dict | None, dict]:
  """``(params, config)`` of a pre-training (or fine-tuning) run directory, a checkpoint root, or
  an exported ``.msgpack``; ``params`` are host numpy arrays of the student (None unless
  ``with_params``), ``config`` the run's stored config as a dict."""
  if os.path.isfile(path):
    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(sidecar):
      raise FileNotFoundError(f"{path}: no {sidecar} beside it (python -m d2vjax.export writes "
                              "both); the config is needed to rebuild the model")
    with open(sidecar) as f:
      config = json.load(f)["config"]
    return (export.load_params(path) if with_params else None), config
  ckpt = os.path.join(path, evaluate.CKPT_DIR)
  ckpt = ckpt if os.path.isdir(ckpt) else path
  config = checkpointing.read_config(ckpt)
  if config is None:
    raise FileNotFoundError(f"--init={path}: no checkpoint with a stored config (expected a run "
                            f"directory with {evaluate.CKPT_DIR}/ or an exported .msgpack)")
  return (checkpointing.restore_params_only(ckpt) if with_params else None), config


def pretrained_subtrees(objective, params_shape: dict, pretrained: dict) -> dict:
  """The pre-trained subtrees the fine-tuning model reuses (``frontend``, ``encoder``, for
  data2vec 2.0 ``context``, for learned masks ``mask_emb``), shape-checked against the model.
  The rest of the checkpoint (heads, quantizer, projections, decoder) is dropped."""
  out = {}
  for key in objective.pretrained_keys():
    if key not in params_shape:  # e.g. ``context``: only data2vec 2.0 models have one
      continue
    if key not in pretrained:
      if key == "mask_emb":
        logging.warning("the pre-trained checkpoint has no mask_emb: the fine-tuning mask "
                        "embedding starts from U[0,1)")
        continue
      raise KeyError(f"pre-trained params have no {key!r} (found {sorted(pretrained)})")
    got = jax.tree.map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), pretrained[key])
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), params_shape[key])
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
      raise ValueError(f"pre-trained {key!r} does not match the model built from its config")
    out[key] = pretrained[key]
  dropped = sorted(set(pretrained) - set(out))
  print(f"initialised {sorted(out)} from the pre-trained checkpoint; dropped {dropped}",
        flush=True)
  return out


# ---------------------------------------------------------------------------------------------
# The run.


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=float)


def run(config, workdir: str) -> int:
  """Fine-tunes according to ``config`` in ``workdir`` (resuming from its newest checkpoint).

  ``config.init`` names the pre-trained model ('' = from scratch); ``config.objective`` picks the
  objective and its ``finetune_task`` (data, labels, evaluation, best metric). Returns 0
  (finished, or preempted / stopped early after saving).
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, evaluate.CKPT_DIR)
  stored = checkpointing.read_config(ckpt_dir) if os.path.isdir(ckpt_dir) else None
  task = registry.get("finetune_task", config.objective)(config)

  # ------------------------------------------------------------------ config + pre-trained model
  pre_params = None
  if stored is not None:
    # Resuming: the architecture and the labels are facts of this run.
    stored = ml_collections.ConfigDict(stored)
    pretrained = task.pretrained_from_stored(stored)
  elif config.init:
    pre_params, pretrained = load_init(config.init)
  else:
    pretrained = None
  init = stored.init if stored is not None else config.init
  # Refuse a contradiction with the pre-trained model before any data is listed or compiled.
  task.check(config, pretrained, config.init)

  # ------------------------------------------------------------------ devices
  devices = jax.devices()
  n_dev = config.num_devices or len(devices)
  if n_dev > len(devices):
    raise ValueError(f"num_devices={n_dev} but only {len(devices)} devices are visible")
  mesh = sharding.make_mesh(config.mesh, devices[:n_dev], config.get("dcn_mesh", ()))
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  # Every micro-batch must split evenly over the data-parallel devices.
  row_multiple = sharding.batch_size_multiple(mesh) * config.accum_steps
  process_index, process_count = jax.process_index(), jax.process_count()
  print(f"mesh {dict(mesh.shape)} over {n_dev} devices, {process_count} process(es)", flush=True)

  # ------------------------------------------------------------------ data (host, NumPy)
  train_ex, dropped = task.examples(config, "train")
  valid_ex, valid_dropped = task.examples(config, "valid")
  print(f"train examples: {len(train_ex)} (dropped {dropped}); valid: {len(valid_ex)} "
        f"(dropped {valid_dropped})", flush=True)
  config = task.resolve_config(config, pretrained=pretrained, stored=stored,
                               train_examples=train_ex, init=init)
  logging.info("resolved config:\n%s", config)
  task.prepare(config, train_ex, valid_ex)
  if process_index == 0:
    task.write_files(config, workdir)

  objective = registry.get("objective", config.objective)(config)
  modality = objective.modality
  train_fn = task.batch_fn(config, objective, train=True)
  plan = modality.batch_plan(config.data, train_ex, row_multiple)
  steps_per_epoch = plan.total_batches
  shapes = sorted(plan.shapes())
  print(f"batch shapes: {shapes} — {len(shapes)} compiled step programs at most; "
        f"{steps_per_epoch} steps per epoch", flush=True)
  total_steps = configs_lib.resolve_steps(config, "total", steps_per_epoch=steps_per_epoch,
                                          total_steps=None)
  warmup = configs_lib.resolve_steps(config.optim, "warmup", steps_per_epoch=steps_per_epoch,
                                     total_steps=total_steps, default=0)

  # ------------------------------------------------------------------ model, optimizer, state
  lr_fn = optim.make_schedule(config.optim, total_steps, warmup)
  dummy = task.dummy_batch(config, objective)
  rng = jax.random.key(config.seed)
  params_shape = jax.eval_shape(objective.init, rng, dummy)
  tx = objective.make_optimizer(config.optim, lr_fn, params_shape)
  init_fn = lambda r: step_lib.init_state(objective, tx, r, dummy)
  state_shape = jax.eval_shape(init_fn, rng)
  state_sharding = sharding.state_shardings(state_shape, mesh, config.sharding_rules)
  rows, total_params = metrics_lib.parameter_table(state_shape["params"])
  print(metrics_lib.format_parameter_table(rows, total_params), flush=True)

  # ------------------------------------------------------------------ checkpoint / resume
  manager = checkpointing.make_manager(
      ckpt_dir, max_to_keep=config.keep_checkpoints, save_interval_steps=config.ckpt_every,
      async_save=config.async_checkpointing)
  best_manager = checkpointing.make_manager(
      os.path.join(workdir, evaluate.BEST_DIR), max_to_keep=1, save_interval_steps=1,
      async_save=False, with_data_iter=False)
  data_iter = modality.make_iterator(
      config.data, examples=train_ex, seed=config.data.seed, batch_multiple=row_multiple,
      process_index=process_index, process_count=process_count, batch_fn=train_fn)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          state_shape, state_sharding)
  restored = checkpointing.restore_latest(manager, abstract, data_iter=data_iter)
  if restored is not None:
    state, start_step = restored
    print(f"resumed from step {start_step} in {workdir}", flush=True)
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
    if pre_params is not None:
      # Adam's moments start at zero whatever the values, so only the params are replaced.
      reused = pretrained_subtrees(objective, params_shape, pre_params)
      state["params"] = {**state["params"], **jax.device_put(
          reused, {k: state_sharding["params"][k] for k in reused})}
    start_step = 0
  best_path = os.path.join(workdir, "best.json")
  best = task.initial_best()
  if os.path.exists(best_path):
    with open(best_path) as f:
      best = json.load(f)

  # ------------------------------------------------------------------ jitted step, evaluator
  no_teacher = train.EmaSchedule(1.0, 1.0, 0)
  step_fn = step_lib.make_train_step(objective, tx, lr_fn, no_teacher, config.seed,
                                     config.accum_steps)
  train_step = sharding.MeshStep(step_fn, mesh, in_shardings=(state_sharding, batch_sharding),
                                 out_shardings=(state_sharding, replicated), donate_argnums=(0,),
                                 max_compiles=config.get("max_step_compiles", 0) or len(shapes),
                                 name="fine-tune step")
  evaluator = task.make_evaluator(
      config, objective, valid_ex, param_sharding=state_sharding["params"],
      batch_sharding=batch_sharding, batch_multiple=sharding.batch_size_multiple(mesh),
      total_steps=total_steps, steps_per_epoch=steps_per_epoch)

  # ------------------------------------------------------------------ loop
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  writer.write_text(start_step, "config", config.to_json_best_effort())
  log = loop.StepLog(writer, total_steps, modality.unit, start_step, bad_counts=dropped,
                     total_params=total_params, sum_keys=task.sum_keys)
  preemption = checkpointing.PreemptionHandler().install()
  stop_reason, eval_s, last_eval = "finished", 0.0, None
  step = start_step
  name = task.metric

  def validate(step: int) -> dict:
    nonlocal best, eval_s
    t0 = time.perf_counter()
    report = evaluator(state["params"], step)
    eval_s += time.perf_counter() - t0
    # orbax only writes steps above its newest; after a resume from before the best step, the
    # saved best stays (and keeps its record) until a later step beats it.
    newest_best = checkpointing.latest_step(os.path.join(workdir, evaluate.BEST_DIR))
    if task.improved(report.record, best) and (newest_best is None or step > newest_best):
      best = {"step": step, **report.record}
      checkpointing.save(best_manager, step, {"params": state["params"]}, config=config,
                         force=True)
      checkpointing.wait(best_manager)
      if process_index == 0:
        _write_json(best_path, best)
    scalars = {f"valid/{k}": v for k, v in report.scalars.items()}
    scalars.update({f"valid/best_{name}": best[name], "valid/eval_s": time.perf_counter() - t0})
    writer.write_scalars(step, scalars)
    if report.text:
      writer.write_text(step, "valid/samples", report.text)
    print(f"valid @ {step}: {report.line} (best {name} {best[name]:.4g} @ {best.get('step')})",
          flush=True)
    return {"step": step, **report.record}

  try:
    while step < total_steps:
      batch, units = log.device_batch(next(data_iter), batch_sharding, modality.batch_units,
                                      process_count)
      state, _ = log.run_step(train_step, state, batch, step + 1, units)
      step += 1
      log.maybe_log(step, config.log_every, {"compiles": train_step.compiles})
      if step >= config.eval.start and (step % config.eval.every == 0 or step == total_steps):
        last_eval = validate(step)
      checkpointing.save(manager, step, state, data_iter=data_iter, config=config)
      stop = loop.stop_reason(config, manager, preemption, step)
      if stop:
        stop_reason = stop
        break
    log.drain({"compiles": train_step.compiles})
    checkpointing.save(manager, step, state, data_iter=data_iter, config=config, force=True)
    checkpointing.wait(manager)
  finally:
    loop.close_all(preemption, log, writer, data_iter)

  summary = {"stop_reason": stop_reason, "step": step, "compiles": train_step.compiles,
             "eval_s": eval_s, "best": best, **log.summary()}
  if last_eval is not None:
    summary["last_eval"] = last_eval
  loop.finish(workdir, stop_reason, step, summary, what="fine-tuned")
  manager.close()
  best_manager.close()
  return 0


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/ctc_*.py[:args]).",
                                           lock_config=True)
  init = flags.DEFINE_string("init", None, "Pre-training run directory or exported .msgpack "
                             "(default: config.init; empty = from scratch).")
  workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exports.")

  def main(argv: Any) -> None:
    del argv
    distributed.maybe_initialize()
    if workdir.value is None:
      raise app.UsageError("--workdir is required")
    cfg = config.value
    if init.value is not None:
      cfg.init = init.value
    code = run(cfg, workdir.value)
    if code:
      raise SystemExit(code)

  jax.config.config_with_absl()
  app.run(main)


if __name__ == "__main__":
  _cli()
