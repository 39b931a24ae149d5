r"""Decode a labelled split with a fine-tuned CTC checkpoint and print WER/CER (or score any other
fine-tuning run through its task: accuracy, Pearson, …).

``python -m d2vjax.evaluate --workdir=DIR [--split=valid] [--checkpoint=best|latest] [--step=N]``

Reads everything from the fine-tuning run: the parameters (``DIR/best`` — the lowest validation
WER — by default, else ``DIR/checkpoints``), and the resolved config stored with them
(architecture, vocabulary, normalisation, data source). ``--split`` is ``train``, ``valid`` or
any other split name of the configured source (for a manifest source: a ``.tsv`` path).

Greedy (best-path) CTC decoding, no language model (wav2vec 2.0 Appendix C "no LM" numbers).
``decode_split`` is also the fine-tuning loop's in-training evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

from absl import app, flags
import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np

from d2vjax import asr, checkpointing, distributed, registry, sharding
from d2vjax.data import ctc_data

BEST_DIR, CKPT_DIR = "best", "checkpoints"


@dataclasses.dataclass
class EvalResult:
  """One decoded split.

  Attributes:
    rates: corpus WER/CER with counts (``asr.ErrorRates``).
    loss: mean CTC loss per utterance (``sentence_avg``), unaligned utterances counted as 0.
    skipped: utterances whose CTC alignment was impossible.
    bad: clips that failed to decode, by reason (left out of every number).
    blank_frac: share of valid frames whose argmax is the blank.
    samples: ``(key, reference, hypothesis)`` of every decoded utterance, in bucket order.
  """
  rates: asr.ErrorRates
  loss: float
  skipped: int
  bad: dict
  blank_frac: float
  samples: list

  @property
  def all_blank(self) -> bool:
    """No hypothesis has a single character."""
    return bool(self.samples) and not any(h for _, _, h in self.samples)

  def scalars(self, prefix: str = "valid/") -> dict[str, float]:
    r = self.rates
    return {f"{prefix}wer": r.wer, f"{prefix}cer": r.cer, f"{prefix}loss": self.loss,
            f"{prefix}utterances": float(r.utterances), f"{prefix}ctc_skipped": float(self.skipped),
            f"{prefix}blank_frac": self.blank_frac}


def _to_host(tree, process_count: int):
  """Global (data-sharded) arrays → host numpy with every row, on every process."""
  if process_count == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def make_predict(objective, param_sharding, batch_sharding: NamedSharding) -> Callable:
  """Jitted ``(params, batch) -> outputs`` of ``objective.predict`` plus ``row_valid``;
  ``param_sharding`` is one sharding or a tree of them (the train state's)."""

  def predict(params, batch):
    out = objective.predict(params, batch)
    out["row_valid"] = batch["row_valid"]
    return out

  return jax.jit(predict, in_shardings=(param_sharding, batch_sharding))


def eval_data_config(config) -> ml_collections.ConfigDict:
  """The data section for decoding: one micro-batch of audio per forward pass (training splits
  ``budget_samples`` into ``accum_steps`` micro-batches to bound memory; decoding must too)."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.budget_samples = int(d.budget_samples) // max(1, int(config.get("accum_steps", 1) or 1))
  return d


EVAL_KEYS = ("audio", "padding_mask", "labels", "label_padding", "row_valid")


def decode_split(objective, params, data_cfg, examples: Sequence, batch_fn: ctc_data.CtcBatchFn,
                 predict: Callable, batch_sharding: NamedSharding, *, batch_multiple: int = 1
                 ) -> EvalResult:
  """Greedy-decodes ``examples`` (each exactly once) and scores them.

  Args:
    objective: the ``ctc`` objective (its ``vocab`` decodes).
    params: replicated params.
    data_cfg: the run's data section (buckets, budget, normalisation).
    examples: from ``ctc_data.asr_examples`` (same list on every process).
    batch_fn: ``CtcBatchFn`` without masks (labels for the loss).
    predict: ``make_predict(...)``.
    batch_sharding: the data-parallel sharding of batch arrays.
    batch_multiple: data-parallel devices (rows per batch are a multiple of it).
  """
  pi, pc = jax.process_index(), jax.process_count()
  vocab = objective.vocab
  refs, hyps, keys = [], [], []
  loss_sum, skipped, blank, frames = 0.0, 0, 0.0, 0.0
  bad: dict[str, int] = {}
  for batch in ctc_data.eval_batches(data_cfg, examples, batch_fn, batch_multiple=batch_multiple,
                                     process_index=pi, process_count=pc):
    for k, v in batch["_bad"].items():
      bad[k] = bad.get(k, 0) + int(v)
    device = {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
              for k in EVAL_KEYS}
    # Every process gets every row (in global order), so every process can score the split.
    out = _to_host(predict(params, device), pc)
    ids, lengths = np.asarray(out["ids"]), np.asarray(out["lengths"])
    valid = np.asarray(out["row_valid"], bool)
    texts = asr.greedy_decode(ids, lengths, vocab)
    for r in np.flatnonzero(valid):
      keys.append(batch["_global_keys"][r])
      refs.append(batch["_global_transcripts"][r])
      hyps.append(texts[r])
    loss_sum += float(np.sum(np.where(valid, out["loss"], 0.0)))
    skipped += int(np.sum(np.asarray(out["skipped"]) & valid))
    in_range = np.arange(ids.shape[1])[None, :] < np.where(valid, lengths, 0)[:, None]
    blank += float(np.sum((ids == asr.BLANK) & in_range))
    frames += float(np.sum(in_range))
  rates = asr.error_rates(refs, hyps)
  return EvalResult(rates=rates, loss=loss_sum / max(len(refs), 1), skipped=skipped, bad=bad,
                    blank_frac=blank / max(frames, 1.0),
                    samples=list(zip(keys, refs, hyps)))


def format_samples(result: EvalResult, n: int) -> str:
  """The first ``n`` reference/hypothesis pairs as text."""
  lines = []
  for key, ref, hyp in result.samples[:n]:
    lines += [f"[{key}]", f"  REF: {ref}", f"  HYP: {hyp}"]
  return "\n".join(lines)


def _config_from_checkpoint(directory: str) -> ml_collections.ConfigDict:
  stored = checkpointing.read_config(directory)
  if stored is None:
    raise FileNotFoundError(f"no config stored with the checkpoints in {directory}")
  config = ml_collections.ConfigDict(stored)
  if config.get("objective") != "ctc":
    raise ValueError(f"{directory} holds a {config.get('objective')!r} checkpoint, not a CTC "
                     "fine-tuning run (python -m d2vjax.finetune)")
  return config


def checkpoint_dir(workdir: str, which: str = "best") -> str:
  """``DIR/best`` or ``DIR/checkpoints``; 'best' falls back to the latest when no evaluation ran."""
  if which not in ("best", "latest"):
    raise ValueError(f"checkpoint must be 'best' or 'latest', got {which!r}")
  best = os.path.join(workdir, BEST_DIR)
  if which == "best" and checkpointing.latest_step(best) is not None:
    return best
  latest = os.path.join(workdir, CKPT_DIR)
  if checkpointing.latest_step(latest) is None:
    raise FileNotFoundError(f"no checkpoint in {workdir} (looked in {BEST_DIR}/ and {CKPT_DIR}/)")
  return latest


def _restore(directory: str, step: int, config):
  """``(params, param_sharding, batch_sharding, mesh)`` of a checkpoint: the training mesh and
  layout (FSDP-sharded params for large models) when the visible devices allow it, else plain
  data parallelism over them."""
  params = checkpointing.restore_params_only(directory, step)
  devices = jax.devices()
  n_dev = min(config.get("num_devices") or len(devices), len(devices))
  try:
    mesh = sharding.make_mesh(config.get("mesh", (("data", -1),)), devices[:n_dev])
  except ValueError:
    mesh = sharding.make_mesh((("data", -1),), devices[:n_dev])
  shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": params})
  param_sharding = sharding.state_shardings(
      shape, mesh, config.get("sharding_rules", ((".*", "fsdp"),)))["params"]
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.device_put(params, param_sharding), param_sharding, batch_sharding, mesh


def run_task(workdir: str, split: str = "valid", *, which: str = "best", step: int | None = None,
             out: str | None = None):
  """Scores ``split`` with a checkpoint of any fine-tuning run through its ``finetune_task``
  (classification: accuracy …, regression: Pearson …). Returns ``(EvalReport, step)``; with
  ``out``, writes the record as JSON."""
  directory = checkpoint_dir(workdir, which)
  step = checkpointing.latest_step(directory) if step is None else int(step)
  stored = checkpointing.read_config(directory)
  if stored is None:
    raise FileNotFoundError(f"no config stored with the checkpoints in {directory}")
  config = ml_collections.ConfigDict(stored)
  task = registry.get("finetune_task", config.objective)(config)
  objective = registry.get("objective", config.objective)(config)
  params, param_sharding, batch_sharding, mesh = _restore(directory, step, config)
  examples, dropped = task.examples(config, split)
  task.prepare(config, examples, examples)
  evaluator = task.make_evaluator(
      config, objective, examples, param_sharding=param_sharding, batch_sharding=batch_sharding,
      batch_multiple=sharding.batch_size_multiple(mesh), total_steps=0, steps_per_epoch=0)
  report = evaluator(params, step)
  report.record["dropped"] = dict(dropped)
  if out and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump({"workdir": workdir, "checkpoint": directory, "step": step, "split": split,
                 **report.record}, f, indent=1)
  return report, step


def run(workdir: str, split: str = "valid", *, which: str = "best", step: int | None = None,
        out: str | None = None) -> tuple[EvalResult, int]:
  """Decodes ``split`` with a checkpoint of the fine-tuning run in ``workdir``.

  Returns ``(result, step)``; with ``out``, writes the scores and every hypothesis as JSON.
  """
  directory = checkpoint_dir(workdir, which)
  step = checkpointing.latest_step(directory) if step is None else int(step)
  config = _config_from_checkpoint(directory)
  objective = registry.get("objective", "ctc")(config)
  params, param_sharding, batch_sharding, mesh = _restore(directory, step, config)
  examples, dropped = ctc_data.asr_examples(config.data, split)
  data_cfg = eval_data_config(config)
  label_len = ctc_data.label_lengths(data_cfg, [examples])
  batch_fn = ctc_data.CtcBatchFn(objective.vocab, tuple(sorted(label_len.items())),
                                 objective.encoder_cfg.dim)
  predict = make_predict(objective, param_sharding, batch_sharding)
  result = decode_split(objective, params, data_cfg, examples, batch_fn, predict,
                        batch_sharding, batch_multiple=sharding.batch_size_multiple(mesh))
  result.bad = {**dropped, **result.bad}
  if out and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump({"workdir": workdir, "checkpoint": directory, "step": step, "split": split,
                 **dataclasses.asdict(result.rates), "loss": result.loss,
                 "ctc_skipped": result.skipped, "dropped": result.bad,
                 "hypotheses": [{"key": k, "ref": r, "hyp": h} for k, r, h in result.samples]},
                f, indent=1)
  return result, step


def _cli() -> None:
  """Command line; flags are defined here so importing this module defines none."""
  workdir = flags.DEFINE_string("workdir", None, "Fine-tuning run directory.")
  split = flags.DEFINE_string("split", "valid", "Split to decode: train | valid | another split "
                              "name of the configured source.")
  which = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                            "Lowest-validation-WER checkpoint or the newest one.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest in that folder).")
  out = flags.DEFINE_string("out", None, "Optional JSON file for the scores and hypotheses.")
  num_samples = flags.DEFINE_integer("num_samples", 5, "Hypotheses to print.")

  def main(argv: Any) -> None:
    del argv
    distributed.maybe_initialize()
    if not workdir.value:
      raise app.UsageError("--workdir is required")
    stored = checkpointing.read_config(checkpoint_dir(workdir.value, which.value)) or {}
    if stored.get("objective") not in (None, "ctc"):
      report, at = run_task(workdir.value, split.value, which=which.value, step=step.value,
                            out=out.value)
      print(f"{split.value} @ step {at}: {report.line}")
      return
    result, at = run(workdir.value, split.value, which=which.value, step=step.value,
                     out=out.value)
    r = result.rates
    print(format_samples(result, num_samples.value))
    print(f"{split.value} @ step {at}: WER {100 * r.wer:.2f} % ({r.word_errors}/{r.ref_words}) "
          f"CER {100 * r.cer:.2f} % ({r.char_errors}/{r.ref_chars}) over {r.utterances} "
          f"utterances; CTC loss {result.loss:.3f}; dropped {result.bad or 'none'}")

  jax.config.config_with_absl()
  app.run(main)


if __name__ == "__main__":
  _cli()
