"""Training curves from ``metrics.jsonl`` as PNG files (matplotlib, Agg: no display needed).

    python -m d2vjax.plot --workdir=DIR [--out=DIR] [--all]

Writes ``loss.png``, ``variance.png`` (``target_var``, ``pred_var``), ``lr.png``,
``ema_decay.png`` and, with ``--all``, one PNG per other numeric key. Missing keys are skipped
with a note. If a resumed run logged some steps twice, the later value wins.
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, no display

import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from d2vjax.metrics import METRICS_FILE, read_jsonl  # noqa: E402

__all__ = ["plot_workdir", "load_series", "PANELS"]

# file stem → (title, keys, y log scale)
PANELS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "loss": ("loss", ("loss",), False),
    "variance": ("target / prediction std (collapse watch)", ("target_var", "pred_var"), True),
    "lr": ("learning rate", ("lr",), False),
    "ema_decay": ("EMA decay", ("ema_decay",), False),
}


def load_series(path) -> dict[str, tuple[list[int], list[float]]]:
  """``{key: (steps, values)}`` from a metrics JSONL, sorted by step, later duplicates winning."""
  by_key: dict[str, dict[int, float]] = {}
  for row in read_jsonl(path):
    if "step" not in row:
      continue
    step = int(row["step"])
    for k, v in row.items():
      if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      by_key.setdefault(k, {})[step] = float(v)
  return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_key.items()}


def _safe_name(key: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def _plot(path: str, title: str, series: dict, keys: Sequence[str], log_y: bool) -> str:
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  positive = True
  for k in keys:
    steps, values = series[k]
    ax.plot(steps, values, label=k, linewidth=1.2)
    positive &= all(v > 0 for v in values if math.isfinite(v))
  if log_y and positive:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.grid(True, alpha=0.3)
  if len(keys) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_workdir(workdir, out_dir=None, *, all_keys: bool = False) -> list[str]:
  """Writes the PNG curves of ``workdir/metrics.jsonl`` and returns their paths.

  Args:
    workdir: run directory holding ``metrics.jsonl``.
    out_dir: where to write; default ``workdir/plots``.
    all_keys: also one PNG per numeric key not in the standard panels.
  """
  workdir = os.fspath(workdir)
  src = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(src):
    raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
  out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  series = load_series(src)
  written, used = [], set()
  for stem, (title, keys, log_y) in PANELS.items():
    present = [k for k in keys if k in series]
    missing = [k for k in keys if k not in series]
    if missing:
      logging.info("plot: %s not in %s; skipped", ", ".join(missing), src)
    if present:
      written.append(_plot(os.path.join(out_dir, f"{stem}.png"), title, series, present, log_y))
      used.update(present)
  if all_keys:
    for k in sorted(set(series) - used):
      written.append(_plot(os.path.join(out_dir, f"{_safe_name(k)}.png"), k, series, [k], False))
  return written


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory containing metrics.jsonl.")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/plots).")
  flags.DEFINE_bool("all", False, "Also plot every other numeric key.")
  flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
  del argv
  for path in plot_workdir(FLAGS.workdir, FLAGS.out, all_keys=FLAGS.all):
    print(path)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
