#!/usr/bin/env bash
# What each SLURM task runs: one task per GPU, started by `srun` (see slurm/*.sbatch).
# cic_gpt2/dist.py reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_JOB_NODELIST / SLURM_JOB_ID
# itself (master = first node, port derived from the job id unless MASTER_PORT is set).
# Everything after the script name goes to `cic-gpt2 train`.
#
#   srun --ntasks-per-node=4 launch/srun.sh --data "$DATA" --run-dir "$RUN_DIR" --resume auto
#
# `exec`: the task IS the Python process, so the SIGUSR1 that srun forwards reaches the training loop, and the
# task's status is the training's (75 after a preemption checkpoint). PYTHON: see launch/interpreter.bash.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=interpreter.bash
source "$(dirname "${BASH_SOURCE[0]}")/interpreter.bash"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
exec "$python" -m cic_gpt2 train "$@"
