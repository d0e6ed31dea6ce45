#!/usr/bin/env bash
# One device call: the GPU tests of the kernels, the model and decoding, then the attention-op, training and
# decoding benchmarks, all contenders of each in one process. Logs and JSON go to $OUT (or ./gpu_check).
# Each step has its own time limit, so one overrun does not cost the others.
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -m gpu tests/test_power_attention.py tests/test_kron.py \
  tests/test_infer.py tests/test_model.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -5 "$OUT/gpu_tests.log"
timeout ${ATTN_TIMEOUT:-150} python3 bench/attention.py --lengths 2048 8192 32768 131072 --chunk-sizes 128 256 \
  --peers --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
echo "attention exit $?"; grep -v "^N=" "$OUT/attention.log" | tail -22
timeout ${TRAIN_TIMEOUT:-140} python3 bench/train_throughput.py --seq_lens 2048 32768 --types softmax 2mamba mamba \
  --tokens_per_step 32768 --out "$OUT" > "$OUT/train.log" 2>&1
echo "train exit $?"; tail -9 "$OUT/train.log"
timeout ${DECODE_TIMEOUT:-100} python3 bench/decode.py --prompt_lengths 1024 16384 32768 --batch_sizes 1 32 \
  --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; tail -14 "$OUT/decode.log"
