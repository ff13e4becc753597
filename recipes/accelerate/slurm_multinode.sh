#!/bin/bash
# Multi-node VPiT training with DeepSpeed ZeRO-3 under SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch recipes/accelerate/slurm_multinode.sh recipes/examples/llama3_siglip_vpit.yaml [section.key=value ...]
#SBATCH --job-name=vpit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=8
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# One task per node; each node's launcher starts its 8 processes and joins the rendezvous on the first node.
srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/accelerate launch \
    --config_file recipes/accelerate/multinode_zero3.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_PROCID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    -m vpit.train $*
"
