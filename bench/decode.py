"""Decode throughput and peak memory: softmax (KV cache) vs 2Mamba (recurrent state) after long prompts.

For each attention type, prompt length and batch size: prefill a random prompt batch, then time greedy
one-token steps (after warm-up steps) with CUDA synchronisation. Random weights: the cost of a step does
not depend on their values. Prints a table and writes JSON.

    python bench/decode.py                       # small model, bf16, prompts 1K-32K, batches 1 and 32
    python bench/decode.py --device cpu --model_size tiny --prompt_lengths 64 256 --batch_sizes 1 2  # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from GPT_Trainer.decoding import ModelDecoder, reserve, state_nbytes
from GPT_Trainer.infer2 import DTYPES
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA
from GPT_Trainer.modeling import get_model

TYPES = {"softmax": "softmax", "2Mamba": TWO_MAMBA}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, batch, prompt_len, new_tokens, warmup, device, chunk_size):
    decoder = ModelDecoder(model, chunk_size)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    logits, states = decoder.prefill(ids)
    reserve(states, warmup + new_tokens)
    sync(device)
    prefill_s = time.perf_counter() - start
    tokens = logits.argmax(-1)
    for _ in range(warmup):
        tokens = decoder.step(tokens, states).argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = decoder.step(tokens, states).argmax(-1)
    sync(device)
    decode_s = time.perf_counter() - start
    return {
        "prefill_s": round(prefill_s, 3),
        "ms_per_step": round(1000 * decode_s / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / decode_s, 1),
        "state_mib": round(state_nbytes(states) / 2**20, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--prompt_lengths", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--new_tokens", type=int, default=32, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--chunk_size", type=int, default=512, help="prefill chunk of the recurrent types")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--out", default=os.path.join("bench", "results", "decode.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the recurrent state math runs in float32
    rows = []
    for label in args.types:
        with device:
            model = get_model(args.model_size, max(args.prompt_lengths), args.vocab_size, TYPES[label])
        model = model.to(DTYPES[args.dtype]).eval()
        for prompt_len in args.prompt_lengths:
            for batch in args.batch_sizes:
                row = {"attention": label, "prompt_tokens": prompt_len, "batch": batch}
                try:
                    row.update(run_case(model, batch, prompt_len, args.new_tokens, args.warmup, device, args.chunk_size))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                rows.append(row)
                print(row, flush=True)
        del model
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model_size": args.model_size, "dtype": args.dtype,
        "new_tokens": args.new_tokens, "warmup": args.warmup, "chunk_size": args.chunk_size, "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'type':8} {'prompt':>7} {'batch':>5} {'prefill s':>9} {'ms/step':>8} {'tok/s':>9} {'state MiB':>10} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:8} {r['prompt_tokens']:>7} {r['batch']:>5}  {r['error']}")
        else:
            print(f"{r['attention']:8} {r['prompt_tokens']:>7} {r['batch']:>5} {r['prefill_s']:>9} {r['ms_per_step']:>8} "
                  f"{r['tokens_per_s']:>9} {r['state_mib']:>10} {str(r['peak_gib']):>8}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
