"""PNG curves from a synthetic metrics.jsonl."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from d2vjax import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, with_ema=True):
  rows = []
  for step in range(10, 210, 10):
    row = {"step": step, "loss": 2.0 / np.sqrt(step), "target_var": 0.5 + 0.01 * np.sin(step),
           "pred_var": 0.4, "lr": 1e-4 * min(step, 100) / 100, "grad_norm": 1.0}
    if with_ema:
      row["ema_decay"] = 0.999 + 9e-4 * step / 200
    rows.append(row)
  rows[3]["loss"] = None  # a non-finite value as MetricWriter writes it
  rows.append({"step": 200, "loss": 0.123})  # resumed run re-logged step 200
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.write('{"step": 210, "los')  # torn last line


def _assert_pngs(paths):
  for p in paths:
    with open(p, "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, p


def test_plot_workdir_writes_pngs(tmp_path):
  _write_metrics(tmp_path / "metrics.jsonl")
  paths = plot.plot_workdir(tmp_path)
  names = sorted(p.rsplit("/", 1)[-1] for p in paths)
  assert names == ["ema_decay.png", "loss.png", "lr.png", "variance.png"]
  _assert_pngs(paths)
  series = plot.load_series(tmp_path / "metrics.jsonl")
  assert series["loss"][0][-1] == 200 and series["loss"][1][-1] == 0.123  # later duplicate wins
  assert np.isnan(series["loss"][1][3])


def test_plot_missing_keys_and_all(tmp_path):
  _write_metrics(tmp_path / "metrics.jsonl", with_ema=False)
  out = tmp_path / "out"
  paths = plot.plot_workdir(tmp_path, out, all_keys=True)
  names = sorted(p.rsplit("/", 1)[-1] for p in paths)
  assert names == ["grad_norm.png", "loss.png", "lr.png", "variance.png"]
  assert all(p.startswith(str(out)) for p in paths)
  _assert_pngs(paths)
  with pytest.raises(FileNotFoundError):
    plot.plot_workdir(tmp_path / "nope")


def test_cli(tmp_path):
  _write_metrics(tmp_path / "metrics.jsonl")
  res = subprocess.run([sys.executable, "-m", "d2vjax.plot", f"--workdir={tmp_path}",
                        f"--out={tmp_path / 'png'}"], capture_output=True, text=True, timeout=120,
                       check=False, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert res.returncode == 0, res.stderr
  printed = res.stdout.split()
  assert len(printed) == 4
  _assert_pngs(printed)
