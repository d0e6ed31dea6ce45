"""Decode throughput and peak memory: softmax (KV cache) vs 2Mamba (recurrent state) after long prompts.

For each attention type, prompt length and batch size: prefill a random prompt batch (the model's forward
over the prompt with a fresh cache), then time greedy one-token steps (the same forward over one token,
after warm-up steps) with CUDA synchronisation, exactly as `model.generate` runs them: on CUDA the cache
of the recurrent types comes with the step captured in a CUDA graph (GPT_Trainer/cuda_graph.py; capture
time reported apart; --no_cuda_graph steps eagerly). Random weights: the cost of a step does not depend
on their values. Prints a table and writes JSON.

--profile adds each case's per-step breakdown (the JSON's "profile"; one line per mode printed), for the
eager step and, when the cache has one, the graphed step on the same cache: wall ms per step (timed
without the profiler), then over a few steps under torch.profiler the aten ops, the device kernels and
their summed GPU time per step, and the TOP_KERNELS kernels by time. Where kernel time is far below wall
time, the step waits on the host (Python, launches); on CPU only the aten ops and wall time are measured.

    python bench/decode.py                       # small model, bf16, prompts 1K-32K, batches 1 and 32
    python bench/decode.py --device cpu --model_size tiny --prompt_lengths 64 256 --batch_sizes 1 2  # smoke run
    python bench/decode.py --types softmax --prompt_lengths 1024 --batch_sizes 1 --profile   # per-step breakdown

--profile_prefill N adds, per case, a second prefill on a fresh cache (warm: nothing left to compile),
timed, then a third under torch.profiler with its N largest ops by device time (CPU time on a CPU): the
JSON's "prefill_warm_s" and "prefill_profile".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from GPT_Trainer.infer2 import DTYPES
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, TWO_MAMBA_E
from GPT_Trainer.modeling import get_model
from train_throughput import profile_step  # bench/ is on sys.path: the script runs from it

TYPES = {"softmax": "softmax", "2Mamba": TWO_MAMBA, "2Mamba-E": TWO_MAMBA_E}
DEFAULT_TYPES = ["softmax", "2Mamba"]
PROFILED_STEPS = 4  # steps under the profiler per mode (timed steps without it: --new_tokens)
TOP_KERNELS = 16  # kernels listed by summed device time per step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(model, cache, tokens, n):
    for _ in range(n):
        tokens = model(tokens, past_key_values=cache).logits.argmax(-1)
    return tokens


def timed_steps(model, cache, tokens, n, device):
    """(tokens, seconds) of n synchronised one-token steps."""
    sync(device)
    start = time.perf_counter()
    tokens = steps(model, cache, tokens, n)
    sync(device)
    return tokens, time.perf_counter() - start


def profile_steps(model, cache, tokens, new_tokens, device):
    """(tokens, breakdown) of `new_tokens` timed steps, then PROFILED_STEPS steps under the profiler."""
    tokens, wall_s = timed_steps(model, cache, tokens, new_tokens, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        tokens = steps(model, cache, tokens, PROFILED_STEPS)
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    breakdown = {
        "wall_ms_per_step": round(1000 * wall_s / new_tokens, 3),
        "aten_ops_per_step": sum(e.name.startswith("aten::") for e in events if e.device_type == DeviceType.CPU) / PROFILED_STEPS,
    }
    if device.type == "cuda":
        breakdown["kernels_per_step"] = len(kernels) / PROFILED_STEPS
        breakdown["kernel_ms_per_step"] = round(sum(e.time_range.elapsed_us() for e in kernels) / 1000 / PROFILED_STEPS, 3)
        by_name = {}
        for e in kernels:
            calls, us = by_name.get(e.name, (0, 0.0))
            by_name[e.name] = (calls + 1, us + e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
        breakdown["top_kernels"] = [{"name": name[:80], "calls_per_step": calls / PROFILED_STEPS,
                                     "ms_per_step": round(us / 1000 / PROFILED_STEPS, 4)} for name, (calls, us) in top]
    return tokens, breakdown


def prefill_breakdown(model, ids, device, top):
    """(seconds of a warm prefill, the profile of another) on fresh caches made outside the timing."""
    cache = model.new_cache(ids.shape[1], ids.shape[0])
    sync(device)
    start = time.perf_counter()
    model(ids, past_key_values=cache, logits_to_keep=1)
    sync(device)
    seconds = time.perf_counter() - start
    del cache
    cache = model.new_cache(ids.shape[1], ids.shape[0])
    return round(seconds, 3), profile_step(lambda: model(ids, past_key_values=cache, logits_to_keep=1), top,
                                           device.type)


@torch.no_grad()
def run_case(model, batch, prompt_len, new_tokens, warmup, device, profiled=False, profile_prefill=0):
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    profiled_tokens = 2 * (new_tokens + PROFILED_STEPS) if profiled else 0
    cache = model.new_cache(prompt_len + warmup + new_tokens + profiled_tokens, batch)
    sync(device)
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
    sync(device)
    prefill_s = time.perf_counter() - start
    tokens = steps(model, cache, logits.argmax(-1), warmup)
    tokens, decode_s = timed_steps(model, cache, tokens, new_tokens, device)
    row = {
        "prefill_s": round(prefill_s, 3),
        "ms_per_step": round(1000 * decode_s / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / decode_s, 1),
        "state_mib": round(cache.nbytes() / 2**20, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "cuda_graph": cache.step_graph is not None,
        "capture_s": round(capture_s, 3),
    }
    if profiled:  # the same cache stepped on: eager (its graph set aside), then graphed
        graph, cache.step_graph = cache.step_graph, None
        tokens, eager = profile_steps(model, cache, tokens, new_tokens, device)
        row["profile"] = {"eager": eager}
        if graph is not None:
            cache.step_graph = graph
            _, row["profile"]["graphed"] = profile_steps(model, cache, tokens, new_tokens, device)
    if profile_prefill:  # the first prefill's cache freed first (a 32 x 32K KV cache is 82 GB)
        del cache
        row["prefill_warm_s"], row["prefill_profile"] = prefill_breakdown(model, ids, device, profile_prefill)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--types", nargs="+", default=DEFAULT_TYPES, choices=list(TYPES))
    parser.add_argument("--prompt_lengths", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--new_tokens", type=int, default=32, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no_cuda_graph", action="store_true", help="eager one-token steps on CUDA too")
    parser.add_argument("--profile", action="store_true", help="per-step breakdown (module docstring)")
    parser.add_argument("--profile_prefill", type=int, default=0, metavar="N",
                        help="a warm prefill's time and N largest ops (module docstring)")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--out", default=os.path.join("bench", "results", "decode.json"))
    args = parser.parse_args(argv)
    if args.profile_prefill < 0:
        parser.error(f"--profile_prefill takes a number of ops >= 0 (0: none), got {args.profile_prefill}")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the recurrent state math runs in float32
    rows = []
    for label in args.types:
        with device:
            model = get_model(args.model_size, max(args.prompt_lengths), args.vocab_size, TYPES[label])
        model = model.to(DTYPES[args.dtype]).eval()
        model.decode_with_cuda_graph = not args.no_cuda_graph
        for prompt_len in args.prompt_lengths:
            for batch in args.batch_sizes:
                row = {"attention": label, "prompt_tokens": prompt_len, "batch": batch}
                try:
                    row.update(run_case(model, batch, prompt_len, args.new_tokens, args.warmup, device, args.profile,
                                        args.profile_prefill))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                rows.append(row)
                print(row, flush=True)
        del model
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model_size": args.model_size, "dtype": args.dtype,
        "new_tokens": args.new_tokens, "warmup": args.warmup, "profiled_steps": PROFILED_STEPS if args.profile else 0,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'type':8} {'prompt':>7} {'batch':>5} {'prefill s':>9} {'ms/step':>8} {'tok/s':>9} {'state MiB':>10} "
          f"{'peak GiB':>8} {'graph':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:8} {r['prompt_tokens']:>7} {r['batch']:>5}  {r['error']}")
        else:
            print(f"{r['attention']:8} {r['prompt_tokens']:>7} {r['batch']:>5} {r['prefill_s']:>9} {r['ms_per_step']:>8} "
                  f"{r['tokens_per_s']:>9} {r['state_mib']:>10} {str(r['peak_gib']):>8} {'yes' if r['cuda_graph'] else 'no':>5}")
        for mode, numbers in r.get("profile", {}).items():
            print(f"    {mode:8} " + "  ".join(f"{k} {v}" for k, v in numbers.items() if k != "top_kernels"))
            for kernel in numbers.get("top_kernels", []):
                print(f"        {kernel['ms_per_step']:8.4f} ms {kernel['calls_per_step']:5.1f}x  {kernel['name']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
