r"""CTC fine-tuning of a pre-trained speech model.

``python -m d2vjax.finetune --config=configs/ctc_base_10m.py --init=PRE --workdir=DIR``

``--init`` is a pre-training run directory (its newest checkpoint) or an exported ``.msgpack``
(with its ``.json`` sidecar); without it the model trains from scratch. The pre-trained config
supplies the architecture, the pre-training objective and the waveform normalisation (a
fine-tuning config that sets another normalisation is refused, as fairseq asserts, spec §1.1).

Read top to bottom, like ``train.py``: config + pre-trained checkpoint → devices → data
(host) → vocabulary → model/objective → state → checkpoint/resume → jitted step → loop (metrics,
validation WER/CER at an interval, best-WER checkpoint, preemption) → export.

What a run leaves in ``--workdir`` besides ``train.py``'s files: ``best/<step>/`` (params of the
lowest validation WER so far), ``best.json`` (its step and scores), ``dict.ltr.txt`` (fairseq's
letter dictionary of the vocabulary).
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

from d2vjax import asr, checkpointing, configs_lib, distributed, evaluate, export
from d2vjax import metrics as metrics_lib, optim, registry, sharding, train
from d2vjax import step as step_lib
from d2vjax.data import ctc_data


class NormalizeMismatchError(ValueError):
  """The fine-tuning config normalises waveforms differently from the pre-trained model."""


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


def _pretrained_objective(config: dict) -> str:
  obj = config.get("objective")
  if obj == "ctc":  # continuing from a fine-tuned model: the encoder's own origin counts
    return config["finetune"]["pretrained_objective"]
  return obj


def check_normalize(normalize: bool | None, pretrained: dict | None, init: str = "") -> bool:
  """The waveform normalisation of the run: the pre-trained model's; ``normalize`` (the config's
  value, None = unset) may only repeat it. Raises ``NormalizeMismatchError`` on a mismatch and
  ValueError when neither says (from scratch without a value)."""
  if pretrained is None:
    if normalize is None:
      raise ValueError("data.normalize is unset and there is no --init to take it from: set "
                       "--config.data.normalize=true|false for a from-scratch run")
    return bool(normalize)
  norm = bool(pretrained["data"]["normalize"])
  if normalize is not None and bool(normalize) != norm:
    raise NormalizeMismatchError(
        f"data.normalize={bool(normalize)} but the pre-trained checkpoint {init!r} was trained "
        f"with normalize={norm}: the model would see waveforms scaled unlike anything it learned "
        f"from (fairseq asserts the same, fairseq-spec §1.1). Drop the override or pass "
        f"--config.data.normalize={str(norm).lower()}.")
  return norm


def resolve_config(config, *, pretrained: dict | None, vocab: asr.Vocabulary,
                   init: str = "") -> ml_collections.ConfigDict:
  """The run's complete config (stored with every checkpoint; ``evaluate`` rebuilds from it).

  From ``pretrained`` (the pre-training config; None = from scratch): ``model``,
  ``finetune.pretrained_objective`` and ``data.normalize`` (an explicit, different value raises
  ``NormalizeMismatchError``). Then unset choices follow the pre-trained objective: time-mask
  ``min_masks`` 2 for wav2vec 2.0 and 1 for data2vec (spec §9.1), ``mask_kind`` 'noise' for
  data2vec 2.0 and 'learned' otherwise (spec §2.1). ``vocab`` is stored as its token list.
  """
  c = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
  c.init = init
  c.data.normalize = check_normalize(c.data.normalize, pretrained, init)
  if pretrained is not None:
    c.model = ml_collections.ConfigDict(pretrained["model"])
    c.finetune.pretrained_objective = _pretrained_objective(pretrained)
  obj = c.finetune.pretrained_objective
  if c.masking.min_masks is None:
    c.masking.min_masks = 2 if obj == "wav2vec2" else 1
  if c.finetune.mask_kind is None:
    c.finetune.mask_kind = "noise" if obj == "data2vec2" else "learned"
  c.vocab = list(vocab.tokens)
  return c


def pretrained_subtrees(objective, params_shape: dict, pretrained: dict) -> dict:
  """The pre-trained subtrees the fine-tuning model reuses (``frontend``, ``encoder`` and, for
  learned masks, ``mask_emb``), shape-checked against the model. The rest of the checkpoint
  (heads, quantizer, projections) is dropped."""
  out = {}
  for key in objective.pretrained_keys():
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

  ``config.init`` names the pre-trained model ('' = from scratch). Returns 0 (finished, or
  preempted / stopped early after saving).
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, evaluate.CKPT_DIR)
  stored = checkpointing.read_config(ckpt_dir) if os.path.isdir(ckpt_dir) else None

  # ------------------------------------------------------------------ config + pre-trained model
  pre_params = None
  if stored is not None:
    # Resuming: the architecture, vocabulary and normalisation are facts of this run.
    stored = ml_collections.ConfigDict(stored)
    pretrained = {"model": stored.model.to_dict(), "objective": "ctc",
                  "finetune": {"pretrained_objective": stored.finetune.pretrained_objective},
                  "data": {"normalize": stored.data.normalize}}
    vocab = asr.Vocabulary(tuple(stored.vocab))
  elif config.init:
    pre_params, pre_cfg = load_init(config.init)
    pretrained = pre_cfg
    vocab = None
  else:
    pretrained, vocab = None, None
  # Refuse a normalisation mismatch before any data is listed or any program compiled.
  check_normalize(config.data.normalize, pretrained, config.init)

  # ------------------------------------------------------------------ devices
  devices = jax.devices()
  n_dev = config.num_devices or len(devices)
  if n_dev > len(devices):
    raise ValueError(f"num_devices={n_dev} but only {len(devices)} devices are visible")
  mesh = sharding.make_mesh(config.mesh, devices[:n_dev])
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  # Every micro-batch must split evenly over the data-parallel devices.
  row_multiple = sharding.batch_size_multiple(mesh) * config.accum_steps
  process_index, process_count = jax.process_index(), jax.process_count()
  print(f"mesh {dict(mesh.shape)} over {n_dev} devices, {process_count} process(es)", flush=True)

  # ------------------------------------------------------------------ data (host, NumPy)
  train_ex, dropped = ctc_data.asr_examples(config.data, "train")
  valid_ex, valid_dropped = ctc_data.asr_examples(config.data, "valid")
  print(f"train utterances: {len(train_ex)} (dropped {dropped}); valid: {len(valid_ex)} "
        f"(dropped {valid_dropped})", flush=True)
  if vocab is None:
    vocab = asr.Vocabulary.build(e.transcript for e in train_ex)
  config = resolve_config(config, pretrained=pretrained, vocab=vocab,
                          init=(stored.init if stored is not None else config.init))
  logging.info("resolved config:\n%s", config)
  label_len = ctc_data.label_lengths(config.data, [train_ex, valid_ex])
  print(f"vocabulary: {len(vocab)} tokens {''.join(vocab.tokens[4:])!r}; label lengths per "
        f"bucket: {label_len}", flush=True)
  if process_index == 0:
    with open(os.path.join(workdir, "dict.ltr.txt"), "w") as f:
      f.write(vocab.to_fairseq_dict())

  objective = registry.get("objective", config.objective)(config)
  modality = objective.modality
  dim = objective.encoder_cfg.dim
  m = config.masking
  train_fn = ctc_data.CtcBatchFn(
      vocab, tuple(sorted(label_len.items())), dim, mask_prob=m.mask_prob,
      mask_length=m.mask_length, min_masks=m.min_masks, require_same_masks=m.require_same_masks,
      channel_prob=m.channel_prob, channel_length=m.channel_length)
  eval_fn = ctc_data.CtcBatchFn(vocab, tuple(sorted(label_len.items())), dim)
  eval_data = evaluate.eval_data_config(config)
  plan = modality.batch_plan(config.data, train_ex, row_multiple)
  steps_per_epoch = plan.total_batches
  shapes = sorted(plan.shapes())
  print(f"batch shapes (rows, samples): {shapes} — {len(shapes)} compiled step programs at most; "
        f"{steps_per_epoch} steps per epoch", flush=True)
  total_steps = configs_lib.resolve_steps(config, "total", steps_per_epoch=steps_per_epoch,
                                          total_steps=None)
  blank_warn = configs_lib.resolve_steps(config.eval, "blank_warn",
                                         steps_per_epoch=steps_per_epoch,
                                         total_steps=total_steps, default=total_steps)
  warmup = configs_lib.resolve_steps(config.optim, "warmup", steps_per_epoch=steps_per_epoch,
                                     total_steps=total_steps, default=0)

  # ------------------------------------------------------------------ model, optimizer, state
  lr_fn = optim.make_schedule(config.optim, total_steps, warmup)
  dummy = ctc_data.CtcBatchFn(vocab, tuple(sorted(label_len.items())), dim)(
      np.random.default_rng(0), _dummy_batch(modality, config.data))
  dummy = {k: v for k, v in dummy.items() if not k.startswith("_")}
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
  best = {"wer": float("inf")}
  if os.path.exists(best_path):
    with open(best_path) as f:
      best = json.load(f)

  # ------------------------------------------------------------------ jitted step and decoder
  no_teacher = train.EmaSchedule(1.0, 1.0, 0)
  step_fn = step_lib.make_train_step(objective, tx, lr_fn, no_teacher, config.seed,
                                     config.accum_steps)
  train_step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  predict = evaluate.make_predict(objective, state_sharding["params"], batch_sharding)

  # ------------------------------------------------------------------ loop
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  writer.write_text(start_step, "config", config.to_json_best_effort())
  buffer = metrics_lib.MetricBuffer(sum_keys=("nonfinite", "ctc_skipped"))
  progress = metrics_lib.Progress(total_steps, unit=modality.unit, start_step=start_step)
  nonfinite = metrics_lib.NonFiniteCounter()
  bad_counts: dict[str, int] = dict(dropped)
  preemption = checkpointing.PreemptionHandler().install()
  stop_reason, compile_s, eval_s = "finished", None, 0.0
  last_eval, warned_blank = None, False
  step = start_step

  def validate(step: int) -> evaluate.EvalResult:
    nonlocal best, eval_s, warned_blank
    t0 = time.perf_counter()
    result = evaluate.decode_split(objective, state["params"], eval_data, valid_ex, eval_fn,
                                   predict, batch_sharding,
                                   batch_multiple=sharding.batch_size_multiple(mesh))
    eval_s += time.perf_counter() - t0
    scalars = result.scalars()
    improved = result.rates.wer < best["wer"] or (
        result.rates.wer == best["wer"] and result.rates.cer < best.get("cer", float("inf")))
    # orbax only writes steps above its newest; after a resume from before the best step, the
    # saved best stays (and keeps its record) until a later step beats it.
    newest_best = checkpointing.latest_step(os.path.join(workdir, evaluate.BEST_DIR))
    if improved and (newest_best is None or step > newest_best):
      best = {"step": step, "wer": result.rates.wer, "cer": result.rates.cer,
              "loss": result.loss}
      checkpointing.save(best_manager, step, {"params": state["params"]}, config=config,
                         force=True)
      checkpointing.wait(best_manager)
      if process_index == 0:
        _write_json(best_path, best)
    scalars.update({"valid/best_wer": best["wer"], "valid/eval_s": time.perf_counter() - t0})
    writer.write_scalars(step, scalars)
    # The writer also logs the samples (INFO), so the console shows them once.
    writer.write_text(step, "valid/samples",
                      evaluate.format_samples(result, config.eval.num_samples))
    print(f"valid @ {step}: WER {100 * result.rates.wer:.2f} % CER {100 * result.rates.cer:.2f} % "
          f"loss {result.loss:.3f} blank {result.blank_frac:.3f} (best WER "
          f"{100 * best['wer']:.2f} % @ {best.get('step')})", flush=True)
    if result.all_blank and step >= blank_warn and not warned_blank:
      warned_blank = True
      message = (f"WARNING: every validation hypothesis is empty at step {step} (the model emits "
                 f"only blanks; blank share {result.blank_frac:.3f}). Check the learning rate, "
                 f"the freeze phase (finetune.freeze_updates) and the labels.")
      logging.warning(message)
      print(message, flush=True)
    return result

  try:
    while step < total_steps:
      host = next(data_iter)
      meta = {k: v for k, v in host.items() if k.startswith("_")}
      host = {k: v for k, v in host.items() if not k.startswith("_")}
      for reason, n in meta.get("_bad", {}).items():
        bad_counts[reason] = bad_counts.get(reason, 0) + int(n)
      units = modality.batch_units(host) * process_count
      batch = sharding.global_batch(host, batch_sharding)
      t0 = time.perf_counter()
      state, step_metrics = train_step(state, batch)
      step += 1
      if compile_s is None:
        jax.block_until_ready(step_metrics)
        compile_s = time.perf_counter() - t0
        writer.write_scalars(step, {"compile_s": compile_s, "total_params": total_params})
        print(f"first step (compile + run): {compile_s:.1f} s; params: {total_params}", flush=True)
      buffer.add(step, step_metrics)
      progress.update(step, units)

      if step % config.log_every == 0 or step == total_steps:
        flushed = buffer.flush()
        if flushed is not None:
          log_step, scalars = flushed
          nonfinite.update(scalars)
          scalars.update({f"bad/{k}": v for k, v in bad_counts.items()})
          scalars.update(progress.summary())
          scalars["nonfinite_total"] = nonfinite.total
          writer.write_scalars(log_step, scalars)
      if step >= config.eval.start and (step % config.eval.every == 0 or step == total_steps):
        last_eval = (step, validate(step))
      checkpointing.save(manager, step, state, data_iter=data_iter, config=config)
      if preemption.should_stop(manager, step):
        stop_reason = "preempted"
        break
      if config.stop_after_steps and step >= config.stop_after_steps:
        stop_reason = "stop_after_steps"
        break
    tail = buffer.drain()
    if tail is not None:
      writer.write_scalars(tail[0], tail[1])
    checkpointing.save(manager, step, state, data_iter=data_iter, config=config, force=True)
    checkpointing.wait(manager)
  finally:
    preemption.uninstall()
    progress.close()
    writer.close()
    close = getattr(data_iter, "close", None)
    if close is not None:
      close()

  if stop_reason == "finished" and process_index == 0:
    out = os.path.join(workdir, "export", "params.msgpack")
    export.export_workdir(workdir, out)
    print(f"exported fine-tuned params to {out}", flush=True)
  summary = {"stop_reason": stop_reason, "step": step, "compile_s": compile_s,
             "total_params": total_params, "bad_inputs": bad_counts, "eval_s": eval_s,
             "best": best, **progress.summary()}
  if last_eval is not None:
    summary["last_eval"] = {"step": last_eval[0], "wer": last_eval[1].rates.wer,
                            "cer": last_eval[1].rates.cer, "loss": last_eval[1].loss}
  # One summary per process, as train.py writes them.
  _write_json(os.path.join(workdir, "summary.json" if process_index == 0
                           else f"summary.p{process_index}.json"), summary)
  print(f"{stop_reason} at step {step}: {summary}", flush=True)
  manager.close()
  best_manager.close()
  return 0


def _dummy_batch(modality, data_cfg) -> dict:
  """A zero batch of the smallest bucket with the pipeline's host metadata (for shapes)."""
  base = modality.dummy_batch(data_cfg)
  s = base["audio"].shape[1]
  return {"audio": base["audio"], "padding_mask": base["padding_mask"], "_transcripts": [""],
          "_valid_samples": np.asarray([s]), "_global_valid_samples": np.asarray([s])}


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
