#!/usr/bin/env bash
# Several nodes from a hostfile: one torchrun per host, a remote one over SSH (finetune.launch hostfile):
#   launch/multi_node.sh hosts.txt 10.0.0.1 8 --config booster_configs/tp2_pp2.yaml --config my_run.yaml
# hosts.txt: one host per line (see launch/hostfile.example). The master address must be an address of
# the first host that every host can reach. Every host needs this repository at the same path, the same
# virtual environment (torchrun on PATH in a non-interactive SSH shell) and passwordless SSH from here.
# Hosts named localhost or 127.0.0.1 run locally without SSH. MASTER_PORT overrides the port (29500).
# Arguments reach train.py verbatim on every host; SIGTERM / Ctrl-C checkpoints every rank (exit 3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 HOSTFILE MASTER_ADDR NPROC_PER_NODE [train.py arguments...]" >&2; exit 2; }
hostfile=$1 master=$2 nproc=$3; shift 3
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
exec python -m finetune.launch hostfile --hostfile "$hostfile" --master_addr "$master" \
    --nproc_per_node "$nproc" --master_port "${MASTER_PORT:-29500}" -- "$@"
