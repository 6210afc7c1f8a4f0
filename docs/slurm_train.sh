#!/usr/bin/env bash
# Multi-node training with SLURM + torchrun (one torchrun per node, 8 GPUs each).
#   sbatch docs/slurm_train.sh configs/my_run.toml --train.steps 100000
#SBATCH --job-name=modelgrow
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: sbatch docs/slurm_train.sh CONFIG.toml [--section.key value ...]}
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
  -m modelgrow train --config "$CONFIG" "$@"
