r"""d2vjax versus Hugging Face PyTorch on the same work, on this machine's CPU, plus MFU.

  python bench/side_by_side.py [--threads=N] [--repeats=5] [--only=speech_tiny,speech_base,vit_base]
                               [--json=side_by_side.json]

Workloads (forward + backward of an encoder, gradients of every parameter, eval mode so that
neither side masks or drops anything):
  speech_tiny  ``Data2VecAudioModel`` with the CPU preset's shape (4 × 256, 64-channel CNN),
               4 clips × 4 s of 16 kHz audio;
  speech_base  ``Data2VecAudioModel`` Base (12 × 768, 512-channel CNN), 2 clips × 4 s;
  vit_base     ``Data2VecVisionModel`` ViT-B/16 (BEiT layer scale, shared relative position
               bias), 2 images × 224².
Each HF model is randomly initialised, converted with ``d2vjax.convert`` (so both sides hold the
same weights; the outputs are compared as a check that both compute the same function) and run on
the same random input. Loss: mean square of the final hidden states. Both sides use the same
threads: the process is pinned to ``--threads`` cores (``sched_setaffinity``, before jax and torch
start) and torch gets ``set_num_threads``. Time: median of ``--repeats`` after 2 warm-up runs,
``block_until_ready`` on the d2vjax side; d2vjax compile time is reported separately.

MFU = analytic FLOPs (``bench/flops.py``; XLA's ``cost_analysis`` count alongside) / time / the
machine's peak, measured here by a matmul probe (the best of jax and torch on square fp32
matmuls; a CPU has no trustworthy datasheet peak under shared load and turbo).

Prints a table and writes JSON. Not a timed test: numbers belong in docs/benchmarks.md with the
machine, versions and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

WORKLOADS = ("speech_tiny", "speech_base", "vit_base")


def _pin(threads: int) -> list[int]:
  """Pins this process to ``threads`` cores before jax/torch create their thread pools."""
  cores = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cores)
  return cores


def matmul_peak(repeats: int) -> dict:
  """FLOP/s of square fp32 matmuls in jax and torch (n = 1024, 2048): the best of each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  out = {"jax": timing.jax_matmul_peak((1024, 2048), repeats), "torch": 0.0}
  for n in (1024, 2048):
    ta = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    with torch.no_grad():
      out["torch"] = max(out["torch"], 2.0 * n ** 3 / timing.median_s(lambda: ta @ ta, repeats))
  out["peak"] = max(out["jax"], out["torch"])
  return out


