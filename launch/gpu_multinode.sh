#!/usr/bin/env bash
# Multi-node GPU without a scheduler: run this on every node with its own NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12355 WORKDIR=/shared/runs/base \
#     bash launch/gpu_multinode.sh --config=configs/speech_base.py [--dry-run]
#
# Settings (env, all required but VENV): NNODES, NODE_RANK, COORDINATOR (host:port of node 0),
# WORKDIR (shared filesystem). One process per node drives all of the node's GPUs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
need NNODES NODE_RANK COORDINATOR WORKDIR
venv=${VENV:-$HOME/venv}
run env D2V_COORDINATOR_ADDRESS="$COORDINATOR" D2V_NUM_PROCESSES="$NNODES" \
  D2V_PROCESS_ID="$NODE_RANK" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
  "$venv/bin/python" -m d2vjax.train --workdir="$WORKDIR" "${args[@]+"${args[@]}"}"
