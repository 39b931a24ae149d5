r"""Speed of data2vec 2.0 versus data2vec 1.0 for speech at equal batch on this machine.

  python bench/d2v2_vs_d2v1.py [--steps=20] [--rows=8] [--seconds=2] [--size=cpu|test]

Both objectives run their CPU presets (``configs/speech_base.py:cpu`` and
``configs/speech_d2v2_base.py:cpu``: the same 4 × 256 trunk and 64-channel CNN) on the same
batches of the embedded corpus: ``--rows`` clips cropped to ``--seconds``. For each, the jitted
shared train step (``step.make_train_step``: forward, backward, AdamW, EMA) is compiled, warmed
up for 3 steps and timed over ``--steps`` updates (``block_until_ready`` after each).

Reported per objective: ms per update, sample-masks per update (data2vec 1.0: one mask per clip;
2.0: M = ``masking.clones`` per clip) and ms per sample-mask. The paper's speed-up comes from
encoding only kept frames, the light decoder and the amortised teacher (data2vec 2.0 §3), which
this measures at CPU scale; it is not a timed test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np

from d2vjax import optim, registry, step as step_lib
from d2vjax.train import EmaSchedule
import timing  # bench/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def measure(config_path: str, arg: str, rows: int, samples: int, steps: int) -> dict:
  c = load(config_path, arg)
  c.data.update(dict(buckets=[samples], budget_samples=rows * samples, min_sample_size=samples))
  obj = registry.get("objective", c.objective)(c)
  mod = obj.modality
  examples, _ = mod.examples(c.data, "train")
  it = mod.make_iterator(c.data, examples=examples, seed=0, batch_multiple=1, process_index=0,
                         process_count=1, batch_fn=mod.mask_fn(c.masking))
  batches = []
  for _ in range(4):
    b = next(it)
    batches.append({k: v for k, v in b.items() if not k.startswith("_")})
  lr_fn = optim.make_schedule(c.optim, 1000, 10)
  dummy = batches[0]
  params_shape = jax.eval_shape(obj.init, jax.random.key(0), dummy)
  tx = optim.make_optimizer(c.optim, lr_fn, params_shape, obj.frozen)
  state = jax.jit(lambda r: step_lib.init_state(obj, tx, r, dummy))(jax.random.key(0))
  ema_cfg = EmaSchedule(c.ema.decay, c.ema.end_decay, 1000)
  step = jax.jit(step_lib.make_train_step(obj, tx, lr_fn, ema_cfg, 0), donate_argnums=0)
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  state, m, times = timing.time_steps(step, state, batches[1:] + batches[:1], steps, warmup=3)
  masks_per_clip = int(c.masking.get("clones", 1) or 1)
  ms = 1000 * float(np.median(times))
  nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_shape))
  return dict(config=f"{config_path}:{arg}", objective=c.objective, params=nparams,
              rows=rows, seconds=samples / 16000, compile_s=round(compile_s, 1),
              ms_per_update=round(ms, 1), ms_per_update_p10_p90=[
                  round(1000 * float(np.percentile(times, q)), 1) for q in (10, 90)],
              sample_masks_per_update=rows * masks_per_clip,
              ms_per_sample_mask=round(ms / (rows * masks_per_clip), 2),
              last_loss=float(m["loss"]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--seconds", type=float, default=2.0)
  p.add_argument("--size", default="cpu", choices=("cpu", "test"))
  a = p.parse_args()
  samples = int(a.seconds * 16000)
  out = [measure(path, a.size, a.rows, samples, a.steps)
         for path in ("configs/speech_base.py", "configs/speech_d2v2_base.py")]
  for r in out:
    print(json.dumps(r))
  v1, v2 = out
  print(f"per update: d2v2 / d2v1 = {v2['ms_per_update'] / v1['ms_per_update']:.2f}; "
        f"per sample-mask: d2v1 / d2v2 = "
        f"{v1['ms_per_sample_mask'] / v2['ms_per_sample_mask']:.2f}x faster")


if __name__ == "__main__":
  main()
