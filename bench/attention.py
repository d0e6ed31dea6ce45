"""Attention-core benchmark on one CUDA GPU: our Triton kernels against SDPA, the PyTorch reference and peers.

    python bench/attention.py [--lengths 2048 8192 32768] [--tokens 32768] [--heads 16] [--dim 64]

Causal, bf16, B = tokens / N, g = -softplus(randn - 2). Ours: the quadratic Triton kernels for 2Mamba, 2Mamba-E
(also with g / 1000: exp skips the pairs its decay makes negligible, so its time depends on g) and linear+decay, and
kernel.power_attention's linear-time chunked form of 2Mamba at several chunk sizes (--chunk-sizes), with its
states recomputed in the backward pass (as training under activation checkpointing runs it), and its "auto"
choice. Times are triton.testing.do_bench medians in ms, forward and forward+backward, every contender on the
same inputs in the same process. Peers (--peers) are timed when importable:
fla.ops.forgetting_attn.parallel_forgetting_attn (the math of 2Mamba-E) and retention.power_retention
deg 2 with chunk 1024 (the math of 2Mamba, linear time); they run last, since their first call compiles and
autotunes for minutes. Then the relative error of each kernel against the float64 reference at N = 2048.
The JSON (bench/results/attention_<gpu>.json or --out) is rewritten after every row, so a run cut short
keeps what it measured; it also records the block sizes our autotuner picked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel.attention import attention
from kernel.reference import attention_reference
from kernel.power import CHUNK_SIZE, power_attention

OURS = {  # name -> (power, normalize); all with decay
    "2Mamba (ours)": ("2", True),
    "2Mamba-E (ours)": ("exp", True),
    "linear+decay (ours)": ("1", False),
}
CHUNK_SIZES = [CHUNK_SIZE]  # chunk sizes of the linear-time form timed (same math as "2Mamba (ours)"); --chunk-sizes


def chunked_name(C):
    return f"2Mamba chunk C={C} (ours)"
REF_MAX_BYTES = 48e9  # the materialised fp32 reference holds several [B, H, N, N] tensors


def make_inputs(B, H, N, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = -F.softplus(torch.randn(B, H, N, device="cuda", generator=gen) - 2.0)  # the model's A = -softplus(.)
    return q, k, v, g, do


def load_peers(wanted):
    peers = {}
    if "fla" in wanted:
        try:
            from fla.ops.forgetting_attn import parallel_forgetting_attn

            peers["fla forgetting_attn"] = parallel_forgetting_attn
        except Exception as err:  # noqa: BLE001 - any import failure just drops the peer
            print(f"fla not importable: {type(err).__name__}: {err}")
    if "retention" in wanted:
        try:
            from retention import power_retention

            peers["retention deg2 c1024"] = power_retention
        except Exception as err:  # noqa: BLE001
            print(f"retention not importable: {type(err).__name__}: {err}")
    return peers


def autotune_choices():
    """The config our autotuner picked for each kernel and key (key = N bucket, d, dv, flags, dtypes)."""
    from kernel import triton_attention as ta

    kernels = {"fwd": ta._fwd_kernel, "bwd_dq": ta._bwd_dq_kernel, "bwd_dkdv": ta._bwd_dkdv_kernel}
    return {name: {str(key): str(cfg) for key, cfg in k.cache.items()} for name, k in kernels.items()}


def own_contenders(q, k, v, g, do):
    """name -> (callable returning o, the leaves to clear between runs, the output gradient)."""
    B, H, N, d = q.shape
    leaves = [t.requires_grad_(True) for t in (q, k, v, g)]
    out = {}
    for name, (power, normalize) in OURS.items():
        out[name] = (lambda p=power, n=normalize: attention(q, k, v, g, power=p, normalize=n, backend="triton"),
                     leaves, do)
    # exp skips the pairs its decay makes negligible (kernel/triton_attention.py), so its time depends on g: with
    # g / 1000 a head's whole context stays within e^-2 at 8K, nothing is skipped (the slowest case)
    weak = (g.detach() / 1000).requires_grad_(True)
    out["2Mamba-E, decay / 1000 (ours)"] = (lambda: attention(q, k, v, weak, power="exp", backend="triton"),
                                            [q, k, v, weak], do)
    for C in CHUNK_SIZES:
        out[chunked_name(C)] = (lambda C=C: power_attention(q, k, v, g, algorithm="chunk", chunk_size=C), leaves, do)
    out[f"2Mamba chunk C={CHUNK_SIZES[0]}, states recomputed (ours)"] = (  # as training under checkpointing
        lambda: power_attention(q, k, v, g, algorithm="chunk", chunk_size=CHUNK_SIZES[0], recompute_states=True),
        leaves, do)
    out["2Mamba auto (ours)"] = (lambda: power_attention(q, k, v, g), leaves, do)
    out[f"linear+decay chunk C={CHUNK_SIZES[0]} (ours)"] = (
        lambda: power_attention(q, k, v, g, power="1", normalize=False, algorithm="chunk", chunk_size=CHUNK_SIZES[0]),
        leaves, do)
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(b=backend):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out[name] = (sdpa, leaves, do)
    if 8 * B * H * N * N * 4 <= REF_MAX_BYTES:
        q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        g32 = g.detach().requires_grad_(True)
        out["PyTorch ref. 2Mamba fp32"] = (
            lambda: attention_reference(q32, k32, v32, g32, power="2", normalize=True), [q32, k32, v32, g32],
            do.float())
    return out


def peer_contenders(q, k, v, g, do, peers):
    """The same for the peers, which take [B, N, H, d]: transposed copies are made here, outside the timing."""
    d = q.shape[-1]
    qt, kt, vt, gt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v, g))
    kwargs = {"fla forgetting_attn": dict(scale=d ** -0.5),
              "retention deg2 c1024": dict(deg=2, scale=d ** -0.5, chunk_size=1024)}
    return {name: (lambda fn=fn, kw=kwargs[name]: fn(qt, kt, vt, gt, **kw), [qt, kt, vt, gt],
                   do.transpose(1, 2).contiguous())
            for name, fn in peers.items() if name != "retention deg2 c1024" or q.shape[2] % 1024 == 0}


def time_ms(fn, leaves, do, backward):
    def step():
        o = fn()
        if backward:
            o.backward(do)
    try:
        return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    except Exception as err:  # noqa: BLE001 - a contender that cannot run at this size is reported, not fatal
        print(f"    failed: {type(err).__name__}: {str(err)[:200]}")
        torch.cuda.empty_cache()
        return None


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


PEER_MATH = {"fla forgetting_attn": ("exp", True), "retention deg2 c1024": ("2", True)}


def errors_at(N, H, d, peers=None):
    """Relative error vs float64 of o and each gradient: our kernels, or (peers given) the peers."""
    q, k, v, g, do = make_inputs(1, H, N, d, seed=1)

    def grads(fn, tensors, dout):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        o = fn(*leaves)
        return [o.detach()] + list(torch.autograd.grad(o, leaves, dout.to(o.dtype)))

    def reference(power, normalize):
        return grads(lambda *t: attention_reference(*t, power=power, normalize=normalize),
                     [t.double() for t in (q, k, v, g)], do.double())

    def errors(got, ref):
        return {n: rel(x, r) for n, x, r in zip(("o", "dq", "dk", "dv", "dg"), got, ref)}

    result = {}
    if peers is None:
        for name, (power, normalize) in OURS.items():
            ref = reference(power, normalize)
            got = grads(lambda *t: attention(*t, power=power, normalize=normalize, backend="triton"),
                        [q, k, v, g], do)
            result[name] = errors(got, ref)
            if power == "2":
                for C in CHUNK_SIZES:
                    got = grads(lambda *t: power_attention(*t, algorithm="chunk", chunk_size=C), [q, k, v, g], do)
                    result[chunked_name(C)] = errors(got, ref)
        return result
    for name, (fn, leaves, dout) in peer_contenders(q, k, v, g, do, peers).items():
        o = fn()
        got = [o.detach()] + list(torch.autograd.grad(o, leaves, dout.to(o.dtype)))
        result[name] = errors([x.transpose(1, 2) for x in got], reference(*PEER_MATH[name]))
    return result


def profile_chunk(N, B, H, d, top=30):
    """Kernel time by op of one forward+backward of the chunked form (after a warm-up call)."""
    from train_throughput import profile_step  # bench/ is on sys.path: the script runs from it

    q, k, v, g, do = make_inputs(B, H, N, d)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g)]

    def step():
        for t in leaves:  # as do_bench's grad_to_none: no accumulation into earlier gradients
            t.grad = None
        power_attention(*leaves, algorithm="chunk", chunk_size=CHUNK_SIZES[0]).backward(do)

    step()  # compiles
    print(f"\nprofile: chunked fwd+bwd, N={N} B={B} C={CHUNK_SIZES[0]}")
    profile_step(step, top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--error-length", type=int, default=2048, help="N of the float64 error check (B = 1)")
    parser.add_argument("--peers", nargs="*", default=["fla", "retention"], choices=["fla", "retention"])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=CHUNK_SIZES,
                        help="chunk sizes of the linear-time form to time")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="also print a torch.profiler table of one chunked fwd+bwd at this N (B = tokens / N)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="time only the contenders whose name contains one of these (e.g. chunk auto SDPA: "
                             "the quadratic kernels take seconds a call at 128K)")
    args = parser.parse_args()
    if args.profile is not None and args.profile < 1:
        parser.error(f"--profile takes a sequence length >= 1, got {args.profile}")
    CHUNK_SIZES[:] = args.chunk_sizes
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    peers = load_peers(args.peers)
    rows = []
    report = dict(
        gpu=gpu, torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(tokens=args.tokens, heads=args.heads, dim=args.dim, dtype="bfloat16", causal=True,
                    decay="g = -softplus(randn - 2)"),
        timings=rows,
    )
    out = args.out or Path(__file__).parent / "results" / f"attention_{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["autotune"] = autotune_choices()
        out.write_text(json.dumps(report, indent=2))

    error_key = f"rel_error_vs_float64_N{args.error_length}_B1"
    report[error_key] = errors_at(args.error_length, args.heads, args.dim)
    save()
    for name, errs in report[error_key].items():
        print(f"error vs float64 {name:28s} " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    skipped = {}  # contenders left out by --only, in order
    # ours and SDPA at every length first, the peers (minutes of compiling) after
    for make_contenders in (own_contenders, lambda *t: peer_contenders(*t, peers)):
        for N in args.lengths:
            B = max(1, args.tokens // N)
            q, k, v, g, do = make_inputs(B, args.heads, N, args.dim)
            for name, (fn, leaves, dout) in make_contenders(q, k, v, g, do).items():
                if args.only and not any(text in name for text in args.only):
                    skipped[name] = None
                    continue
                fwd = time_ms(fn, leaves, dout, backward=False)
                fwd_bwd = time_ms(fn, leaves, dout, backward=True)
                rows.append(dict(kernel=name, N=N, B=B, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
                save()
                print(f"N={N:6d} B={B:3d} {name:28s} fwd {fwd or math.nan:8.3f} ms  "
                      f"fwd+bwd {fwd_bwd or math.nan:8.3f} ms", flush=True)
            del q, k, v, g, do
            torch.cuda.empty_cache()
    if args.only and not rows:
        parser.error(f"--only {' '.join(args.only)} matched none of the contenders: {', '.join(skipped)}")
    if args.profile:
        profile_chunk(args.profile, max(1, args.tokens // args.profile), args.heads, args.dim)
    if peers:
        report[error_key].update(errors_at(args.error_length, args.heads, args.dim, peers))
        save()
    errors = report[error_key]

    print(f"\n{gpu}; causal bf16, H={args.heads}, d={args.dim}, B*N={args.tokens}; ms (x SDPA-flash time)")
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    print(f"{'kernel':28s}" + "".join(f" | N={N:<6d} fwd        fwd+bwd      " for N in args.lengths))
    for name in names:
        line = f"{name:28s}"
        for N in args.lengths:
            base = next((r for r in rows if r["N"] == N and r["kernel"] == "SDPA flash"), None)
            cell = next((r for r in rows if r["N"] == N and r["kernel"] == name), None)
            for key in ("fwd_ms", "fwd_bwd_ms"):
                t = cell and cell[key]
                ratio = t / base[key] if t and base and base[key] else math.nan
                line += f" | {t:7.2f} ({ratio:4.2f}x)" if t else " |       -        "
        print(line)
    for N in args.lengths:
        ours = next((r for r in rows if r["N"] == N and r["kernel"] == "2Mamba-E (ours)"), None)
        fla = next((r for r in rows if r["N"] == N and r["kernel"] == "fla forgetting_attn"), None)
        if ours and fla and ours["fwd_bwd_ms"] and fla["fwd_bwd_ms"]:
            print(f"N={N}: fla forgetting_attn / 2Mamba-E fwd+bwd = {fla['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x")
    print(f"\nrelative error vs float64 at N={args.error_length}, B=1 (o dq dk dv dg):")
    for name, errs in errors.items():
        print(f"  {name:28s} " + " ".join(f"{errs[n]:.1e}" for n in ("o", "dq", "dk", "dv", "dg")))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
