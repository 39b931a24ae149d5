"""Launch scripts (issue 8): --dry-run prints exactly what a real run executes, real runs call
gcloud/srun with those arguments (fake executables on PATH record them), missing settings fail
fast with the variable's name."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_bin(tmp_path):
  log = tmp_path / "calls.log"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "python3"):
    exe = bin_dir / name
    exe.write_text(f'#!/usr/bin/env bash\nprintf "%s" "{name}" >> {log}\n'
                   f'for a in "$@"; do printf " %q" "$a" >> {log}; done\necho >> {log}\n')
    exe.chmod(0o755)
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").symlink_to(bin_dir / "python3")
  return bin_dir, log, tmp_path / "venv"


def _run(script, args, env, fake_bin):
  bin_dir, _, venv = fake_bin
  full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(venv.parent),
              VENV=str(venv), **env)
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], env=full,
                        capture_output=True, text=True, timeout=60)


def _dry_commands(out):
  return [shlex.split(l[2:]) for l in out.splitlines() if l.startswith("+ ")]


def _recorded(log):
  return [shlex.split(l) for l in log.read_text().splitlines()] if log.exists() else []


CASES = [
    ("tpu.sh", ["create"], dict(TPU_NAME="t", ZONE="us-central2-b", ACCELERATOR="v4-32",
                                QUEUED="1", SPOT="1"), "gcloud"),
    ("tpu.sh", ["create"], dict(TPU_NAME="t", ZONE="z", ACCELERATOR="v5p-128", QUEUED="1",
                                NODE_COUNT="2"), "gcloud"),
    ("tpu.sh", ["run", "--config=configs/speech_base.py", "--config.optim.peak_lr=3e-4"],
     dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/run"), "gcloud"),
    ("tpu.sh", ["delete"], dict(TPU_NAME="t", ZONE="z"), "gcloud"),
    ("slurm.sbatch", ["--config=configs/speech_base.py"], dict(WORKDIR="/shared/run"), "srun"),
]


@pytest.mark.parametrize("script,args,env,tool", CASES)
def test_dry_run_prints_what_a_real_run_executes(script, args, env, tool, fake_bin):
  _, log, _ = fake_bin
  dry = _run(script, [*args, "--dry-run"], env, fake_bin)
  assert dry.returncode == 0, dry.stderr
  printed = _dry_commands(dry.stdout)
  assert printed and all(cmd[0] == tool for cmd in printed)
  assert _recorded(log) == []  # nothing executed
  real = _run(script, args, env, fake_bin)
  assert real.returncode == 0, real.stderr
  assert _recorded(log) == printed


def test_tpu_commands_carry_the_settings(fake_bin):
  out = _run("tpu.sh", ["create", "--dry-run"], dict(TPU_NAME="t", ZONE="z", ACCELERATOR="v4-32",
                                                    QUEUED="1", SPOT="1"), fake_bin).stdout
  create = _dry_commands(out)[0]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--accelerator-type=v4-32", "--spot", "--node-id=t", "--zone=z"} <= set(create)
  run = _dry_commands(_run("tpu.sh", ["run", "--config=configs/w2v2_base.py", "--dry-run"],
                           dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r"), fake_bin).stdout)[0]
  assert "--worker=all" in run
  remote = run[-1]
  assert "-m d2vjax.train --workdir=gs://b/r --config=configs/w2v2_base.py" in remote


def test_multislice_commands_reach_every_slice_through_the_queued_resource(fake_bin):
  env = dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r", QUEUED="1", NODE_COUNT="2")
  for cmd in ("setup", "run"):
    out = _run("tpu.sh", [cmd, "--config=configs/speech_base.py", "--dry-run"], env, fake_bin)
    assert out.returncode == 0, out.stderr
    for c in _dry_commands(out.stdout):
      assert c[:4] == ["gcloud", "compute", "tpus", "queued-resources"] and "t-qr" in " ".join(c)
      assert {"--worker=all", "--node=all"} <= set(c)
  # Single slice: the TPU VM itself, no --node.
  run = _dry_commands(_run("tpu.sh", ["run", "--dry-run"], dict(TPU_NAME="t", ZONE="z",
                                                               WORKDIR="gs://b"), fake_bin).stdout)
  assert run[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert not any(a.startswith("--node") for a in run[0])


def test_multinode_gpu_script_sets_the_coordinator(fake_bin):
  out = _run("gpu_multinode.sh", ["--config=configs/speech_base.py", "--dry-run"],
             dict(NNODES="2", NODE_RANK="1", COORDINATOR="10.0.0.1:1234", WORKDIR="/w"),
             fake_bin).stdout
  cmd = _dry_commands(out)[0]
  assert cmd[0] == "env"
  assert {"D2V_COORDINATOR_ADDRESS=10.0.0.1:1234", "D2V_NUM_PROCESSES=2",
          "D2V_PROCESS_ID=1"} <= set(cmd)
  assert cmd[-4:] == ["-m", "d2vjax.train", "--workdir=/w", "--config=configs/speech_base.py"]


@pytest.mark.parametrize("script,args,env,missing", [
    ("tpu.sh", ["create"], dict(TPU_NAME="t", ZONE="z"), "ACCELERATOR"),
    ("tpu.sh", ["run"], dict(ZONE="z", WORKDIR="gs://b"), "TPU_NAME"),
    ("slurm.sbatch", [], {}, "WORKDIR"),
    ("gpu_multinode.sh", [], dict(NNODES="2"), "NODE_RANK"),
])
def test_missing_settings_fail_fast(script, args, env, missing, fake_bin):
  _, log, _ = fake_bin
  p = _run(script, [*args, "--dry-run"], env, fake_bin)
  assert p.returncode == 2
  assert f"{missing} must be set" in p.stderr
  assert _recorded(log) == []
