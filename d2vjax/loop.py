"""Per-step bookkeeping shared by the pre-training (``train.py``) and fine-tuning
(``finetune.py``) loops: host metadata and bad-input counts, throughput units, the first step's
compile time, the metric buffer, the progress line and the periodic log flush.

The loops differ in what they do around a step (collapse guard, validation, best checkpoint);
what every step costs in bookkeeping lives here once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax

from d2vjax import metrics as metrics_lib
from d2vjax import export, sharding


def split_host(batch: dict) -> tuple[dict, dict]:
  """A pipeline batch → (device arrays, host metadata: the keys starting with '_')."""
  meta = {k: v for k, v in batch.items() if k.startswith("_")}
  return {k: v for k, v in batch.items() if not k.startswith("_")}, meta


class StepLog:
  """Bookkeeping of one training loop.

  Args:
    writer: the run's ``metrics.MetricWriter``.
    total_steps: updates in the run (for the progress line and the last log flush).
    unit: throughput unit of the modality (``Modality.unit``).
    start_step: first step of this process run (after a resume).
    bad_counts: counts of inputs skipped before the loop (reason → count); per-batch ``_bad``
      counts are added to it.
    total_params: logged with the compile time.
    sum_keys: metrics summed (not averaged) over a log window, besides ``nonfinite``.
  """

  def __init__(self, writer, total_steps: int, unit: str, start_step: int, *,
               bad_counts: dict | None = None, total_params: int = 0, sum_keys=()):
    self.writer = writer
    self.total_steps = int(total_steps)
    self.total_params = total_params
    self.buffer = metrics_lib.MetricBuffer(sum_keys=("nonfinite",) + tuple(sum_keys))
    self.progress = metrics_lib.Progress(total_steps, unit=unit, start_step=start_step)
    self.nonfinite = metrics_lib.NonFiniteCounter()
    self.bad_counts: dict[str, int] = dict(bad_counts or {})
    self.compile_s: float | None = None

  def device_batch(self, raw: dict, batch_sharding, units_fn: Callable[[dict], float],
                   process_count: int = 1) -> tuple[dict, float]:
    """A pipeline batch → (global device arrays, global units): host metadata (keys starting
    with '_') is stripped and its ``_bad`` counts added up."""
    host, meta = split_host(raw)
    for reason, n in meta.get("_bad", {}).items():
      self.bad_counts[reason] = self.bad_counts.get(reason, 0) + int(n)
    units = units_fn(host) * process_count
    return sharding.global_batch(host, batch_sharding), units

  def run_step(self, step_fn: Callable, state, batch, step: int, units: float):
    """``state, metrics = step_fn(state, batch)`` as update ``step`` (1-based, after the call);
    the first call is timed to completion (compile + run) and logged."""
    t0 = time.perf_counter()
    state, step_metrics = step_fn(state, batch)
    if self.compile_s is None:
      jax.block_until_ready(step_metrics)
      self.compile_s = time.perf_counter() - t0
      self.writer.write_scalars(step, {"compile_s": self.compile_s,
                                       "total_params": self.total_params})
      print(f"first step (compile + run): {self.compile_s:.1f} s; params: {self.total_params}",
            flush=True)
    self.buffer.add(step, step_metrics)
    self.progress.update(step, units)
    return state, step_metrics

  def maybe_log(self, step: int, log_every: int, extra: dict[str, Any] | None = None
                ) -> tuple[int, dict] | None:
    """Every ``log_every`` steps (and at the last): the averaged window of the step before
    (the newest stays pending, so the device never stalls) with bad-input counts, progress,
    non-finite totals and ``extra``, written. Returns ``(log_step, scalars)`` or None."""
    if step % log_every and step != self.total_steps:
      return None
    flushed = self.buffer.flush()
    if flushed is None:
      return None
    log_step, scalars = flushed
    self.nonfinite.update(scalars)
    scalars.update({f"bad/{k}": v for k, v in self.bad_counts.items()})
    scalars.update(self.progress.summary())
    scalars["nonfinite_total"] = self.nonfinite.total
    scalars.update(extra or {})
    self.writer.write_scalars(log_step, scalars)
    return log_step, scalars

  def drain(self, extra: dict[str, Any] | None = None) -> tuple[int, dict] | None:
    """Writes whatever is still buffered (after the loop) with ``extra``; returns it or None."""
    tail = self.buffer.drain()
    if tail is not None:
      tail[1].update(extra or {})
      self.writer.write_scalars(tail[0], tail[1])
    return tail

  def summary(self) -> dict:
    """Compile time, bad inputs and throughput for the run summary."""
    return {"compile_s": self.compile_s, "total_params": self.total_params,
            "bad_inputs": self.bad_counts, **self.progress.summary()}

  def close(self) -> None:
    self.progress.close()


def stop_reason(config, manager, preemption, step: int) -> str | None:
  """Why the loop must stop after ``step`` ('preempted' — the handler saved — or
  'stop_after_steps'), or None to go on."""
  if preemption.should_stop(manager, step):
    return "preempted"
  if config.stop_after_steps and step >= config.stop_after_steps:
    return "stop_after_steps"
  return None


def close_all(preemption, log: StepLog, writer, data_iter) -> None:
  """End of a loop, however it ended: signal handlers restored, progress/metric writers and the
  data iterator (its worker processes) closed."""
  preemption.uninstall()
  log.close()
  writer.close()
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def finish(workdir: str, stop: str, step: int, summary: dict, *, what: str = "student") -> None:
  """After the loop: the msgpack export of a finished run (process 0; ``what`` names the params
  in the message) and ``summary.json`` (process 0) or ``summary.p<i>.json`` — every host reports
  its own view, so hosts can be compared."""
  if stop == "finished" and jax.process_index() == 0:
    out = os.path.join(workdir, "export", "params.msgpack")
    export.export_workdir(workdir, out)
    print(f"exported {what} params to {out}", flush=True)
  p = jax.process_index()
  with open(os.path.join(workdir, "summary.json" if p == 0 else f"summary.p{p}.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  print(f"{stop} at step {step}: {summary}", flush=True)
