#!/usr/bin/env bash
# One process on one GPU (or the CPU when there is none), no launcher: `cic-gpt2 train` sets up a
# process group of one itself. Everything after the script name goes to `cic-gpt2 train`.
#
#   launch/single_gpu.sh --data data/v2_8class --run-dir runs/large model.name=gpt2-large \
#       train.ds_config=zero2_fp16_offload model.gradient_checkpointing=true
#
# Environment: GPU (which device, default 0; ignored when CUDA_VISIBLE_DEVICES is already set), PYTHON (the
# interpreter; default: the one the `cic-gpt2` command on PATH runs, see launch/interpreter.bash).
# Preemption: `kill -USR1 <pid>` checkpoints and exits 75.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=interpreter.bash
source "$(dirname "${BASH_SOURCE[0]}")/interpreter.bash"

export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-${GPU:-0}}"
exec "$python" -m cic_gpt2 train "$@"