def _hf_model(name: str):
  """(HF model in eval mode, input dict of numpy arrays, torch input kwargs builder)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from d2vjax.convert import parity  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  if name.startswith("speech"):
    kw = {}
    if name == "speech_tiny":  # the CPU preset's shape (configs_lib.cpu_preset, tiny encoder)
      kw = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=1024, conv_dim=(64,) * 7)
    torch.manual_seed(0)
    model = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**kw))
    rows = 4 if name == "speech_tiny" else 2
    wav = rng.standard_normal((rows, 4 * 16000)).astype(np.float32)
    inputs = {"audio": wav, "padding_mask": np.zeros(wav.shape, bool)}
    return parity.perturb(model), inputs, lambda: {"input_values": torch.from_numpy(wav)}
  model = parity.random_model("data2vec-vision")
  img = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
  chw = torch.from_numpy(img.transpose(0, 3, 1, 2).copy())
  return model, {"image": img}, lambda: {"pixel_values": chw}


def unstack_layers(params: dict) -> dict:
  """Scanned ``encoder/layers`` leaves ``[L, ...]`` → unrolled ``encoder/layers_<i>`` subtrees."""
  import jax  # pylint: disable=g-import-not-at-top
  enc = dict(params["encoder"])
  stacked = enc.pop("layers", None)
  if stacked is None:
    return params
  for i in range(jax.tree.leaves(stacked)[0].shape[0]):
    enc[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return {**params, "encoder": enc}


def run_workload(name: str, repeats: int, peak: float) -> dict:
  """Times one workload on both sides; returns its row."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  from d2vjax import convert, registry  # pylint: disable=g-import-not-at-top

  model, inputs, torch_inputs = _hf_model(name)
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  params, config, _ = convert.convert_state(state, "hf", model.config.to_dict())
  with config.unlocked():
    if "feature_grad_mult" in config.model:
      config.model.feature_grad_mult = 1.0  # the CNN trains, as in HF's default
    # Unrolled blocks: as fast as the scanned stack on CPU (measured: tiny 3.29 vs 3.32 s) and
    # XLA's cost analysis counts a while-loop body once, so only the unrolled count cross-checks.
    config.model.encoder.scan = False
  objective = registry.get("objective", config.objective)(config)
  params = jax.tree.map(jnp.asarray, unstack_layers(params))
  x_inputs = jax.tree.map(jnp.asarray, inputs)

  def loss_fn(p, batch):
    x, _, _ = objective.encode(p, batch)
    return jnp.mean(jnp.square(x.astype(jnp.float32)))

  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, x_inputs).compile()
  compile_s = time.perf_counter() - t0
  jax_s = timing.median_s(lambda: jax.block_until_ready(compiled(params, x_inputs)), repeats)

  tin = torch_inputs()

  def torch_step():
    model.zero_grad(set_to_none=True)
    loss = model(**tin).last_hidden_state.square().mean()
    loss.backward()
    return loss

  torch_s = timing.median_s(torch_step, repeats)
  with torch.no_grad():
    hf_last = model(**tin).last_hidden_state.numpy()
  ours = np.asarray(objective.encode(params, x_inputs)[0])
  agree = float(np.max(np.abs(ours - hf_last)) / np.max(np.abs(hf_last)))

  m = config.model
  if name.startswith("speech"):
    rows, samples = inputs["audio"].shape
    fwd = flops.speech_encoder(samples, rows, m)
    units, unit = rows * samples / 16000.0, "audio_s"
  else:
    rows = inputs["image"].shape[0]
    fwd = flops.vision_encoder(inputs["image"].shape[1], rows, m)
    units, unit = float(rows), "images"
  step_flops = flops.train_step(fwd)
  return {"workload": name, "d2vjax_ms": 1e3 * jax_s, "torch_ms": 1e3 * torch_s,
          "ratio": jax_s / torch_s, "gflop": step_flops / 1e9,
          "xla_gflop": (flops.xla_flops(compiled) or float("nan")) / 1e9,
          "d2vjax_mfu": step_flops / jax_s / peak, "torch_mfu": step_flops / torch_s / peak,
          "d2vjax_units_per_s": units / jax_s, "torch_units_per_s": units / torch_s,
          "unit": unit, "compile_s": compile_s, "max_rel_diff_outputs": agree,
          "params_m": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) / 1e6}


def table(rows: list[dict], peak: dict) -> str:
  """The markdown table of the rows."""
  lines = [f"matmul peak (fp32): jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
           f"{peak['torch'] / 1e9:.1f} GFLOP/s → MFU against {peak['peak'] / 1e9:.1f}", "",
           "| workload | params | d2vjax ms | PyTorch ms | ratio d2vjax/PyTorch | GFLOP/step "
           "(analytic / XLA) | d2vjax MFU | PyTorch MFU | throughput d2vjax / PyTorch | "
           "compile s | output diff |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['workload']} | {r['params_m']:.1f} M | {r['d2vjax_ms']:.0f} | {r['torch_ms']:.0f} "
        f"| **{r['ratio']:.2f}** | {r['gflop']:.1f} / {r['xla_gflop']:.1f} | "
        f"{100 * r['d2vjax_mfu']:.0f} % | {100 * r['torch_mfu']:.0f} % | "
        f"{r['d2vjax_units_per_s']:.2f} / {r['torch_units_per_s']:.2f} {r['unit']}/s | "
        f"{r['compile_s']:.1f} | {r['max_rel_diff_outputs']:.1e} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default=",".join(WORKLOADS))
  p.add_argument("--json", default="side_by_side.json")
  args = p.parse_args()
  names = [n for n in args.only.split(",") if n]
  bad = sorted(set(names) - set(WORKLOADS))
  if bad:
    raise SystemExit(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
  cores = _pin(args.threads)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  peak = matmul_peak(args.repeats)
  rows = []
  for name in names:
    rows.append(run_workload(name, args.repeats, peak["peak"]))
    print(f"{name}: d2vjax {rows[-1]['d2vjax_ms']:.0f} ms, PyTorch {rows[-1]['torch_ms']:.0f} ms",
          flush=True)
  import transformers  # pylint: disable=g-import-not-at-top
  meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
          "cores": cores, "threads": args.threads, "load_avg_1m": os.getloadavg()[0],
          "jax": jax.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__, "repeats": args.repeats}
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "peak": peak, "rows": rows}, f, indent=1)
  print(json.dumps(meta))
  print(table(rows, peak))


if __name__ == "__main__":
  main()
