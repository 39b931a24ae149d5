r"""Mini-study on the embedded corpus: does pre-training help CTC fine-tuning, and how do the
objectives and the data2vec target ablations compare at an equal fine-tuning budget?

  python bench/ministudy.py --out=/tmp/ministudy [--only=scratch,d2v1] [--finetune_steps=600]

Each variant pre-trains with a CPU preset (a separate ``python -m d2vjax.train`` process), then
fine-tunes with ``configs/ctc_base_10m.py:cpu`` (same steps, schedule, masks, data and seed for
every variant) and reads the validation WER/CER of the best checkpoint (``best.json``). Finished
runs are reused, so the script can be resumed after an interruption. Writes ``results.json`` and
``results.md`` (the table in docs/results.md) into ``--out``.

Variants (data2vec Table 4 and Fig. 2 are the ablations' paper counterparts):
  scratch      no pre-training (normalised waveforms, as data2vec)
  d2v1         data2vec 1.0, configs/speech_base.py:cpu (K = 3 in the CPU preset, FFN targets)
  d2v2         data2vec 2.0, configs/speech_d2v2_base.py:cpu
  w2v2         wav2vec 2.0, configs/w2v2_base.py:cpu
  d2v1_k1      data2vec 1.0 with targets from the top layer only (K = 1)
  d2v1_k_all   data2vec 1.0 averaging every layer (K = L, the CPU model's 4; Base uses K = 8 of 12)
  d2v1_attn    data2vec 1.0 with self-attention outputs (before the residual) as targets
  d2v1_block   data2vec 1.0 with end-of-block outputs (after the residual and LayerNorm)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name → (pre-training config or None, extra pre-training flags, description)
VARIANTS = {
    "scratch": (None, [], "no pre-training"),
    "d2v1": ("configs/speech_base.py:cpu", [], "data2vec 1.0 (K=3 of 4, FFN targets)"),
    "d2v2": ("configs/speech_d2v2_base.py:cpu", [], "data2vec 2.0"),
    "w2v2": ("configs/w2v2_base.py:cpu", [], "wav2vec 2.0"),
    "d2v1_k1": ("configs/speech_base.py:cpu", ["--config.targets.top_k=1"],
                "data2vec 1.0, K=1 (top layer only)"),
    "d2v1_k_all": ("configs/speech_base.py:cpu", ["--config.targets.top_k=4"],
                   "data2vec 1.0, K=4 (all layers)"),
    "d2v1_attn": ("configs/speech_base.py:cpu", ["--config.model.encoder.layer_result=attn"],
                  "data2vec 1.0, self-attention-output targets"),
    "d2v1_block": ("configs/speech_base.py:cpu", ["--config.model.encoder.layer_result=block"],
                   "data2vec 1.0, end-of-block targets"),
}


# Exit code of ``d2vjax.train`` when the collapse guard stopped the run (after saving).
COLLAPSED = 3
# Pre-training outcomes that leave a checkpoint to fine-tune from. A collapsed run is a result
# (data2vec Table 4: self-attention-output targets "do not yield a usable model"): it is
# fine-tuned from its last checkpoint like the others and marked in the table.
PRETRAIN_DONE = ("finished", "collapsed")


def _run(cmd: list[str], log: str, ok: tuple[int, ...] = (0,)) -> float:
  """Runs ``cmd`` from the repository root with output to ``log``; returns wall seconds. An exit
  code outside ``ok`` stops the study."""
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  with open(log, "w") as f:
    code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if code not in ok:
    raise SystemExit(f"command failed with exit code {code}; see {log}")
  return time.time() - t0


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_variant(name: str, out: str, finetune_steps: int) -> dict:
  """Pre-trains (unless ``scratch``) and fine-tunes one variant; returns its row."""
  config, extra, desc = VARIANTS[name]
  row = {"variant": name, "description": desc}
  pre_dir = os.path.join(out, name, "pretrain")
  ft_dir = os.path.join(out, name, "finetune")
  if config is not None:
    pre_cmd = [sys.executable, "-m", "d2vjax.train", f"--config={config}",
               f"--workdir={pre_dir}"] + extra
    row["pretrain_command"] = " ".join(pre_cmd[1:])
    summary = _read(os.path.join(pre_dir, "summary.json"))
    if summary is None or summary.get("stop_reason") not in PRETRAIN_DONE:
      row["pretrain_wall_s"] = _run(pre_cmd, os.path.join(out, name, "pretrain.log"),
                                    ok=(0, COLLAPSED))
      summary = _read(os.path.join(pre_dir, "summary.json"))
    row["pretrain_steps"] = summary["step"]
    row["pretrain_stop"] = summary["stop_reason"]
    row["pretrain_last_loss"] = summary.get("last_loss")
  ft_cmd = [sys.executable, "-m", "d2vjax.finetune",
            f"--config=configs/ctc_base_10m.py:cpu,steps={finetune_steps}",
            f"--workdir={ft_dir}"]
  ft_cmd += [f"--init={pre_dir}"] if config is not None else ["--config.data.normalize=true"]
  row["finetune_command"] = " ".join(ft_cmd[1:])
  summary = _read(os.path.join(ft_dir, "summary.json"))
  if summary is None or summary.get("stop_reason") != "finished":
    row["finetune_wall_s"] = _run(ft_cmd, os.path.join(out, name, "finetune.log"))
    summary = _read(os.path.join(ft_dir, "summary.json"))
  best = summary["best"]
  row.update({"best_step": best.get("step"), "valid_wer": best["wer"], "valid_cer": best["cer"],
              "last_wer": summary["last_eval"]["wer"], "last_cer": summary["last_eval"]["cer"],
              "finetune_steps": summary["step"]})
  return row


def markdown(rows: list[dict]) -> str:
  """The results table (percentages, best checkpoint by validation WER)."""
  lines = ["| variant | pre-training | best valid CER % | its WER % | last CER % | last WER % | "
           "pre-train wall | fine-tune wall |", "|---|---|---|---|---|---|---|---|"]
  fmt_t = lambda s: "—" if s is None else f"{s / 60:.1f} min"
  for r in rows:
    desc = r["description"]
    if r.get("pretrain_stop") == "collapsed":
      desc += f" (pre-training collapsed at step {r['pretrain_steps']})"
    lines.append(f"| {r['variant']} | {desc} | {100 * r['valid_cer']:.1f} | "
                 f"{100 * r['valid_wer']:.1f} | {100 * r['last_cer']:.1f} | "
                 f"{100 * r['last_wer']:.1f} | {fmt_t(r.get('pretrain_wall_s'))} | "
                 f"{fmt_t(r.get('finetune_wall_s'))} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="folder for every run, results.json, results.md")
  p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variant names")
  p.add_argument("--finetune_steps", type=int, default=600)
  args = p.parse_args()
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, "results.json")
  done = {r["variant"]: r for r in (_read(results_path) or [])}
  for name in names:
    os.makedirs(os.path.join(args.out, name), exist_ok=True)
    row = run_variant(name, args.out, args.finetune_steps)
    # Wall times measured by an earlier invocation are kept when the runs are reused.
    for k in ("pretrain_wall_s", "finetune_wall_s"):
      if k not in row and k in done.get(name, {}):
        row[k] = done[name][k]
    # Re-read: another invocation (other variants, run in parallel) may have written meanwhile.
    done = {r["variant"]: r for r in (_read(results_path) or [])} | {name: row}
    with open(results_path, "w") as f:
      json.dump(list(done.values()), f, indent=1)
    print(f"{name}: valid CER {100 * row['valid_cer']:.1f} % WER {100 * row['valid_wer']:.1f} %",
          flush=True)
  table = markdown([done[n] for n in VARIANTS if n in done])
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
