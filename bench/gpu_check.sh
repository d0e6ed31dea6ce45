#!/usr/bin/env bash
# One device call: (1) the small model trains through the Triton kernels with the same first losses as through
# the PyTorch reference, (2) the GPU tests, (3) the attention benchmark. Logs and JSON go to $OUT (or ./gpu_check).
# Peer wheels (fla, retention) are picked up from .whl/ when present.
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
TRAIN="GPT_Trainer/train.py 1024 parity squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2 --model_size small
  --batch_size 8 --learning_rate 3e-4 --warmup_steps 10 --num_steps 30 --num_steps_early_stop 30 --log_steps 1
  --no-test_loss --num_save_steps 1000 --wandb_mode disabled --seed 0"
for backend in triton torch; do  # the first compiles and autotunes the kernels
  TWOMAMBA_ATTENTION_BACKEND=$backend timeout ${TRAIN_TIMEOUT:-130} python3 $TRAIN --model_save_path /tmp/parity_$backend \
    > "$OUT/train_$backend.log" 2>&1; echo "train $backend exit $?"
done
python3 - "$OUT" <<'PY'
import json, sys
def losses(b):
    return [r["loss"] for r in map(json.loads, open(f"/tmp/parity_{b}/metrics.jsonl")) if "loss" in r]
t, r = losses("triton"), losses("torch")
print("step  loss(triton)  loss(torch)  rel diff")
for i, (a, b) in enumerate(zip(t, r), 1):
    print(f"{i:4d}  {a:12.5f}  {b:11.5f}  {abs(a - b) / abs(b):.2e}")
json.dump({"triton": t, "torch": r}, open(f"{sys.argv[1]}/train_parity.json", "w"))
PY
timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -m gpu tests -k "not float16 or bfloat16" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-120} python3 bench/attention.py --peers fla --out "$OUT/attention_h200.json" 2>&1 | tail -25
