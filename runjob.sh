#!/bin/bash
# SLURM example: train one model on NODES x GPUS_PER_NODE GPUs with torchrun (one process per GPU, NCCL).
# Replace every <...> placeholder, then: sbatch runjob.sh
#SBATCH --job-name=2mamba
#SBATCH --account=<your-account>
#SBATCH --partition=<gpu-partition>
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=16
#SBATCH --mem=200G
#SBATCH --time=2-00:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
cd "<path-to-the-repository>"
source "<path-to-your-venv>/bin/activate"

SEQ_LEN=2048
RUN_NAME="small_${SEQ_LEN}sl_2mamba"
ATTENTION_TYPE="squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
GPUS_PER_NODE=2
PORT=29500

# The first node of the allocation hosts the rendezvous; srun starts one torchrun per node.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$PORT" \
    GPT_Trainer/train.py "$SEQ_LEN" "$RUN_NAME" "$ATTENTION_TYPE" \
        --model_size small \
        --batch_size 32 \
        --dataset HuggingFaceFW/fineweb
# To continue this run after the job's time limit, resubmit with: --load_checkpoint
