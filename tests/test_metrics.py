"""Metric writer, device buffer, progress, guards and the parameter table."""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import metrics as M


def test_writer_jsonl_values_and_nonfinite(tmp_path):
  w = M.MetricWriter(tmp_path, process_index=0, tensorboard=True)
  w.write_scalars(10, {"loss": jnp.float32(1.5), "lr": np.float64(3e-4), "n": 7,
                       "bad": float("nan"), "big": np.float32(np.inf)})
  w.write_scalars(20, {"loss": jnp.asarray([0.25])})
  w.write_text(20, "note", "hello\nworld")
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]  # strict JSON: no NaN/Infinity tokens
  assert rows[0] == {"step": 10, "loss": 1.5, "lr": pytest.approx(3e-4), "n": 7.0, "bad": None,
                     "big": None}
  assert rows[0]["lr"] == float(np.float64(3e-4))
  assert rows[1] == {"step": 20, "loss": 0.25}
  assert isinstance(rows[0]["step"], int)
  for line in lines:
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
  text = json.loads((tmp_path / "text.jsonl").read_text())
  assert text == {"step": 20, "tag": "note", "text": "hello\nworld"}
  tb = list((tmp_path / "tb").iterdir())
  assert tb and all(p.stat().st_size > 0 for p in tb)
  back = M.read_jsonl(tmp_path / "metrics.jsonl")
  assert math.isnan(back[0]["bad"]) and back[1]["loss"] == 0.25


