"""Metrics without host syncs in the hot loop: JSONL + TensorBoard writer, a device-side window
buffer, a progress line with ETA and audio-seconds/s, collapse and non-finite guards, and the
parameter overview printed at init (jax-style §3; user-needs C2, G3, A1).

Only process 0 writes (files, TensorBoard, progress); every process may call everything.

``metrics.jsonl`` holds one JSON object per line: ``{"step": int, "<name>": float | null, ...}``.
Non-finite values (NaN, ±inf) are written as ``null`` so every line stays strict JSON (Python's
``json`` would otherwise emit the non-standard ``NaN``); TensorBoard receives the raw value. After
a resume the file is appended to, so a step may appear twice: the later line is the resumed run's.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

__all__ = [
    "MetricWriter", "MetricBuffer", "Progress", "CollapseGuard", "NonFiniteCounter",
    "parameter_table", "format_parameter_table", "to_float", "read_jsonl",
]

METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text.jsonl"
TB_DIR = "tb"


def to_float(value) -> float:
  """Python float from a Python/numpy/jax scalar (or any size-1 array)."""
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"expected a scalar metric, got shape {arr.shape}")
  return float(arr.reshape(()))


def _json_value(x: float) -> float | None:
  return x if math.isfinite(x) else None


def read_jsonl(path) -> list[dict]:
  """Rows of a ``metrics.jsonl`` file (``null`` → NaN); blank or torn last lines are skipped."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a crash mid-write
        continue
      rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
  return rows


class MetricWriter:
  """Scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb/``), process 0 only.

  Args:
    workdir: local directory (created).
    process_index: writer is active only when this is 0; default ``jax.process_index()``.
    tensorboard: also write TensorBoard event files via tensorboardX (skipped with a warning
      if it cannot be imported or the directory cannot be opened).
  """

  def __init__(self, workdir, *, process_index: int | None = None, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self._file = None
    self._text_file = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    # Appending keeps the pre-preemption history of a resumed run in the same file.
    self._file = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("MetricWriter: TensorBoard disabled (%s: %s)", type(e).__name__, e)

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, METRICS_FILE)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One JSONL line ``{"step": step, **scalars}`` plus one TB scalar per key."""
    if not self.active:
      return
    values = {str(k): to_float(v) for k, v in scalars.items()}
    row = {"step": int(step)}
    row.update({k: _json_value(v) for k, v in values.items()})
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Free text (config, parameter table, warnings): TB text, ``text.jsonl`` and the log."""
    if not self.active:
      return
    logging.info("[%s @ %d]\n%s", tag, step, text)
    if self._text_file is None:
      self._text_file = open(os.path.join(self.workdir, TEXT_FILE), "a", encoding="utf-8")
    self._text_file.write(json.dumps({"step": int(step), "tag": tag, "text": str(text)}) + "\n")
    if self._tb is not None:
      # TensorBoard renders markdown; indent so tables keep their columns.
      self._tb.add_text(tag, "    " + str(text).replace("\n", "\n    "), int(step))

  def flush(self) -> None:
    for f in (self._file, self._text_file):
      if f is not None:
        f.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes; further writes are dropped."""
    self.flush()
    for f in (self._file, self._text_file):
      if f is not None:
        f.close()
    if self._tb is not None:
      self._tb.close()
    self._file = self._text_file = self._tb = None
    self.active = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


DEFAULT_LAST_KEYS = ("lr", "ema_decay", "gumbel_temp")


class MetricBuffer:
  """Per-step metric dicts kept on device; one host transfer per logging window (C2).

  ``add`` never blocks: it stores the step's jax scalars and starts their device→host copy.
  ``flush`` fetches the window and returns, per key, the mean over the steps that had it, the last
  value for ``last_keys`` (schedules such as learning rate and EMA decay) and the sum for
  ``sum_keys`` (counts such as ``nonfinite``). NaN/inf propagate into the mean on purpose.

  Double buffering: by default ``flush`` leaves the newest ``lag=1`` step(s) pending for the next
  window, so it only waits for steps that finished before the one still executing; with a
  window of N steps the reported step is the last fetched one (N·k − 1 when flushing at N·k).
  ``drain`` fetches everything (end of training, before eval or a preemption save).
  """

  def __init__(self, *, last_keys: Sequence[str] = DEFAULT_LAST_KEYS,
               sum_keys: Sequence[str] = ("nonfinite",), lag: int = 1):
    self.last_keys = frozenset(last_keys)
    self.sum_keys = frozenset(sum_keys)
    self.lag = int(lag)
    self._pending: list[tuple[int, dict]] = []

  def __len__(self) -> int:
    return len(self._pending)

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Keeps ``metrics`` (scalars: jax/numpy/Python) of ``step`` until the next ``flush``."""
    for k, v in metrics.items():
      if np.ndim(v) != 0:
        raise ValueError(f"MetricBuffer: metric {k!r} has shape {np.shape(v)}; log scalars")
      copy = getattr(v, "copy_to_host_async", None)
      if copy is not None:
        try:
          copy()
        except Exception:  # pylint: disable=broad-except
          pass  # e.g. not addressable here; device_get still handles it
    self._pending.append((int(step), dict(metrics)))

  def flush(self, *, lag: int | None = None) -> tuple[int, dict[str, float]] | None:
    """``(last_step, reduced)`` over all but the newest ``lag`` steps, or None if none are due."""
    lag = self.lag if lag is None else int(lag)
    n = len(self._pending) - max(0, lag)
    if n <= 0:
      return None
    window, self._pending = self._pending[:n], self._pending[n:]
    host = jax.device_get([m for _, m in window])
    values: dict[str, list[float]] = collections.defaultdict(list)
    for m in host:
      for k, v in m.items():
        values[k].append(float(np.asarray(v)))
    out = {}
    for k, vs in values.items():
      if k in self.last_keys:
        out[k] = vs[-1]
      elif k in self.sum_keys:
        out[k] = float(np.sum(vs, dtype=np.float64))
      else:
        out[k] = float(np.mean(vs, dtype=np.float64))
    return window[-1][0], out

  def drain(self) -> tuple[int, dict[str, float]] | None:
    """``flush`` with no lag: every pending step."""
    return self.flush(lag=0)


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  days, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{days}d " if days else "") + f"{h:d}:{m:02d}:{s:02d}"


