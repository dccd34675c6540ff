#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, every process runs the same command.
#
#   sbatch --nodes=2 launch/slurm.sh --config=experiments/imagenet64.py --workdir=/shared/runs/in64
#
# JAX finds the coordinator, process count and index from the SLURM variables
# (jax.distributed.initialize() auto-detection, triggered by SLURM_NTASKS > 1). The workdir must be
# on a filesystem every node sees. A requeued job (scontrol requeue, or --requeue on preemption)
# resumes from the newest checkpoint; SLURM's SIGTERM before the kill leads to a final save.
#SBATCH --job-name=diffax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=diffax-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun --kill-on-bad-exit=1 python -m diffax.main "$@"
