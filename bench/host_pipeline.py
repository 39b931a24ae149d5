r"""Host data path: span masks per second versus Hugging Face, and decode + crop + mask time per
batch versus the train step's time.

  python bench/host_pipeline.py [--config=configs/speech_base.py:cpu] [--batches=20]
                                [--json=host_pipeline.json]

1. Masks: ``masking.span_mask`` (fairseq ``compute_mask_indices`` semantics, d2vjax's host
   masking) against transformers' NumPy ``_compute_mask_indices`` on the same problem: B = 64
   rows, T = 781 frames (15.6 s clips), mask_prob 0.65, span 10, min_masks 2; once with every row
   full length and once with row lengths drawn from 400–781 frames (HF reads them from an
   attention mask). Median over repeats, reported as masks (rows) per second.
2. Pipeline: batches of ``--config``'s data section read from its source with ``num_workers`` 0
   in this process (read/decode + crop or pad to the bucket + host mask hook: the work a grain
   worker does per batch), timed one by one; against the median train-step time of the same
   config on these batches (``bench/step_throughput.py``'s measurement). With grain workers the
   host work overlaps the step; it must stay below the step time per worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_throughput  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from d2vjax import masking  # noqa: E402  pylint: disable=wrong-import-position

B, T, PROB, SPAN, MIN_MASKS = 64, 781, 0.65, 10, 2


def _rate(fn, repeats: int) -> float:
  """Rows masked per second by ``fn`` (one call masks B rows)."""
  return B / timing.median_s(fn, repeats, warmup=1)


def mask_rates(repeats: int = 20) -> dict:
  """Rows masked per second, d2vjax vs HF, full-length and variable-length rows."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.wav2vec2 import modeling_wav2vec2 as hf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lengths = rng.integers(400, T + 1, B)
  attn = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None]).long()
  full = np.full(B, T)
  ours = lambda lens: masking.span_mask(rng, lens, T, mask_prob=PROB, mask_length=SPAN,
                                        min_masks=MIN_MASKS, require_same_masks=False)
  out = {
      "d2vjax_full": _rate(lambda: ours(full), repeats),
      "hf_full": _rate(lambda: hf._compute_mask_indices((B, T), PROB, SPAN, None, MIN_MASKS),  # pylint: disable=protected-access
                       repeats),
      "d2vjax_var": _rate(lambda: ours(lengths), repeats),
      "hf_var": _rate(lambda: hf._compute_mask_indices((B, T), PROB, SPAN, attn, MIN_MASKS),  # pylint: disable=protected-access
                      repeats),
  }
  # Same statistics: masked fraction of full rows (fairseq/HF ≈ 0.49 for 0.65 × 10).
  out["d2vjax_masked_frac"] = float(ours(full).mean())
  out["hf_masked_frac"] = float(hf._compute_mask_indices((B, T), PROB, SPAN, None, MIN_MASKS).mean())  # pylint: disable=protected-access
  return out


def pipeline_times(spec: str, batches: int) -> dict:
  """Seconds per host batch (decode + crop + mask, one process) for ``spec``'s data."""
  c = step_throughput.load(spec)
  c.data.num_workers = 0
  from d2vjax import registry  # pylint: disable=g-import-not-at-top
  modality = registry.get("modality", c.modality)
  examples, _ = modality.examples(c.data, "train")
  it = modality.make_iterator(c.data, examples=examples, seed=c.data.seed, batch_multiple=1,
                              batch_fn=modality.mask_fn(c.masking))
  next(it)  # first batch: file listing, plan and caches
  times, units = [], []
  for _ in range(batches):
    t0 = time.perf_counter()
    b = next(it)
    times.append(time.perf_counter() - t0)
    units.append(modality.batch_units(b))
  getattr(it, "close", lambda: None)()
  return {"host_ms_per_batch": 1e3 * statistics.median(times),
          "host_ms_p90": 1e3 * float(np.percentile(times, 90)),
          "units_per_batch": float(np.mean(units)), "unit": modality.unit}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/speech_base.py:cpu")
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--json", default="host_pipeline.json")
  args = p.parse_args()
  masks = mask_rates()
  print(f"span masks (B={B}, T={T}): d2vjax {masks['d2vjax_full']:.0f} rows/s vs HF "
        f"{masks['hf_full']:.0f} rows/s (full length); {masks['d2vjax_var']:.0f} vs "
        f"{masks['hf_var']:.0f} (variable length); masked fraction "
        f"{masks['d2vjax_masked_frac']:.3f} vs {masks['hf_masked_frac']:.3f}", flush=True)
  host = pipeline_times(args.config, args.batches)
  step = step_throughput.measure(args.config, args.steps, peak=1.0)
  ratio = host["host_ms_per_batch"] / step["step_ms"]
  print(f"{args.config}: host {host['host_ms_per_batch']:.1f} ms/batch (p90 "
        f"{host['host_ms_p90']:.1f}) vs train step {step['step_ms']:.1f} ms: host/step "
        f"{ratio:.3f}", flush=True)
  with open(args.json, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_1m": os.getloadavg()[0],
               "masks": masks, "pipeline": host, "step_ms": step["step_ms"],
               "host_over_step": ratio, "config": args.config}, f, indent=1)


if __name__ == "__main__":
  main()
