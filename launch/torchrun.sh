#!/usr/bin/env bash
# torchrun: one node with N GPUs, or several nodes joined by a c10d rendezvous.
# Everything after the script name goes to `cic-gpt2 train`.
#
#   # one node, 4 GPUs
#   NPROC_PER_NODE=4 launch/torchrun.sh --data data/v2_8class --run-dir runs/gpt2 model.name=gpt2
#
#   # 2 nodes x 4 GPUs: run the same line on each node (MASTER_ADDR = a host every node can reach)
#   NNODES=2 NPROC_PER_NODE=4 MASTER_ADDR=node1 MASTER_PORT=29500 launch/torchrun.sh --data ... --run-dir ...
#
# Environment: NPROC_PER_NODE (default `gpu`: all visible GPUs), NNODES (default 1), MASTER_ADDR /
# MASTER_PORT (rendezvous endpoint, multi-node only; port default 29500), RDZV_ID (default cic-gpt2),
# PYTHON (see launch/interpreter.bash).
# Preemption: SIGUSR1 or SIGTERM to this script's process (or SIGUSR1 to any worker): every rank saves one
# checkpoint and the script exits 75. torchrun runs under cic_gpt2/supervise.py, which forwards the signal to
# the workers and turns "stopped at a complete preemption checkpoint" into 75 (torchrun alone would exit 1).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=interpreter.bash
source "$(dirname "${BASH_SOURCE[0]}")/interpreter.bash"

if [[ "${NNODES:-1}" == 1 ]]; then
    topology=(--standalone)
else
    topology=(--nnodes "$NNODES" --rdzv_id "${RDZV_ID:-cic-gpt2}" --rdzv_backend c10d
              --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR to a host every node reaches}:${MASTER_PORT:-29500}")
fi

exec "$python" -m cic_gpt2.supervise -- "$python" -m torch.distributed.run "${topology[@]}" --nproc_per_node "${NPROC_PER_NODE:-gpu}" \
    -m cic_gpt2 train "$@"
