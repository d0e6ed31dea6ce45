#!/bin/bash
# The authors' NIAH job (their niah_and_hs/runjob_niah.sh): one node, one GPU, the needle-in-a-haystack
# evaluation of a trained checkpoint, then the heatmap.
#
# Site-specific: edit the SBATCH lines (account, partition) and the SITE variables below, then
#     sbatch niah_and_hs/runjob_niah.sh
#SBATCH --job-name=2mamba_niah
#SBATCH --account=CHANGE_ME_ACCOUNT
#SBATCH --partition=CHANGE_ME_PARTITION
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --mem=500G
#SBATCH --output=runjob_niah.out

set -euo pipefail

# ---- SITE: paths on your cluster ---------------------------------------------------------------------
REPO_DIR="${REPO_DIR:-$HOME/2Mamba2Furious}"          # this repository
VENV_DIR="${VENV_DIR:-$REPO_DIR/.venv}"               # its Python environment
# ---- the evaluation -----------------------------------------------------------------------------------
MODEL_PATH="${MODEL_PATH:-models/medium_8192sl_gpu_64bs__squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2__att2}"

cd "$REPO_DIR"
source "$VENV_DIR/bin/activate"
python niah_and_hs/niah.py --model_path "$MODEL_PATH"
python niah_and_hs/niah_heatmap.py "niah_and_hs/results/$(basename "$MODEL_PATH").json"
