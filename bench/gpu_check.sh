#!/usr/bin/env bash
# One device call: the GPU tests of the kernels, the model and decoding, then the attention-op, training and
# decoding benchmarks, all contenders of each in one process. Logs and JSON go to $OUT (or ./gpu_check).
# Each step has its own time limit, so one overrun does not cost the others. Peer wheels (retention) are
# installed from .whl/ when it is there (see bench/NOTES.md for how to fetch them).
set -u
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PEERS=""
if ls .whl/retention-*.whl > /dev/null 2>&1 && \
   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers .whl/retention-*.whl; then
  PEERS="retention"
fi
# tests/test_triton_attention.py's GPU tests autotune the quadratic kernels at many shapes: ~8 minutes on an
# H200 (session 25), a device call of their own (`python3 -m pytest -q -m gpu tests/test_triton_attention.py`)
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_power_attention.py tests/test_kron.py \
  tests/test_infer.py tests/test_model.py tests/test_triton_conv.py tests/test_decay.py \
  tests/test_norm.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -5 "$OUT/gpu_tests.log"
timeout ${ATTN_TIMEOUT:-100} python3 bench/attention.py --lengths 2048 8192 32768 --chunk-sizes 256 --peers \
  --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
echo "attention exit $?"; grep -v "^N=" "$OUT/attention.log" | tail -20
# one sequence of 128K tokens: the linear-time forms and SDPA only (the quadratic kernels take seconds a call)
timeout ${LONG_TIMEOUT:-120} python3 bench/attention.py --lengths 131072 --tokens 131072 --chunk-sizes 256 --peers \
  --error-length 256 --only chunk auto SDPA --out "$OUT/attention_131072.json" > "$OUT/attention_131072.log" 2>&1
echo "attention 131072 exit $?"; grep -A7 "^NVIDIA" "$OUT/attention_131072.log"
timeout ${TRAIN_TIMEOUT:-140} python3 bench/train_throughput.py --seq_lens 2048 32768 --types softmax 2mamba mamba \
  --tokens_per_step 32768 --out "$OUT" > "$OUT/train.log" 2>&1
echo "train exit $?"; tail -9 "$OUT/train.log"
timeout ${DECODE_TIMEOUT:-120} python3 bench/decode.py --prompt_lengths 1024 32768 --batch_sizes 1 32 \
  --profile --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; tail -16 "$OUT/decode.log"
# last, as its first call compiles and autotunes for minutes: the peer beside ours at one length. Its autotune
# results (*.autotune.json, bench/NOTES.md session 24) are reused from .tcache/ when that is carried.
if [ -n "$PEERS" ]; then
  if [ -d .tcache ]; then
    export TRITON_CACHE_DIR=/tmp/tcache; mkdir -p "$TRITON_CACHE_DIR"; cp -r .tcache/. "$TRITON_CACHE_DIR"/
  fi
  PYTHONPATH=$PYTHONPATH:/tmp/peers timeout ${PEER_TIMEOUT:-90} python3 bench/attention.py --lengths 32768 \
    --chunk-sizes 256 --peers $PEERS --error-length 512 --out "$OUT/attention_peers.json" > "$OUT/attention_peers.log" 2>&1
  echo "peers exit $?"; grep "^N=" "$OUT/attention_peers.log"
fi
