#!/usr/bin/env bash
# Cloud TPU VMs: create (direct or queued resource, optional spot), install d2vjax on all workers,
# run `python -m d2vjax.train` on all workers, stream logs, delete.
#
#   TPU_NAME=d2v ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu.sh create [--dry-run]
#   TPU_NAME=d2v ZONE=us-central2-b bash launch/tpu.sh setup
#   TPU_NAME=d2v ZONE=us-central2-b WORKDIR=gs://bucket/runs/base \
#     bash launch/tpu.sh run --config=configs/speech_base.py [--config.x=y ...]
#   TPU_NAME=d2v ZONE=us-central2-b bash launch/tpu.sh delete
#
# Settings (env): TPU_NAME, ZONE (always); ACCELERATOR, RUNTIME_VERSION (default
# tpu-ubuntu2204-base), QUEUED=1 (queued resource), SPOT=1 (spot capacity), NODE_COUNT (multi-slice,
# with QUEUED=1; setup/run/logs then go through the queued resource to every slice), PROJECT (optional) for create; WORKDIR (gs:// path, identical on every worker),
# TFDS_DATA_DIR (optional), REPO (default: this checkout, copied with scp) for setup/run.
# Every command accepts --dry-run: print the gcloud commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
cmd=${1:?usage: tpu.sh create|setup|run|logs|delete [--dry-run] [train flags]}
shift
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
need TPU_NAME ZONE
project=()
[ -n "${PROJECT:-}" ] && project=(--project="$PROJECT")
if [ -n "${NODE_COUNT:-}" ]; then
  # Multi-slice: reach every worker of every slice through the queued resource. Train with
  # --config.dcn_mesh="(('data', $NODE_COUNT),)" so only the data axis crosses slices (DCN).
  vm=(gcloud compute tpus queued-resources)
  target="$TPU_NAME-qr"
  nodes=(--node=all)
  node0=(--node=0)
else
  vm=(gcloud compute tpus tpu-vm)
  target="$TPU_NAME"
  nodes=()
  node0=()
fi
ssh_all=("${vm[@]}" ssh "$target" --zone="$ZONE" --worker=all "${nodes[@]+"${nodes[@]}"}"
         "${project[@]+"${project[@]}"}")

case "$cmd" in
  create)
    need ACCELERATOR
    version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
    capacity=()
    [ "${SPOT:-0}" = 1 ] && capacity=(--spot)
    if [ "${QUEUED:-0}" = 1 ]; then
      slices=()
      [ -n "${NODE_COUNT:-}" ] && slices=(--node-count="$NODE_COUNT" --node-prefix="$TPU_NAME")
      [ -z "${NODE_COUNT:-}" ] && slices=(--node-id="$TPU_NAME")
      run gcloud compute tpus queued-resources create "$TPU_NAME-qr" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$version" \
        "${slices[@]}" "${capacity[@]+"${capacity[@]}"}" "${project[@]+"${project[@]}"}"
      run gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE" \
        "${project[@]+"${project[@]}"}"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$version" \
        "${capacity[@]+"${capacity[@]}"}" "${project[@]+"${project[@]}"}"
    fi
    ;;
  setup)
    repo=${REPO:-$(cd "$here/.." && pwd)}
    run "${vm[@]}" scp --recurse "$repo" "$target:~/d2vjax" --zone="$ZONE" \
      --worker=all "${nodes[@]+"${nodes[@]}"}" "${project[@]+"${project[@]}"}"
    run "${ssh_all[@]}" --command='cd ~/d2vjax && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q -e . "jax[tpu]"'
    ;;
  run)
    need WORKDIR
    flags=$(printf ' %q' "${args[@]+"${args[@]}"}")
    env_vars="TFDS_DATA_DIR=${TFDS_DATA_DIR:-} TF_CPP_MIN_LOG_LEVEL=3"
    # The same command on every worker (JAX multi-controller); jax.distributed auto-detects the pod.
    run "${ssh_all[@]}" --command="cd ~/d2vjax && $env_vars nohup ~/venv/bin/python -m d2vjax.train --workdir=$WORKDIR$flags > ~/d2vjax.log 2>&1 &"
    ;;
  logs)
    run "${vm[@]}" ssh "$target" --zone="$ZONE" --worker=0 "${node0[@]+"${node0[@]}"}" \
      "${project[@]+"${project[@]}"}" --command='tail -f ~/d2vjax.log'
    ;;
  delete)
    if [ "${QUEUED:-0}" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" --force \
        --async --quiet "${project[@]+"${project[@]}"}"
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet \
        "${project[@]+"${project[@]}"}"
    fi
    ;;
  *) echo "unknown command $cmd (create|setup|run|logs|delete)" >&2; exit 2 ;;
esac
