"""Real 2-process runs on localhost (jax.distributed, gloo CPU collectives), issue 8, user-needs
D1/FM14: both processes see a 2-device mesh and load their own half of every global batch.

Uneven data: 9 clips for 2 processes and 4-row global batches (a per-process file split would be
5 vs 4 clips, and every epoch leaves one clip over). Every host walks the same global plan, so both
run the same steps, cross the same epoch boundaries, end cleanly and report identical losses. Hosts
that list different files fail together, before the first step, instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from d2vjax.data import embedded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _manifest(path, n):
  """The first ``n`` clips of the embedded corpus (all ≥ 2 s, so all fit the 1 s test bucket)."""
  src = embedded.speech_manifest("train")
  lines = open(src).read().splitlines()
  with open(path, "w") as f:
    f.write(os.path.dirname(os.path.abspath(src)) + "\n" + "\n".join(lines[1:1 + n]) + "\n")
  return str(path)


def _launch(workdir, manifests, steps):
  port = _free_port()
  procs = []
  for pid, manifest in enumerate(manifests):
    env = dict(os.environ, D2V_COORDINATOR_ADDRESS=f"localhost:{port}", D2V_NUM_PROCESSES="2",
               D2V_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "d2vjax.train",
           f"--config={ROOT}/configs/speech_base.py:test,steps={steps}", f"--workdir={workdir}",
           "--config.data.source=manifest", f"--config.data.manifest={manifest}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_process_run_with_uneven_data_on_localhost(tmp_path):
  workdir = str(tmp_path / "run")
  manifest = _manifest(tmp_path / "nine.tsv", 9)
  codes, outs = _launch(workdir, [manifest, manifest], steps=5)
  for code, out in zip(codes, outs):
    assert code == 0, out[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1} over 2 devices, 2 process(es)" in out
    # 9 clips → 2 global batches of 4 per epoch (1 left over): 5 steps span epochs 0, 1, 2.
    assert "1 compiled step programs at most; 2 steps per epoch" in out
  s0 = json.load(open(os.path.join(workdir, "summary.json")))
  s1 = json.load(open(os.path.join(workdir, "summary.p1.json")))
  assert s0["stop_reason"] == s1["stop_reason"] == "finished"
  assert s0["step"] == s1["step"] == 5
  assert s0["compiles"] == s1["compiles"] == 1
  # Same loss at every step in both processes (exact: one global program, one global batch).
  assert [s for s, _ in s0["recent_losses"]] == [1, 2, 3, 4, 5]
  assert s0["recent_losses"] == s1["recent_losses"]
  assert all(l is not None for _, l in s0["recent_losses"])
  # Each process loaded half of every 4-row global batch: 5 steps × 2 rows × 1 s per process,
  # reported ×2 (global) by both.
  assert s0["total_audio_s"] == s1["total_audio_s"] == 20.0
  assert os.path.exists(os.path.join(workdir, "export", "params.msgpack"))  # process 0 only


@pytest.mark.slow
def test_hosts_listing_different_files_fail_together_before_training(tmp_path):
  """Process 0 lists 16 clips, process 1 20 (4 vs 5 global batches per epoch): both processes stop
  with an error naming the plan mismatch; nothing trains, nothing hangs."""
  workdir = str(tmp_path / "run")
  codes, outs = _launch(workdir, [_manifest(tmp_path / "a.tsv", 16),
                                  _manifest(tmp_path / "b.tsv", 20)], steps=3)
  for code, out in zip(codes, outs):
    assert code != 0
    assert "the global batch plan differs between processes: process(es) [1]" in out, out[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
