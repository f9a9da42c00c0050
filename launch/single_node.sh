#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, one per core pair or so):
#   launch/single_node.sh 8 --config booster_configs/zero2.yaml --config my_run.yaml train.max_steps=1000
# Everything after the process count goes to finetune/train.py verbatim (torchrun, no shell in between).
# SIGTERM / Ctrl-C: every rank checkpoints and exits 3, nothing is left running. MASTER_PORT: port (29500).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 NPROC_PER_NODE [train.py arguments...]" >&2; exit 2; }
nproc=$1; shift
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
exec python -m finetune.launch single --nproc_per_node "$nproc" --master_port "${MASTER_PORT:-29500}" -- "$@"