def test_writer_appends_and_only_process_zero_writes(tmp_path):
  with M.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(1, {"a": 1.0})
  with M.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(2, {"a": 2.0})
  assert [r["step"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
  other = tmp_path / "p1"
  w = M.MetricWriter(other, process_index=1)
  w.write_scalars(1, {"a": 1.0})
  w.write_text(1, "t", "x")
  w.close()
  assert not other.exists()
  with pytest.raises(ValueError):
    M.MetricWriter(tmp_path / "v", process_index=0, tensorboard=False).write_scalars(
        1, {"v": np.ones(3)})


def _steps(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    out.append({"loss": jnp.float32(rng.normal()), "target_var": jnp.float32(rng.random()),
                "lr": jnp.float32(1e-4 * (i + 1)), "nonfinite": jnp.float32(i % 3 == 0)})
  return out


def test_metric_buffer_means_last_and_sums():
  steps = _steps(10)
  host = jax.device_get(steps)
  buf = M.MetricBuffer(lag=0)
  for i, m in enumerate(steps[:5], start=1):
    buf.add(i, m)
  step, out = buf.flush()
  assert step == 5
  np.testing.assert_allclose(out["loss"], np.mean([h["loss"] for h in host[:5]], dtype=np.float64),
                             rtol=1e-12)
  np.testing.assert_allclose(out["target_var"],
                             np.mean([h["target_var"] for h in host[:5]], dtype=np.float64),
                             rtol=1e-12)
  assert out["lr"] == float(host[4]["lr"])  # last, not mean
  assert out["nonfinite"] == 2.0  # steps 1 and 4 (i = 0, 3)
  assert buf.flush() is None and len(buf) == 0


def test_metric_buffer_double_buffering_lag():
  steps = _steps(9)
  host = jax.device_get(steps)
  buf = M.MetricBuffer()  # lag=1: the newest step stays pending
  for i, m in enumerate(steps[:4], start=1):
    buf.add(i, m)
  step, out = buf.flush()
  assert step == 3 and len(buf) == 1
  np.testing.assert_allclose(out["loss"], np.mean([h["loss"] for h in host[:3]], dtype=np.float64))
  for i, m in enumerate(steps[4:8], start=5):
    buf.add(i, m)
  step, out = buf.flush()
  assert step == 7  # window = steps 4..7
  np.testing.assert_allclose(out["loss"],
                             np.mean([h["loss"] for h in host[3:7]], dtype=np.float64))
  step, out = buf.drain()
  assert step == 8 and out["loss"] == pytest.approx(float(host[7]["loss"]))
  assert buf.drain() is None
  with pytest.raises(ValueError):
    buf.add(9, {"v": jnp.ones(2)})


def test_metric_buffer_missing_keys_and_nan():
  buf = M.MetricBuffer(lag=0)
  buf.add(1, {"a": 1.0, "b": 5.0})
  buf.add(2, {"a": 3.0})
  buf.add(3, {"a": 5.0, "c": float("nan")})
  _, out = buf.flush()
  assert out["a"] == 3.0 and out["b"] == 5.0 and math.isnan(out["c"])


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_progress_rates_exclude_first_step():
  clock = _Clock()
  out = io.StringIO()
  p = M.Progress(100, unit="audio_s", start_step=10, process_index=0, file=out, interval_s=5.0,
                 clock=clock)
  clock.t += 40.0  # compile
  p.update(11, amount=8.0)
  for s in range(12, 22):  # 10 steps, 0.5 s each, 16 audio seconds each
    clock.t += 0.5
    p.update(s, amount=16.0)
  summ = p.summary()
  assert summ["first_step_s"] == pytest.approx(40.0)
  assert summ["steps_per_s"] == pytest.approx(2.0)
  assert summ["audio_s_per_s"] == pytest.approx(32.0)
  assert summ["eta_s"] == pytest.approx((100 - 21) / 2.0)
  assert summ["total_audio_s"] == pytest.approx(8.0 + 160.0)
  assert summ["elapsed_s"] == pytest.approx(45.0)
  text = out.getvalue()
  assert "first step" in text and "40.00 s" in text
  assert "steps/s" in text and "audio_s/s" in text  # a plain line was printed (not a TTY)
  assert all(json.dumps(v) for v in summ.values())
  p.close()


def test_progress_silent_off_process_zero():
  out = io.StringIO()
  p = M.Progress(10, process_index=1, file=out, interval_s=0.0)
  for s in range(1, 11):
    p.update(s, 1.0)
  assert out.getvalue() == ""
  assert p.summary()["total_audio_s"] == 10.0


def test_progress_tqdm_bar():
  out = io.StringIO()
  p = M.Progress(5, process_index=0, file=out, use_tqdm=True, unit="tokens")
  for s in range(1, 6):
    p.update(s, 3.0)
  p.close()
  assert "5/5" in out.getvalue() and "tokens/s" in out.getvalue()


def test_collapse_guard_patience_and_reset():
  g = M.CollapseGuard(threshold=0.1, patience=3)
  low, high = {"target_var": 0.05}, {"target_var": 0.5}
  assert g.check(1, low) is None
  assert g.check(2, low) is None
  msg = g.check(3, low)
  assert msg is not None and g.collapsed
  for needle in ("target_var", "0.05", "0.1", "optim.peak_lr", "ema.decay", "ema.anneal_steps",
                 "masking.mask_prob"):
    assert needle in msg, needle
  assert g.check(4, low) is None and g.collapsed  # once per episode
  assert g.check(5, high) is None and not g.collapsed
  assert g.check(6, low) is None
  assert g.check(7, {"loss": 1.0}) is None  # key absent: count unchanged
  assert g.check(8, {"target_var": float("nan")}) is None
  assert g.check(9, low) is None
  assert g.check(10, high) is None  # recovered before patience: reset
  assert [g.check(s, low) is not None for s in range(11, 15)] == [False, False, True, False]


def test_collapse_guard_disabled_and_start_step():
  off = M.CollapseGuard(threshold=0.0, patience=1)
  assert all(off.check(s, {"target_var": 0.0}) is None for s in range(5))
  g = M.CollapseGuard(threshold=0.1, patience=1, key="pred_var", start_step=100)
  assert g.check(50, {"pred_var": 0.0}) is None
  assert "pred_var" in g.check(100, {"pred_var": jnp.float32(0.0)})


def test_nonfinite_counter():
  c = M.NonFiniteCounter()
  buf = M.MetricBuffer(lag=0)
  flags = [0, 1, 0, 1, 1, 0]
  for i, f in enumerate(flags):
    buf.add(i, {"nonfinite": jnp.float32(f)})
    assert c.update({"nonfinite": jnp.float32(f)}) == f
  assert c.total == 3
  _, window = buf.flush()
  assert c.update(window) == 3 and c.total == 6
  assert c.update({"loss": 1.0}) == 0


def test_parameter_table_counts_and_format():
  params = {"encoder": {"layer0": {"w": jnp.zeros((4, 5)), "b": jnp.zeros((5,))},
                        "layer1": {"w": jnp.zeros((5, 6))}},
            "feature_extractor": {"conv": {"kernel": jnp.zeros((10, 1, 8))}},
            "mask_emb": jnp.zeros((8,))}
  rows, total = M.parameter_table(params)
  want = {"encoder": (3, 4 * 5 + 5 + 5 * 6), "feature_extractor": (1, 80), "mask_emb": (1, 8)}
  assert {name: (a, n) for name, a, n in rows} == want
  assert total == 55 + 80 + 8
  abstract = jax.eval_shape(lambda: params)
  assert M.parameter_table(abstract) == (rows, total)
  text = M.format_parameter_table(rows, total)
  assert text.splitlines()[-1] == "total_params: 143"
  assert "encoder" in text and "55" in text
  deep, deep_total = M.parameter_table(params, depth=2)
  assert ("encoder/layer0", 2, 25) in deep and deep_total == total
