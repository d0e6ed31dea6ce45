"""Tuning sweep of the linear-time kernels on one CUDA GPU: the constants they are launched with, timed in turn.

    python bench/kernel_sweep.py [--chunk-sizes 128 256] [--batch 32] [--kernels features recurrent]

The fused feature products of the chunked form (kernel/power/features.py: outer, apply, grad) at the
attention benchmark's shape (32768 tokens x 16 heads in chunks of C, d = 64, [v, 1] padded to 80 columns,
bf16) for each BLOCK_I and NUM_WARPS, and the one-token recurrent step (kernel/power/recurrent.py) at
`--batch` sequences of the small model (16 heads, d = 64, float32 state, contiguous "rows" or zero_state's
column-major "columns") for each BLOCK_R, BLOCK_V and NUM_WARPS, with the state's bytes read and written per
second, beside the same bytes multiplied in place by PyTorch (a streaming roofline).
triton.testing.do_bench medians in ms; results are printed and written as JSON
(bench/results/kernel_sweep_<gpu>.json or --out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from triton.testing import do_bench

from kernel.power import features, recurrent, zero_state


def sweep_features(C: int, d: int = 64, E: int = 80, heads: int = 16, tokens: int = 32768) -> list[dict]:
    T = tokens * heads // C
    nf = d * (d + 1) // 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b, dy = (torch.randn(T, C, w, device="cuda", generator=gen, dtype=torch.bfloat16) for w in (d, E, E))
    m = torch.randn(T, nf, E, device="cuda", generator=gen, dtype=torch.bfloat16)
    kernels = {
        "outer": lambda: features._outer(a, b),
        "apply": lambda: features._apply(a, m, torch.float32),
        "grad": lambda: features._grad(a, m, dy),
    }
    rows = []
    default = (features.BLOCK_I, features.NUM_WARPS)
    for block_i, warps in itertools.product((16, 32), (2, 4, 8)):
        features.BLOCK_I, features.NUM_WARPS = block_i, warps
        for name, fn in kernels.items():
            if name != "outer" and block_i != 16:  # BLOCK_I is the outer product's only
                continue
            row = {"kernel": name, "C": C, "BLOCK_I": block_i, "NUM_WARPS": warps, "ms": do_bench(fn, warmup=5, rep=30)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    features.BLOCK_I, features.NUM_WARPS = default
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
    default = (recurrent.BLOCK_R, recurrent.BLOCK_V, recurrent.NUM_WARPS)
    configs = [("columns", r, c, w) for r, c, w in itertools.product((64, 128, 256), (16, 32, 64), (1, 2, 4, 8))]
    configs += [("rows", r, 64, w) for r, w in itertools.product((64, 128, 256), (1, 2, 4, 8))]
    for layout, block_r, block_v, warps in configs:
        recurrent.BLOCK_R, recurrent.BLOCK_V, recurrent.NUM_WARPS = block_r, block_v, warps
        ms = do_bench(lambda: recurrent.recurrent_step(q, k, v, g, states[layout], power="2", scale=d ** -0.5,
                                                       normalize=True), warmup=5, rep=30)
        row = {"kernel": "recurrent step", "batch": batch, "layout": layout, "BLOCK_R": block_r, "BLOCK_V": block_v,
               "NUM_WARPS": warps, "ms": ms, "state_TB_per_s": state_bytes / ms / 1e9}
        print(json.dumps(row), flush=True)
        rows.append(row)
    recurrent.BLOCK_R, recurrent.BLOCK_V, recurrent.NUM_WARPS = default
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=32, help="sequences of the recurrent step")
    parser.add_argument("--kernels", nargs="+", choices=["features", "recurrent"], default=["features", "recurrent"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or min(args.chunk_sizes) < 1:
        parser.error(f"--batch and --chunk-sizes take values >= 1, got {args.batch} and {args.chunk_sizes}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_sweep.py needs a CUDA GPU")
    rows = [row for C in args.chunk_sizes for row in sweep_features(C)] if "features" in args.kernels else []
    if "recurrent" in args.kernels:
        rows += sweep_recurrent(args.batch)
    gpu = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernel_sweep_{gpu.replace(' ', '_')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "kernel_sweep", "gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