class Progress:
  """Progress with ETA, steps/s and ``unit``/s (e.g. audio seconds per wall second).

  The first ``update`` after construction (or ``restart``) is the compiling step: its time is
  reported on its own (``first_step_s``) and left out of every rate and of the ETA.

  On process 0 a tqdm bar goes to ``file`` (stderr) when it is a terminal; otherwise (log files,
  Slurm) a plain line is printed every ``interval_s`` seconds instead of carriage-return noise.

  Rates are measured between ``update`` calls. With asynchronous dispatch, call ``update`` where
  the step's outputs are known to be done (e.g. after a metrics fetch) for exact windows; over
  many steps the dispatch queue is bounded, so dispatch-time rates converge to the true ones.

  Args:
    total_steps: last step of the run.
    unit: name of the per-step amount passed to ``update`` (``audio_s``, ``tokens``, ``images``).
    start_step: step the run resumes from.
    desc: label in the progress line.
    process_index: default ``jax.process_index()``; only 0 prints.
    file: default ``sys.stderr``.
    interval_s: seconds between plain (non-TTY) lines.
    use_tqdm: default: whether ``file`` is a TTY.
    clock: seconds, monotonic (injectable for tests).
  """

  def __init__(self, total_steps: int, *, unit: str = "audio_s", start_step: int = 0,
               desc: str = "train", process_index: int | None = None, file=None,
               interval_s: float = 30.0, use_tqdm: bool | None = None,
               clock: Callable[[], float] = time.perf_counter):
    self.total_steps = int(total_steps)
    self.unit = unit
    self.desc = desc
    self.start_step = int(start_step)
    self.interval_s = float(interval_s)
    self._clock = clock
    self._file = sys.stderr if file is None else file
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    if use_tqdm is None:
      isatty = getattr(self._file, "isatty", None)
      use_tqdm = bool(isatty and isatty())
    self._bar = None
    if self.active and use_tqdm:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=desc, unit="step",
                       file=self._file, dynamic_ncols=True, smoothing=0.05)
    self.restart()

  def restart(self) -> None:
    """Restarts the clock; the next ``update`` counts as the (compiling) first step."""
    self._t0 = self._clock()
    self._t_first = None  # time of the first update
    self._t_last = None
    self._step = self.start_step
    self._first_step = None
    self._n_after_first = 0  # steps after the first update
    self._amount_after_first = 0.0
    self._amount_total = 0.0
    self._first_step_s = math.nan
    self._last_print = self._t0

  def update(self, step: int, amount: float = 0.0) -> None:
    """Marks ``step`` done; ``amount`` is this step's work in ``unit`` (e.g. audio seconds)."""
    now = self._clock()
    step = int(step)
    amount = float(amount)
    delta = step - self._step
    self._amount_total += amount
    if self._t_first is None:
      self._t_first = now
      self._first_step = step
      self._first_step_s = now - self._t0
      self._log(f"{self.desc}: first step (compilation included) took {self._first_step_s:.2f} s")
    else:
      self._n_after_first += max(delta, 0)
      self._amount_after_first += amount
    self._t_last = now
    self._step = step
    if not self.active:
      return
    if self._bar is not None:
      self._bar.set_postfix_str(f"{self.units_per_s:.1f} {self.unit}/s", refresh=False)
      self._bar.update(max(delta, 0))
    elif now - self._last_print >= self.interval_s or step >= self.total_steps:
      self._last_print = now
      self._log(self.line())

  def _log(self, msg: str) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(msg, file=self._file)
    else:
      print(msg, file=self._file, flush=True)

  @property
  def _span(self) -> float:
    if self._t_first is None or self._t_last is None:
      return 0.0
    return self._t_last - self._t_first

  @property
  def steps_per_s(self) -> float:
    span = self._span
    return self._n_after_first / span if span > 0 else math.nan

  @property
  def units_per_s(self) -> float:
    span = self._span
    return self._amount_after_first / span if span > 0 else math.nan

  @property
  def eta_s(self) -> float:
    rate = self.steps_per_s
    remaining = max(self.total_steps - self._step, 0)
    if remaining == 0:
      return 0.0
    return remaining / rate if rate > 0 else math.nan

  def line(self) -> str:
    """One plain progress line (what non-TTY runs print)."""
    pct = 100.0 * self._step / max(self.total_steps, 1)
    return (f"{self.desc} {self._step}/{self.total_steps} ({pct:.1f}%) "
            f"{self.steps_per_s:.3f} steps/s {self.units_per_s:.1f} {self.unit}/s "
            f"ETA {_fmt_duration(self.eta_s)} (first step {self._first_step_s:.1f} s)")

  def summary(self) -> dict[str, float]:
    """Floats for the metric writer: ``steps_per_s``, ``<unit>_per_s``, ``first_step_s``,
    ``elapsed_s``, ``eta_s``, ``total_<unit>`` (rates exclude the first step)."""
    now = self._clock()
    return {"steps_per_s": self.steps_per_s, f"{self.unit}_per_s": self.units_per_s,
            "first_step_s": self._first_step_s, "elapsed_s": now - self._t0,
            "eta_s": self.eta_s, f"total_{self.unit}": self._amount_total}

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class CollapseGuard:
  """Detects representation collapse from a logged variance (user-needs A1, FM4).

  ``check`` is called once per logged window. When ``metrics[key]`` has been below ``threshold``
  for ``patience`` consecutive windows (counting only from ``start_step``), it returns a message
  saying what collapsed and what to change; it fires once per collapse episode (``collapsed``
  stays True while the value stays low) and re-arms after one window at or above the threshold.
  Windows without the key, or with a non-finite value, leave the count unchanged.
  ``threshold <= 0`` disables the guard.
  """

  def __init__(self, threshold: float, patience: int, key: str = "target_var",
               start_step: int = 0):
    self.threshold = float(threshold)
    self.patience = max(1, int(patience))
    self.key = key
    self.start_step = int(start_step)
    self.count = 0

  @property
  def enabled(self) -> bool:
    return self.threshold > 0

  @property
  def collapsed(self) -> bool:
    return self.enabled and self.count >= self.patience

  def reset(self) -> None:
    self.count = 0

  def check(self, step: int, metrics: Mapping[str, Any]) -> str | None:
    """Message when the watched value has just stayed low for ``patience`` windows, else None."""
    if not self.enabled or step < self.start_step or self.key not in metrics:
      return None
    value = to_float(metrics[self.key])
    if not math.isfinite(value):
      return None
    if value >= self.threshold:
      self.count = 0
      return None
    self.count += 1
    if self.count != self.patience:
      return None
    what = {"target_var": "teacher targets (EMA model)", "pred_var": "student predictions",
            "prob_ppl": "quantizer codebook usage (Gumbel softmax)"}.get(self.key, self.key)
    return (
        f"Collapse at step {step}: {self.key}={value:.4g} stayed below the threshold "
        f"{self.threshold:g} for {self.patience} consecutive logged windows; the {what} have "
        f"become nearly constant across frames. What to change: lower the learning rate "
        f"(optim.peak_lr), raise the EMA decay or lengthen its anneal (ema.decay, ema.end_decay, "
        f"ema.anneal_steps), check masking (masking.mask_prob, masking.mask_length; is anything "
        f"masked?) and the precision of the teacher (fp32 EMA). The guard itself: "
        f"guard.key, guard.min_value (<= 0 disables), guard.patience, guard.start_step.")


