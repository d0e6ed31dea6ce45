"""Tuning sweep of our kernels on one CUDA GPU: the constants they are launched with, timed in turn.

    python bench/kernel_sweep.py [--chunk-sizes 128 256] [--batch 32] [--kernels features recurrent linear quadratic]

The fused feature products of the chunked form (kernel/power/features.py: outer, plain and with the keys'
token weights, apply, grad) at the
attention benchmark's shape (32768 tokens x 16 heads in chunks of C, d = dv = 64, bf16) for each launch
config (features.OUTER, APPLY, GRAD: BLOCK_I or BLOCK_C, NUM_WARPS, NUM_STAGES), each also compared bit for
bit with its one-stage run (a race in the software pipeline shows as a difference), on Hopper the Gluon kernels
of the outer product and apply (kernel/power/hopper.py) beside them, compared with the Triton kernels, and the
one-token recurrent step (kernel/power/recurrent.py) at `--batch` sequences of the small model (16 heads, d = 64,
float32 state, contiguous "rows" or zero_state's column-major "columns") for each BLOCK_R, BLOCK_V and NUM_WARPS,
with the state's bytes read and written per second, beside the same bytes multiplied in place by PyTorch (a streaming
roofline); and the decoding step's linear layers (kernel/dense.py) at `--linear-batches` rows beside the
formula they replace, 20 layers' weights replayed from one CUDA graph (no launch overhead; weights cold, as in
decoding), in us per call; and the quadratic attention kernels' block configs (kernel/triton_attention.py:
BLOCK_M, BLOCK_N, warps, stages of the forward, dq and dkdv kernels, one kernel's forced at a time) at
`--quadratic-lengths`, the training shape (32768 tokens, 16 heads, d = 64, bf16, decay); and the chunked form's
state scans (kernel/power/chunk.py SCAN: entries per program, warps) by the chunked op's forward+backward time
at `--scan-lengths`; and the input conv's backward (kernel/triton_conv.py BWD_BLOCK_N, BWD_TILES: rows per tile,
tiles per program) at the small model's qkv, [B, N, 3072] bf16 with 32768 tokens, width 2, beside the forward and
nn.functional.conv1d (cuDNN) on the same input.
triton.testing.do_bench medians in ms; results are printed and written as JSON
(bench/results/kernel_sweep_<gpu>.json or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernel import dense
from kernel.power import features, recurrent, zero_state


LINEAR_CONSTANTS = ("BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES")
FEATURE_KERNELS = ("outer", "apply", "grad")


@contextlib.contextmanager
def _constants(module, names, values):
    """The module's launch constants set to values for a while."""
    saved = [getattr(module, name) for name in names]
    for name, value in zip(names, values):
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(module, name, value)


