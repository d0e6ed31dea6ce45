#!/bin/bash
# The authors' training job (their runjob.sh): 2 nodes x 8 GPUs, one torchrun per node with a c10d
# rendezvous on the first node, the medium model at 8192 tokens on SlimPajama (the default dataset of their
# train.py). Their script took every setting from train.py; here they are flags.
#
# Site-specific: edit the SBATCH lines (account, partition) and the SITE variables below, then
#     sbatch runjob.sh
# To continue after the time limit, resubmit with RESUME=1 (sbatch --export=ALL,RESUME=1 runjob.sh).
#SBATCH --job-name=2mamba_train
#SBATCH --account=CHANGE_ME_ACCOUNT
#SBATCH --partition=CHANGE_ME_PARTITION
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --mem=500G
#SBATCH --output=runjob.out

set -euo pipefail

# ---- SITE: paths on your cluster ---------------------------------------------------------------------
REPO_DIR="${REPO_DIR:-$HOME/2Mamba2Furious}"          # this repository
VENV_DIR="${VENV_DIR:-$REPO_DIR/.venv}"               # its Python environment (pip install -r requirements-gpu.txt)
PORT="${PORT:-29889}"                                 # rendezvous port on the first node (theirs: 29889)
# ---- the run ------------------------------------------------------------------------------------------
NNODES="${SLURM_JOB_NUM_NODES:-2}"                    # from #SBATCH --nodes
NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"             # from #SBATCH --gres=gpu:N
SEQ_LEN=8192
ATTENTION_TYPE="squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
RUN_NAME="medium_${SEQ_LEN}sl_gpu_32bs__${ATTENTION_TYPE}"
DATASET="gmongaras/SlimPajama-627B_Reupload"          # has its own test split
RESUME="${RESUME:-0}"

# The authors' NCCL settings.
export NCCL_SHM_DISABLE=0
export NCCL_P2P_DISABLE=0
export NCCL_IB_DISABLE=0
export NCCL_TIMEOUT=600
export LOGLEVEL=INFO

nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )
head_node=${nodes[0]}
head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)
echo "Node IP: $head_node_ip"

cd "$REPO_DIR"
source "$VENV_DIR/bin/activate"
# The Llama-2 tokenizer is gated: put your Hugging Face token in $REPO_DIR/.env (or export HF_TOKEN).

extra=()
if [ "$RESUME" = "1" ]; then extra+=(--load_checkpoint); fi

srun torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head_node_ip:$PORT" \
    GPT_Trainer/train.py "$SEQ_LEN" "$RUN_NAME" "$ATTENTION_TYPE" \
        --model_size medium \
        --dataset "$DATASET" \
        --batch_size 32 \
        --num_workers 10 --prefetch_factor 10 \
        "${extra[@]}"