class NonFiniteCounter:
  """Totals the per-step ``nonfinite`` flag (1.0 when the update was skipped for NaN/inf).

  Feed it per-step dicts or ``MetricBuffer`` windows (which sum ``nonfinite`` by default).
  """

  def __init__(self, key: str = "nonfinite"):
    self.key = key
    self.total = 0

  def update(self, metrics: Mapping[str, Any]) -> int:
    """Adds this window's count to ``total`` and returns the count (0 when absent)."""
    if self.key not in metrics:
      return 0
    value = to_float(metrics[self.key])
    n = int(round(value)) if math.isfinite(value) else 0
    self.total += n
    return n


def parameter_table(params, *, depth: int = 1) -> tuple[list[tuple[str, int, int]], int]:
  """Parameter counts grouped by the first ``depth`` keys of each leaf's path.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    depth: path components naming a group (1 = top-level modules).

  Returns:
    ``(rows, total)`` with rows ``(name, num_arrays, num_params)`` in tree order.
  """
  groups: dict[str, list[int]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [_key_str(k) for k in path[:depth]] or ["(root)"]
    name = "/".join(keys)
    size = int(np.prod(np.shape(leaf), dtype=np.int64))
    g = groups.setdefault(name, [0, 0])
    g[0] += 1
    g[1] += size
  rows = [(name, a, n) for name, (a, n) in groups.items()]
  return rows, sum(n for _, _, n in rows)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def format_parameter_table(rows: Iterable[tuple[str, int, int]], total: int) -> str:
  """Aligned text table; the last line is exactly ``total_params: <total>``."""
  rows = list(rows)
  width = max([len("module")] + [len(r[0]) for r in rows])
  lines = [f"{'module':<{width}}  {'arrays':>6}  {'params':>14}  {'share':>6}"]
  for name, arrays, n in rows:
    share = 100.0 * n / total if total else 0.0
    lines.append(f"{name:<{width}}  {arrays:>6d}  {n:>14,d}  {share:>5.1f}%")
  lines.append(f"total_params: {int(total)}")
  return "\n".join(lines)