def sweep_features(C: int, names=FEATURE_KERNELS, d: int = 64, E: int = 64, heads: int = 16,
                   tokens: int = 32768) -> list[dict]:
    T = tokens * heads // C
    nf = d * (d + 1) // 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b, dy = (torch.randn(T, C, w, device="cuda", generator=gen, dtype=torch.bfloat16) for w in (d, E, E))
    m = (torch.randn(T, nf, E, device="cuda", generator=gen) / 30).to(torch.bfloat16)
    w = torch.rand(T, C, device="cuda", generator=gen)
    kernels = {  # the outer product also with token weights, as the forward's chunk sums call it
        "outer": lambda: features.outer(a, b),
        "outer w": lambda: features.outer(a, b, w),
        "apply": lambda: features.apply(a, m, torch.float32),
        "grad": lambda: features.grad(a, m, dy),
    }
    per_program = [dict(BLOCK_C=c, NUM_WARPS=w, NUM_STAGES=s)
                   for c, w, s in itertools.product((64, 128, 256), (4, 8), (3, 4))]
    grids = {"outer": [dict(BLOCK_I=i, NUM_WARPS=w, NUM_STAGES=3) for i, w in itertools.product((16, 32, 64), (4, 8))],
             "apply": per_program, "grad": per_program}
    rows = []
    for name, fn in kernels.items():
        product = name.split()[0]
        if product not in names:
            continue
        # the Triton kernels' constants; on Hopper the outer product runs kernel/power/hopper.py unless told not to
        for config in grids[product]:
            with _constants(features, (product.upper(), "hopper"), (config, None)):
                ms = do_bench(fn, warmup=5, rep=30)
                out = fn()
            with _constants(features, (product.upper(), "hopper"), ({**config, "NUM_STAGES": 1}, None)):
                one_stage = fn()  # the same sums in the same order: any difference is a race in the pipeline
            row = {"kernel": name, "C": C, **config, "ms": ms, "equals_one_stage": bool(torch.equal(out, one_stage))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        hopper = features.hopper
        if product in ("outer", "apply") and hopper is not None and hopper.applies(a, b) and (
                product == "apply" or C <= hopper.OUTER_MAX_C):
            out = fn()
            with _constants(features, ("hopper",), (None,)):
                triton_out = fn()  # with the production constants
            row = {"kernel": f"{name} (Gluon, hopper.py)", "C": C, "ms": do_bench(fn, warmup=5, rep=30)}
            if product == "outer":  # the same sums; apply's round differently (kernel/power/hopper.py)
                row["equals_triton_kernel"] = bool(torch.equal(out, triton_out))
            else:
                row["rel_diff_triton_kernel"] = ((out - triton_out).norm() / triton_out.norm()).item()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def sweep_scan(lengths, d: int = 64, heads: int = 16, tokens: int = 32768) -> list[dict]:
    """The chunked form's state scans (kernel/power/chunk.py, SCAN: entries per program, warps) at the attention
    benchmark's shape: the whole chunked op forward+backward (its two scans each way) for each config, at each
    length (B = tokens / N)."""
    from attention import make_inputs  # bench/attention.py: the attention benchmark's inputs

    from kernel.power import chunk, power_attention

    rows = []
    for N in lengths:
        B = max(1, tokens // N)
        q, k, v, g, do = make_inputs(B, heads, N, d)
        leaves = [t.requires_grad_(True) for t in (q, k, v, g)]

        def fwd_bwd():
            power_attention(*leaves, algorithm="chunk").backward(do)

        for block, warps in itertools.product((256, 512, 1024, 2048), (2, 4, 8)):
            with _constants(chunk, ("SCAN",), (dict(BLOCK=block, NUM_WARPS=warps),)):
                ms = do_bench(fwd_bwd, warmup=5, rep=30, grad_to_none=leaves)
            row = {"kernel": "scan (chunked op fwd+bwd)", "N": N, "B": B, "BLOCK": block, "NUM_WARPS": warps,
                   "ms": ms}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def sweep_conv(channels: int = 3072, tokens: int = 32768, width: int = 2, seq_len: int = 2048) -> list[dict]:
    """The causal conv's forward and forward+backward (kernel/triton_conv.py) for each backward tiling, and the
    same through nn.functional.conv1d; all on x [tokens / seq_len, seq_len, channels] bf16 with bias."""
    from kernel import conv, triton_conv

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens // seq_len, seq_len, channels, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(channels, 1, width, device="cuda", generator=gen)
    b = torch.randn(channels, device="cuda", generator=gen)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    dy = torch.randn_like(x)
    rows = []

    def timed(name, backend, **config):
        def fwd_bwd():
            conv.causal_conv1d(*leaves, backend=backend).backward(dy)

        row = {"kernel": name, "N": seq_len, "channels": channels, "width": width, **config,
               "fwd_ms": do_bench(lambda: conv.causal_conv1d(*leaves, backend=backend), warmup=5, rep=30),
               "fwd_bwd_ms": do_bench(fwd_bwd, warmup=5, rep=30, grad_to_none=leaves)}
        print(json.dumps(row), flush=True)
        rows.append(row)

    timed("conv1d (cuDNN)", "torch")
    for block_n, tiles in itertools.product((8, 16, 32), (1, 4, 16, 64)):
        with _constants(triton_conv, ("BWD_BLOCK_N", "BWD_TILES"), (block_n, tiles)):
            timed("causal conv (ours)", "triton", BWD_BLOCK_N=block_n, BWD_TILES=tiles)
    return rows


QUADRATIC_KERNELS = ("fwd", "dq", "dkdv")
QUADRATIC_TYPES = {"2Mamba": ("2", True), "2Mamba-E": ("exp", True)}


def quadratic_grid(name: str) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates of one quadratic kernel: the forward and dq kernels need
    BLOCK_M (queries) a multiple of BLOCK_N (keys), dkdv the reverse."""
    pairs = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]
    if name == "dkdv":
        pairs = [(n, m) for m, n in pairs]
    return [(m, n, w, s) for (m, n), (w, s) in itertools.product(pairs, ((4, 3), (8, 2), (8, 3), (8, 4)))]


def sweep_quadratic(lengths, types, names=QUADRATIC_KERNELS, d: int = 64, heads: int = 16,
                    tokens: int = 32768) -> list[dict]:
    """The quadratic attention kernels (kernel/triton_attention.py) at the training shape, each config of one
    kernel forced in turn while the other two keep their autotuned choice: the forward kernel timed alone,
    dq and dkdv by the forward+backward time."""
    from attention import make_inputs  # bench/attention.py: the attention benchmark's inputs

    from kernel import triton_attention as ta
    from kernel.attention import attention

    kernels = {"fwd": ta._fwd_kernel, "dq": ta._bwd_dq_kernel, "dkdv": ta._bwd_dkdv_kernel}
    rows = []
    for (type_name, (power, normalize)), N in itertools.product(((t, QUADRATIC_TYPES[t]) for t in types), lengths):
        B = max(1, tokens // N)
        q, k, v, g, do = make_inputs(B, heads, N, d)
        leaves = [t.requires_grad_(True) for t in (q, k, v, g)]

        def fwd():
            return attention(*leaves, power=power, normalize=normalize, backend="triton")

        def fwd_bwd():
            fwd().backward(do)

        for name in names:
            kernel = kernels[name]
            tuned = kernel.configs
            timed = fwd if name == "fwd" else fwd_bwd
            try:
                for config in [None] + quadratic_grid(name):
                    if config is not None:
                        m, n, w, st = config
                        kernel.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)]
                    kernel.cache.clear()
                    try:
                        ms = do_bench(timed, warmup=5, rep=30, grad_to_none=leaves)
                    except Exception as err:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                        ms = None
                        print(f"    {name} {config}: {type(err).__name__}: {str(err)[:120]}")
                    chosen = str(next(iter(kernel.cache.values()))) if config is None and kernel.cache else None
                    row = {"kernel": f"quadratic {name}", "type": type_name, "N": N, "B": B,
                           "config": "autotuned" if config is None else dict(zip(("BLOCK_M", "BLOCK_N", "NUM_WARPS",
                                                                                    "NUM_STAGES"), config)),
                           "autotuned_to": chosen, "timed": "fwd" if name == "fwd" else "fwd+bwd", "ms": ms}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                kernel.configs = tuned
                kernel.cache.clear()
    return rows


def sweep_recurrent(batch: int, heads: int = 16, d: int = 64) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, 1, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(batch, heads, 1, device="cuda", generator=gen)
    states = {"rows": torch.randn(batch, heads, d * (d + 1) // 2, d + 1, device="cuda", generator=gen)}
    states["columns"] = zero_state(batch, heads, d * (d + 1) // 2, d, "cuda").copy_(states["rows"])
    state_bytes = 2 * states["rows"].numel() * 4  # float32, read and written once per step
    # the roofline: the same bytes streamed through in place by PyTorch
    ms = do_bench(lambda: states["rows"].mul_(1.0), warmup=5, rep=30)
    rows = [{"kernel": "in-place multiply (roofline)", "batch": batch, "ms": ms,
             "state_TB_per_s": state_bytes / ms / 1e9}]
    print(json.dumps(rows[0]), flush=True)
    configs = [("columns", r, c, w) for r, c, w in itertools.product((64, 128, 256), (16, 32, 64), (1, 2, 4, 8))]
    configs += [("rows", r, 64, w) for r, w in itertools.product((64, 128, 256), (1, 2, 4, 8))]
    for layout, block_r, block_v, warps in configs:
        with _constants(recurrent, ("BLOCK_R", "BLOCK_V", "NUM_WARPS"), (block_r, block_v, warps)):
            ms = do_bench(lambda: recurrent.recurrent_step(q, k, v, g, states[layout], power="2", scale=d ** -0.5,
                                                           normalize=True), warmup=5, rep=30)
        row = {"kernel": "recurrent step", "batch": batch, "layout": layout, "BLOCK_R": block_r, "BLOCK_V": block_v,
               "NUM_WARPS": warps, "ms": ms, "state_TB_per_s": state_bytes / ms / 1e9}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def graph_ms(calls, replays: int = 20) -> float:
    """ms per call of `calls` (one per layer, each on its own weights) replayed from one CUDA graph: no launch
    overhead, and weights that do not fit in L2 (cold each step, as in decoding)."""
    for call in calls:  # compile and warm up outside the capture
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / len(calls)


def sweep_linear(batches, layers: int = 20, hidden: int = 1024, inter: int = 2048, heads: int = 16) -> list[dict]:
    """The decoding step's linear layers of the small model (kernel/dense.py) against the formula they replace
    (cuBLAS and the elementwise ops), `layers` weight sets in one CUDA graph, for each BLOCK_N, BLOCK_K,
    NUM_WARPS and NUM_STAGES at the first batch (the stages the launcher runs: fewer where their buffers would
    not fit), the fastest of them at the others."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16) / shape[-1] ** 0.5

    weights = [{"qkv": rand(3 * hidden, hidden), "decay": rand(heads, hidden), "o": rand(hidden, hidden),
                "gate": rand(inter, hidden), "up": rand(inter, hidden), "down": rand(hidden, inter)}
               for _ in range(layers)]
    rows = []
    for batch in batches:
        x, xi, res = rand(batch, hidden), rand(batch, inter), rand(batch, hidden)
        ops = {  # name: (the kernel's call, the formula's) for one layer's weights w
            "qkv + decay": (lambda w: dense.linears(x, [w["qkv"], w["decay"]]),
                            lambda w: (F.linear(x, w["qkv"]), F.linear(x, w["decay"]))),
            "o_proj": (lambda w: dense.linear(x, w["o"]), lambda w: F.linear(x, w["o"])),
            "swiglu": (lambda w: dense.swiglu(x, w["gate"], w["up"]),
                       lambda w: F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"])),
            "down + residual": (lambda w: dense.linear(xi, w["down"], residual=res),
                                lambda w: res + F.linear(xi, w["down"])),
        }
        for name, (_, formula) in ops.items():
            row = {"kernel": f"formula: {name}", "batch": batch,
                   "us": 1000 * graph_ms([functools.partial(formula, w) for w in weights])}
            print(json.dumps(row), flush=True)
            rows.append(row)
        configs = list(itertools.product((16, 32), (256, 512), (1, 2, 4), (3, 4, 5))) if batch == batches[0] else [best]
        totals = {}
        for config in configs:
            for name, (fused, _) in ops.items():
                with _constants(dense, LINEAR_CONSTANTS, config):
                    us = 1000 * graph_ms([functools.partial(fused, w) for w in weights])
                    stages = dense.pipeline_stages(dense._block_m(batch), 2 if name == "swiglu" else 1, 2)
                row = {"kernel": name, "batch": batch, **dict(zip(LINEAR_CONSTANTS, config)), "stages_run": stages,
                       "us": us}
                print(json.dumps(row), flush=True)
                rows.append(row)
                totals[config] = totals.get(config, 0.0) + us
        best = min(totals, key=totals.get)  # the fastest over a layer's four launches at the first batch
        print(json.dumps({"batch": batch, "fastest": dict(zip(LINEAR_CONSTANTS, best)), "us_per_layer": totals[best]}))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=32, help="sequences of the recurrent step")
    parser.add_argument("--kernels", nargs="+", choices=["features", *FEATURE_KERNELS, "recurrent", "linear",
                                                         "quadratic", "scan", "conv"],
                        default=["features", "recurrent", "linear"],
                        help="features: outer, apply and grad (or name any of them); quadratic: the attention "
                             "kernels' block configs; scan: the chunked form's state scans; conv: the input conv's "
                             "backward tiling")
    parser.add_argument("--scan-lengths", type=int, nargs="+", default=[8192, 32768],
                        help="N of the scan sweep (B = 32768 / N, 16 heads, d = 64)")
    parser.add_argument("--quadratic-lengths", type=int, nargs="+", default=[2048],
                        help="N of the quadratic sweep (B = 32768 / N, 16 heads, d = 64)")
    parser.add_argument("--quadratic-types", nargs="+", choices=list(QUADRATIC_TYPES), default=["2Mamba"])
    parser.add_argument("--linear-batches", type=int, nargs="+", default=[32, 1],
                        help="rows of the linear layers (every config at the first, the fastest at the others)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or min(args.chunk_sizes) < 1 or not 1 <= min(args.linear_batches) <= max(args.linear_batches) <= dense.MAX_ROWS:
        parser.error(f"--batch and --chunk-sizes take values >= 1 and --linear-batches values in [1, {dense.MAX_ROWS}], "
                     f"got {args.batch}, {args.chunk_sizes} and {args.linear_batches}")
    if min(args.quadratic_lengths + args.scan_lengths) < 1:
        parser.error(f"--quadratic-lengths and --scan-lengths take values >= 1, got {args.quadratic_lengths} and "
                     f"{args.scan_lengths}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_sweep.py needs a CUDA GPU")
    names = FEATURE_KERNELS if "features" in args.kernels else [k for k in FEATURE_KERNELS if k in args.kernels]
    rows = [row for C in args.chunk_sizes for row in sweep_features(C, names)] if names else []
    if "recurrent" in args.kernels:
        rows += sweep_recurrent(args.batch)
    if "linear" in args.kernels:
        rows += sweep_linear(args.linear_batches)
    if "quadratic" in args.kernels:
        rows += sweep_quadratic(args.quadratic_lengths, args.quadratic_types)
    if "scan" in args.kernels:
        rows += sweep_scan(args.scan_lengths)
    if "conv" in args.kernels:
        rows += sweep_conv()
    gpu = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernel_sweep_{gpu.replace(' ', '_')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "kernel_sweep", "gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
