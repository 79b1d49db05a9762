#!/usr/bin/env bash
# The DeepSpeed launcher. Everything after the script name goes to `cic-gpt2 train`.
#
#   # workstation, 2 GPUs
#   NUM_GPUS=2 launch/deepspeed.sh --data data/v2_8class --run-dir runs/ds
#
#   # inside a SLURM allocation: one launcher per node, no ssh/pdsh needed; each writes the hostfile
#   # from the node list and starts its node's share of the ranks (--no_ssh --node_rank)
#   srun --ntasks-per-node=1 launch/deepspeed.sh --data "$DATA" --run-dir "$RUN_DIR" --resume auto
#
# Environment: NUM_GPUS (per node; default 1 outside SLURM; under SLURM default SLURM_GPUS_ON_NODE),
# CUDA_VISIBLE_DEVICES (outside SLURM: those GPUs, passed as --include localhost:<ids>; DeepSpeed's runner
# would otherwise replace it with 0..NUM_GPUS-1), MASTER_PORT (default: under SLURM the job/step port every
# node derives alike, cic_gpt2.dist.slurm_port; else a free port, so two runs on one workstation never meet),
# PYTHON (see launch/interpreter.bash). Under SLURM: the step's node list (SLURM_STEP_NODELIST, else
# SLURM_JOB_NODELIST: `srun -N2` inside a bigger allocation runs on the step's nodes), SLURM_NODEID.
# Preemption: SIGUSR1 or SIGTERM to this script's process (or SIGUSR1 to any worker): every rank saves one
# checkpoint and the script exits 75. The launcher runs under cic_gpt2/supervise.py, which forwards the signal
# to the workers (the launcher itself answers SIGTERM by killing them) and returns 75.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=interpreter.bash
source "$(dirname "${BASH_SOURCE[0]}")/interpreter.bash"

nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
if [[ -z "${MASTER_PORT:-}" ]]; then
    if [[ -n "$nodelist" ]]; then
        MASTER_PORT=$("$python" -c 'import sys; from cic_gpt2.dist import slurm_port; print(slurm_port(*sys.argv[1:]))' "${SLURM_JOB_ID:-0}" "${SLURM_STEP_ID:-0}")
    else
        MASTER_PORT=$("$python" -c 'from cic_gpt2.files import free_port; print(free_port())')
    fi
fi
launcher=("$python" -m cic_gpt2.supervise -- "$python" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")

if [[ -n "$nodelist" ]]; then
    hostfile="${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/cic-gpt2-hostfile.${SLURM_JOB_ID:-0}"
    if command -v scontrol >/dev/null; then
        hosts=$(scontrol show hostnames "$nodelist")
    else
        hosts=$("$python" -c 'import sys; from cic_gpt2.dist import parse_nodelist; print("\n".join(parse_nodelist(sys.argv[1])))' "$nodelist")
    fi
    slots="${NUM_GPUS:-${SLURM_GPUS_ON_NODE:-1}}"
    while read -r host; do printf '%s slots=%s\n' "$host" "$slots"; done <<<"$hosts" >"$hostfile.tmp.$$"
    mv "$hostfile.tmp.$$" "$hostfile"
    launcher+=(--hostfile "$hostfile" --master_addr "$(head -n1 <<<"$hosts")"
               --no_ssh --node_rank "${SLURM_NODEID:-0}")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    launcher+=(--include "localhost:$CUDA_VISIBLE_DEVICES")  # --num_gpus would drop the user's choice of GPUs
else
    launcher+=(--num_gpus "${NUM_GPUS:-1}")
fi

exec "${launcher[@]}" --module --no_local_rank cic_gpt2 train "$@"
