"""Training throughput (tokens/s) of the `small` model per attention type and sequence length on one GPU.

One step = bf16-autocast forward + backward + AdamW update with activation checkpointing, as train.py
runs it; the same number of tokens per step at every length. A few warm-up steps (Triton compilation),
then the timed steps, each between CUDA events; tokens/s is that of the median step (the JSON row keeps every
step's ms). Prints a table and writes JSON under bench/results/.

    python bench/train_throughput.py [--seq_lens 2048 8192] [--types softmax 2mamba 2mamba-e mamba mamba-torch]

"mamba" is the `mamba` type as a model builds it: mamba_ssm's Mamba2 where mamba_ssm is installed (with
causal_conv1d its fused path), else the pure-PyTorch block; "mamba-torch" is always the pure-PyTorch block
(kernel.power_attention), so the two can be timed side by side. Each mamba row records which block ran.

--chunk_from N trains powers 1 and 2 with the chunked, linear-time form from N tokens on instead of at
kernel.power's measured crossovers (RECOMPUTED_CHUNK_CROSSOVER under activation checkpointing, CHUNK_CROSSOVER
without), e.g. --chunk_from 8192 to time it against the quadratic kernel at 8K.

--decay_scale S multiplies every generic block's per-token log decay g by S, as weaker learned decays would be:
2Mamba-E's kernels skip the pairs its decay makes negligible, so its speed depends on g (from the model's initial
decays most pairs are negligible; with --decay_scale 0.001 none up to 32K tokens: its slowest case).

--profile N adds, per case, the N largest CUDA-time entries of one more step under torch.profiler (the JSON
row's "profile": name, calls, ms) and the step's total kernel time, printed after the case.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
import unittest.mock

import torch

import GPT_Trainer.LlamaDecoderLayerClean as block_module
import kernel.power as power
from GPT_Trainer.LlamaDecoderLayerClean import GenericAttention
from GPT_Trainer.modeling import get_model
from GPT_Trainer.trainer import token_loss

TYPES = {
    "softmax": "softmax",
    "2mamba": "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2",
    "2mamba-e": "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2",
    "mamba": "mamba",
    "mamba-torch": "mamba",
}


def chunked_from(tokens: int):
    """Powers 1 and 2 take the chunked form from `tokens` on, with and without activation checkpointing
    (kernel.power's crossovers, measured, overridden for this process)."""
    for crossover in (power.CHUNK_CROSSOVER, power.RECOMPUTED_CHUNK_CROSSOVER):
        crossover.update({p: tokens for p in crossover})


@contextlib.contextmanager
def pytorch_mamba():
    """Mamba blocks built inside are the pure-PyTorch ones even where mamba_ssm is installed."""
    with unittest.mock.patch.object(block_module, "_mamba_ssm_class", lambda: None):
        yield


def mamba_block(model) -> str | None:
    """The class of the model's Mamba-2 blocks, module included (None for the other types)."""
    attn = model.model.layers[0].self_attn
    layer = getattr(attn, "mamba_layer", None)
    return None if layer is None else f"{type(layer).__module__}.{type(layer).__name__}"


def scaled_decays(scale: float):
    """Every generic block's log decay g times scale, for this process (a model with weaker or stronger decays)."""
    project = GenericAttention.project

    def scaled(self, qkv, side):
        q, k, v, g, v_res, z = project(self, qkv, side)
        return q, k, v, None if g is None else g * scale, v_res, z

    GenericAttention.project = scaled


def training_step(model, tokens, optimizer, device_type: str):
    """One optimizer step on the trainer's loss over tokens [B, N + 1] under bf16 autocast; returns the loss."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = model(tokens[:, :-1]).logits
    loss, _ = token_loss(logits, tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(name: str, seq_len: int, batch: int, args) -> dict:
    torch.manual_seed(0)
    with pytorch_mamba() if name == "mamba-torch" else contextlib.nullcontext():
        model = get_model(args.model_size, seq_len, args.vocab_size, TYPES[name]).cuda().train()
    model.set_activation_checkpointing(args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.01)
    tokens = torch.randint(3, args.vocab_size, (batch, seq_len + 1), device="cuda")

    def step():
        return training_step(model, tokens, optimizer, "cuda")

    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        loss = step()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    events[0].record()
    for event in events[1:]:
        loss = step()
        event.record()
    torch.cuda.synchronize()
    steps_ms = [start.elapsed_time(end) for start, end in zip(events, events[1:])]
    step_ms = sorted(steps_ms)[len(steps_ms) // 2]  # the (upper) median: one slow step does not move it
    row = {
        "tokens_per_s": batch * seq_len / step_ms * 1e3, "step_ms": step_ms, "steps_ms": steps_ms,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": loss.item(),
    }
    block = mamba_block(model)
    if block:
        row["block"] = block
    if args.profile:
        row["profile"] = profile_step(step, args.profile)
    return row


def profile_step(step, top: int, device_type: str = "cuda") -> dict:
    """One call of step() under torch.profiler: the `top` ops by self time on the device (CPU time on a CPU),
    self time so that nothing is counted twice, and the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device_type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()

    def self_us(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    ops = [{"name": e.key[:80], "calls": e.count, "ms": self_us(e) / 1e3} for e in events[:top]]
    total = sum(self_us(e) for e in events) / 1e3
    for op in ops:
        print(f"    {op['ms']:8.2f} ms {op['calls']:6d}x  {op['name']}")
    print(f"    {total:8.2f} ms of {'kernels' if cuda else 'CPU ops'} in all")
    return {"total_ms": total, "ops": ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--types", nargs="+", choices=list(TYPES), default=list(TYPES))
    parser.add_argument("--tokens_per_step", type=int, default=16384, help="batch = tokens_per_step / seq_len")
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--vocab_size", type=int, default=32000, help="Llama-2's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N largest ops of a step")
    parser.add_argument("--chunk_from", type=int, default=None, metavar="N",
                        help="the chunked form from N tokens on (default: the measured crossovers)")
    parser.add_argument("--decay_scale", type=float, default=1.0, metavar="S",
                        help="every generic block's log decay g times S (0.001: 2Mamba-E skips nothing)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f"--profile takes a number of ops >= 0 (0: no profile), got {args.profile}")
    if args.chunk_from is not None:
        if args.chunk_from < 1:
            parser.error(f"--chunk_from takes a number of tokens >= 1, got {args.chunk_from}")
        chunked_from(args.chunk_from)
    if not 0 < args.decay_scale < float("inf"):
        parser.error(f"--decay_scale takes a finite factor > 0 (g stays a decay), got {args.decay_scale}")
    if args.decay_scale != 1.0:
        scaled_decays(args.decay_scale)
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_throughput.py needs a CUDA GPU")

    rows = []
    for seq_len in args.seq_lens:
        batch = max(1, args.tokens_per_step // seq_len)
        for name in args.types:
            row = {"type": name, "attention_type": TYPES[name], "seq_len": seq_len, "batch": batch}
            try:
                row.update(measure(name, seq_len, batch, args))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as err:  # one broken type must not hide the others' numbers
                row["error"] = f"{type(err).__name__}: {err}"[:500]
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)

    gpu = torch.cuda.get_device_name()
    result = {
        "benchmark": "train_throughput", "gpu": gpu, "torch": torch.__version__, "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_throughput_{gpu.replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.model_size} model, bf16, {'with' if args.activation_checkpointing else 'without'} activation "
          f"checkpointing, {args.tokens_per_step} tokens/step, {gpu}")
    print(f"{'type':<12} {'seq':>6} {'batch':>5} {'tokens/s':>12} {'ms/step':>9} {'min':>7} {'max':>7} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['type']:<12} {r['seq_len']:>6} {r['batch']:>5}  {r['error'][:60]}")
        else:
            print(f"{r['type']:<12} {r['seq_len']:>6} {r['batch']:>5} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} "
                  f"{min(r['steps_ms']):>7.1f} {max(r['steps_ms']):>7.1f} {r['peak_mem_gib']:>9.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
