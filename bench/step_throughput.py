r"""Train-step throughput, compile time and MFU of the trainer's own step, per config.

  python bench/step_throughput.py [--configs=configs/speech_base.py:cpu,...] [--steps=10]
                                  [--peak_gflops=P] [--json=step_throughput.json]

For each config: ``train.build`` (the mesh over all local devices, sharding rules, optimizer,
EMA, accumulation exactly as ``python -m d2vjax.train`` runs them), the state initialised, a few
batches from the real data pipeline (host masks included), the step compiled (timed), 2 warm-up
updates, then ``--steps`` updates timed one by one with ``block_until_ready``; the median is
reported with the modality's unit (audio-s/s, images/s, tokens/s).

FLOPs per update: XLA's ``cost_analysis`` of the compiled step (with ``encoder.scan`` off, since
XLA counts a scanned loop body once) and an analytic count (``bench/flops.py``: data2vec 1.0 =
student forward + backward + teacher forward, the speech teacher without the CNN it shares;
wav2vec 2.0 = forward + backward; heads, quantizer and element-wise work left out; data2vec 2.0
has no analytic count here: its M clones on kept tokens and decoder are counted by XLA only).
MFU = FLOPs / time / peak; the peak is ``--peak_gflops`` (e.g. 989 for an H100 SXM's dense bf16,
or the matmul probe of ``bench/side_by_side.py`` on a CPU) or, unset, measured here with a jax
fp32 matmul probe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from d2vjax import loop, train  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ("configs/speech_base.py:cpu,configs/vision_base.py:cpu,configs/text_base.py:cpu,"
           "configs/w2v2_base.py:cpu,configs/speech_d2v2_base.py:cpu,"
           "configs/vision_d2v2_base.py:cpu,configs/text_d2v2_base.py:cpu")


def load(spec: str):
  """``path[:arg]`` → the config (``get_config(arg)``), unlocked copy."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None).copy_and_resolve_references()


def _speech(c, batch):
  rows, samples = batch["audio"].shape
  return flops.speech_encoder(samples, rows, c.model), flops.transformer(
      int(np.asarray(batch["mask"]).shape[-1]), rows, c.model.encoder)


def _vision(c, batch):
  rows, size = batch["image"].shape[:2]
  enc = flops.vision_encoder(size, rows, c.model)
  return enc, enc


def _text(c, batch):
  rows, tokens = batch["tokens"].shape
  enc = flops.transformer(tokens, rows, c.model.encoder)
  return enc, enc


# (objective, modality) → encoder forward and teacher forward FLOPs of one batch.
ENCODER_FLOPS = {"speech": _speech, "vision": _vision, "text": _text}
STEP_MULTIPLE = {"data2vec": (3.0, 1.0), "wav2vec2": (3.0, 0.0)}  # (× student fwd, × teacher)


def analytic_flops(c, batch) -> float | None:
  """Analytic FLOPs of one update, or None where this module has no count (data2vec 2.0)."""
  if c.objective not in STEP_MULTIPLE:
    return None
  student, teacher = ENCODER_FLOPS[c.modality](c, batch)
  a, b = STEP_MULTIPLE[c.objective]
  return a * student + b * teacher


def measure(spec: str, steps: int, peak: float) -> dict:
  """Compiles and times the trainer's step of one config; returns its row."""
  c = load(spec)
  c.model.encoder.scan = False
  c.async_checkpointing = False
  setup = train.build(c, jax.devices())
  it = setup.modality.make_iterator(c.data, examples=setup.examples, seed=c.data.seed,
                                    batch_multiple=setup.row_multiple,
                                    batch_fn=setup.modality.mask_fn(c.masking))
  # The first batch fixes the compiled shape; later ones are kept only if they share it.
  batches, units = [], []
  while len(batches) < 4:
    host, _ = loop.split_host(next(it))
    if batches and any(host[k].shape != batches[0][k].shape for k in host):
      continue
    batches.append(jax.device_put(host, setup.batch_sharding))
    units.append(setup.modality.batch_units(host))
  getattr(it, "close", lambda: None)()
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(setup.rng)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  state, m, times = timing.time_steps(compiled, state, batches, steps)
  sec = statistics.median(times)
  xla = flops.xla_flops(compiled)
  ana = analytic_flops(c, jax.tree.map(np.asarray, batches[0]))
  used = ana if ana is not None else xla
  return {"config": spec, "objective": c.objective, "params_m": setup.total_params / 1e6,
          "batch": {k: list(v.shape) for k, v in batches[0].items()},
          "devices": len(jax.devices()), "compile_s": compile_s, "step_ms": 1e3 * sec,
          "units_per_s": float(np.mean(units)) / sec, "unit": setup.modality.unit,
          "analytic_gflop": None if ana is None else ana / 1e9,
          "xla_gflop": None if xla is None else xla / 1e9,
          "mfu": None if used is None else used / sec / peak,
          "mfu_basis": "analytic" if ana is not None else "xla", "loss": float(m["loss"])}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default=DEFAULT, help="comma-separated path[:arg] specs")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak_gflops", type=float, default=0.0)
  p.add_argument("--json", default="step_throughput.json")
  args = p.parse_args()
  peak = args.peak_gflops * 1e9 or timing.jax_matmul_peak()
  rows = []
  for spec in [s for s in args.configs.split(",") if s]:
    rows.append(measure(spec, args.steps, peak))
    r = rows[-1]
    print(f"{spec}: {r['step_ms']:.0f} ms/update, {r['units_per_s']:.1f} {r['unit']}/s, "
          f"compile {r['compile_s']:.1f} s", flush=True)
  dev = jax.devices()[0]
  meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": dev.device_kind,
          "platform": dev.platform, "devices": len(jax.devices()), "jax": jax.__version__,
          "peak_gflops": peak / 1e9, "peak_basis": "given" if args.peak_gflops else "fp32 matmul",
          "load_avg_1m": os.getloadavg()[0], "steps": args.steps}
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(json.dumps(meta))
  print("| config | params | batch | ms/update | throughput | compile s | GFLOP/update "
        "(analytic / XLA) | MFU |\n|---|---|---|---|---|---|---|---|")
  fmt = lambda v: "—" if v is None else f"{v:.1f}"
  for r in rows:
    shape = "×".join(str(d) for d in next(iter(r["batch"].values())))
    mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.0f} % ({r['mfu_basis']})"
    print(f"| {r['config']} | {r['params_m']:.1f} M | {shape} | {r['step_ms']:.0f} | "
          f"{r['units_per_s']:.1f} {r['unit']}/s | {r['compile_s']:.1f} | "
          f"{fmt(r['analytic_gflop'])} / {fmt(r['xla_gflop'])} | {mfu} |")


if __name__ == "__main__":
  main()
