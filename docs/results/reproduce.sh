#!/usr/bin/env bash
# The small reproduction of docs/results/README.md: five attention types trained with the same model size,
# data order, tokens and schedule on the Debian-documentation corpus (data/docs_corpus, built by
# `python -m GPT_Trainer.docs_corpus build data/docs_corpus`), then pass-key NIAH on every final checkpoint.
# The runs share the GPUs that nvidia-smi lists (all five side by side on one). Run from the repository root:
#   bash docs/results/reproduce.sh            # RUNS=models/docs STEPS=640 TRAIN_TIMEOUT=... to change
set -u
RUNS=${RUNS:-models/docs}
STEPS=${STEPS:-640}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-3600}
NIAH_TIMEOUT=${NIAH_TIMEOUT:-600}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# run name : attention type (the paper's Softmax, 2Mamba, 2Mamba-E, Mamba-2 and Linear rows)
RUN_TYPES="softmax:softmax 2mamba:squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2
  2mamba_e:exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2 mamba:mamba linear:linear"
GPUS=$(nvidia-smi -L | wc -l)
mkdir -p "$RUNS"

i=0
for pair in $RUN_TYPES; do
  name=${pair%%:*} type=${pair#*:}
  CUDA_VISIBLE_DEVICES=$((i % GPUS)) timeout "$TRAIN_TIMEOUT" python3 GPT_Trainer/train.py 2048 "$name" "$type" \
    --model_save_path "$RUNS/$name" --dataset data/docs_corpus --model_size mini --batch_size 16 \
    --learning_rate 6e-4 --warmup_steps $((STEPS / 10)) --num_steps "$STEPS" --num_steps_early_stop $((STEPS + 1)) \
    --num_steps_test $((STEPS / 8)) --num_save_steps $((STEPS / 4)) --no-activation_checkpointing \
    --wandb_mode disabled > "$RUNS/$name.train.log" 2>&1 &
  i=$((i + 1))
done
wait
for pair in $RUN_TYPES; do
  echo "${pair%%:*}: $(grep -c test_loss "$RUNS/${pair%%:*}/metrics.jsonl") test evaluations;" \
    "$(tail -c 300 "$RUNS/${pair%%:*}.train.log" | tr '\r' '\n' | tail -1)"
done

# Pass-key retrieval at ~0.5K to ~8.5K tokens (the models saw 2,048-token windows): 20 prompts per length.
i=0
for pair in $RUN_TYPES; do
  name=${pair%%:*}
  CUDA_VISIBLE_DEVICES=$((i % GPUS)) timeout "$NIAH_TIMEOUT" python3 niah_and_hs/niah.py --model_path "$RUNS/$name" \
    --builtin --context_lengths 2000 4000 8000 16000 32000 --num_evals 100 --batch_size 10 \
    --out "$RUNS/niah_$name.json" > "$RUNS/$name.niah.log" 2>&1 &
  i=$((i + 1))
done
wait
tail -n 9 "$RUNS"/*.niah.log
