"""A real 2-process run on localhost (jax.distributed, gloo CPU collectives): both processes see a
2-device mesh, load their own half of every global batch, run the same number of steps, end
cleanly and report identical losses (issue 8, user-needs D1/FM14)."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_on_localhost(tmp_path):
  port, workdir = _free_port(), str(tmp_path / "run")
  procs = []
  for pid in range(2):
    env = dict(os.environ, D2V_COORDINATOR_ADDRESS=f"localhost:{port}", D2V_NUM_PROCESSES="2",
               D2V_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "d2vjax.train",
           f"--config={ROOT}/configs/speech_base.py:test,steps=4", f"--workdir={workdir}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1} over 2 devices, 2 process(es)" in out
  s0 = json.load(open(os.path.join(workdir, "summary.json")))
  s1 = json.load(open(os.path.join(workdir, "summary.p1.json")))
  assert s0["stop_reason"] == s1["stop_reason"] == "finished"
  assert s0["step"] == s1["step"] == 4
  assert s0["last_loss"] is not None and s0["last_loss"] == s1["last_loss"]
  # Each process loaded half of every 4-row global batch: 4 steps × 2 rows × 1 s per process,
  # reported ×2 (global) by both.
  assert s0["total_audio_s"] == s1["total_audio_s"] == 16.0
  assert os.path.exists(os.path.join(workdir, "export", "params.msgpack"))  # process 0 only
