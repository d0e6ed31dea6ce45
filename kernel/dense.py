"""The decoder's linear layers over the few rows of a decoding step, each group of them one Triton launch.

At 32 rows (a token of each of 32 sequences) F.linear is latency-bound: cuBLAS takes ~5 us for 2-6 MB of
weights on an H200, whatever their size (bench/NOTES.md), and a block runs six products and the elementwise
ops between them. For at most MAX_ROWS rows these ops launch one kernel per group, each program a block of
BLOCK_N output columns over all rows, the weights streamed once:
    linears(x, weights, biases)   [F.linear(x, w, b) for each w, b]   a block's input projections together
    swiglu(x, gate, up)           silu(F.linear(x, gate)) * F.linear(x, up)   the MLP's first half
    linear(x, w, residual=r)      r + F.linear(x, w)   an output projection with the residual add
Each product is rounded to x's dtype before the elementwise ops, as the formula rounds. Anything else
(autograd, more rows, CPU tensors, autocast, dtypes that differ, non-contiguous weights) runs the formula; under
autocast linears and swiglu cast x once for all their products (_autocast_once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from .attention import resolve_backend

MAX_ROWS = 64  # beyond a decoding batch cuBLAS's tiles win
MAX_WEIGHTS = 4  # qkv, dt, decay and Z-gate projections of the largest generic block
# Output columns per program, the K step and the launch: the fastest of bench/kernel_sweep.py --kernels linear.
BLOCK_N = 16
BLOCK_K = 256
NUM_WARPS = 2
NUM_STAGES = 4
SHARED_BYTES = 200 * 1024  # for the pipeline's buffers, below the 227 KB of a Hopper block: fewer stages past it

PLAIN, RESIDUAL, SWIGLU = 0, 1, 2


@triton.jit
def _dot(x, w, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: a true float32 product, not tf32
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _load_k(PTR, rows, n_rows, stride, k, K):
    return tl.load(PTR + rows[:, None] * stride + k[None, :], mask=(rows < n_rows)[:, None] & (k < K)[None, :],
                   other=0.0)


@triton.jit
def _tile(X, W, BIAS, RES, OUT, col0, M, N, K, sxm, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Columns [col0, col0 + BLOCK_N) of F.linear(x, w, bias) (+ residual) for all rows."""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc += _dot(_load_k(X, rows, M, sxm, k, K), _load_k(W, cols, N, K, k, K), IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = OUT.dtype.element_ty
    y = acc.to(out)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:  # r + F.linear(...): the product rounded first, then the sum rounded
        y = (y.to(tl.float32) + tl.load(RES + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)).to(out)
    tl.store(OUT + rows[:, None] * N + cols[None, :], y, mask=mask)


@triton.jit
def _swiglu_tile(X, WG, WU, OUT, col0, M, N, K, sxm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Columns [col0, col0 + BLOCK_N) of silu(x wg^T) * (x wu^T), x's block loaded once for both products."""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = _load_k(X, rows, M, sxm, k, K)
        acc_g += _dot(x, _load_k(WG, cols, N, K, k, K), IEEE)
        acc_u += _dot(x, _load_k(WU, cols, N, K, k, K), IEEE)
    out = OUT.dtype.element_ty
    gate = acc_g.to(out).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out)  # F.silu: in float32, rounded
    y = (act.to(tl.float32) * acc_u.to(out).to(tl.float32)).to(out)
    tl.store(OUT + rows[:, None] * N + cols[None, :], y, mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _linear_kernel(X, W0, W1, W2, W3, B0, B1, B2, B3, O0, O1, O2, O3, RES, M, K, sxm, N0, N1, N2, N3,
                   NUM: tl.constexpr, BIASES: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program p: the p-th block of BLOCK_N columns over the outputs in turn (weight 0's blocks, then weight
    1's, ...); SWIGLU: blocks of the product of weights 0 (gate) and 1 (up). BIASES: bit i set when weight i
    has a bias. MODE: PLAIN (0), RESIDUAL (1, weight 0's output plus RES) or SWIGLU (2)."""
    p = tl.program_id(0)
    if MODE == 2:
        _swiglu_tile(X, W0, W1, O0, p * BLOCK_N, M, N0, K, sxm, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    else:
        t0 = tl.cdiv(N0, BLOCK_N)
        if p < t0:
            _tile(X, W0, B0, RES, O0, p * BLOCK_N, M, N0, K, sxm, BIASES & 1, MODE == 1, BLOCK_M, BLOCK_N, BLOCK_K,
                  IEEE)
        if NUM > 1:
            p1 = p - t0
            t1 = tl.cdiv(N1, BLOCK_N)
            if (p1 >= 0) & (p1 < t1):
                _tile(X, W1, B1, RES, O1, p1 * BLOCK_N, M, N1, K, sxm, BIASES & 2, False, BLOCK_M, BLOCK_N, BLOCK_K,
                      IEEE)
            if NUM > 2:
                p2 = p1 - t1
                t2 = tl.cdiv(N2, BLOCK_N)
                if (p2 >= 0) & (p2 < t2):
                    _tile(X, W2, B2, RES, O2, p2 * BLOCK_N, M, N2, K, sxm, BIASES & 4, False, BLOCK_M, BLOCK_N,
                          BLOCK_K, IEEE)
                if NUM > 3:
                    p3 = p2 - t2
                    if (p3 >= 0) & (p3 < tl.cdiv(N3, BLOCK_N)):
                        _tile(X, W3, B3, RES, O3, p3 * BLOCK_N, M, N3, K, sxm, BIASES & 8, False, BLOCK_M, BLOCK_N,
                              BLOCK_K, IEEE)


def _use_kernel(x, weights, backend):
    """Whether these rows of x and weights take the kernel (module docstring)."""
    if resolve_backend(backend, x) != "triton" or torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= MAX_ROWS and x.dtype.is_floating_point and x.dtype != torch.float64
            and all(w.dtype == x.dtype and w.is_contiguous() for w in weights))


def _autocast_once(x, n_products):
    """x in autocast's dtype when autocast would cast it for each of n_products > 1 products: autocast casts per
    product, and the backward pass then adds their float32 gradients (one float32 pass over x and one cast a
    product more, bench/NOTES.md); one cast makes one bf16 sum of their gradients and one cast back."""
    device = x.device.type
    if n_products > 1 and torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device))
    return x


def _block_m(rows):
    return max(16, triton.next_power_of_2(rows))


def pipeline_stages(block_m, weight_tiles, element_size):
    """NUM_STAGES, or fewer where their buffers would pass SHARED_BYTES: Triton's pipeline keeps stages - 1 tiles
    of x and of each weight in shared memory."""
    stage_bytes = (block_m + weight_tiles * BLOCK_N) * BLOCK_K * element_size
    return max(1, min(NUM_STAGES, 1 + SHARED_BYTES // stage_bytes))


def _launch(x, weights, biases, mode, residual=None):
    """The outputs of one launch: one per weight, or SWIGLU's one."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # a view when the leading dims merge
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    widths = [w.shape[0] for w in weights]
    outs = [torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) for n in widths[:1 if mode == SWIGLU else None]]
    blocks = [triton.cdiv(n, BLOCK_N) for n in widths[:1 if mode == SWIGLU else None]]
    block_m = _block_m(M)
    stages = pipeline_stages(block_m, 2 if mode == SWIGLU else 1, x.element_size())
    unused = MAX_WEIGHTS - len(weights)  # the kernel's pointers past NUM are never read: any tensor fills them
    pointers = [*weights, *[weights[0]] * unused, *[weights[0] if b is None else b for b in biases],
                *[weights[0]] * unused, *outs, *[outs[0]] * (MAX_WEIGHTS - len(outs))]
    _linear_kernel[(sum(blocks),)](rows, *pointers, rows if residual is None else residual, M, K, rows.stride(0),
                                   *widths, *[0] * unused, NUM=len(weights),
                                   BIASES=sum(1 << i for i, b in enumerate(biases) if b is not None), MODE=mode,
                                   BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32,
                                   num_warps=NUM_WARPS, num_stages=stages)
    return outs


def _check_weights(x, weights, biases):
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"linears takes 1 to {MAX_WEIGHTS} weights, got {len(weights)}")
    if len(biases) != len(weights):
        raise ValueError(f"linears takes one bias (or None) per weight: {len(weights)} weights, {len(biases)} biases")
    for w, b in zip(weights, biases):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"a weight must be [out, {x.shape[-1]}] for x of shape {tuple(x.shape)}, got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"a bias must be [{w.shape[0]}] for a weight of shape {tuple(w.shape)}, got {tuple(b.shape)}")


def linears(x, weights, biases=None, *, backend="auto"):
    """[F.linear(x, w, b) for w, b in zip(weights, biases)]: x [..., K], weights [N_i, K], biases [N_i] or None.

    backend as for attention (kernel/attention.py): "triton" launches one kernel for all when the rows qualify
    (module docstring), "torch" the formula.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    _check_weights(x, weights, biases)
    if not _use_kernel(x, weights + [b for b in biases if b is not None], backend):
        x = _autocast_once(x, len(weights))
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return _launch(x, weights, biases, PLAIN)


def linear(x, weight, *, residual=None, backend="auto"):
    """F.linear(x, weight) (no bias), plus residual (x's leading shape by [N]) when given."""
    _check_weights(x, [weight], [None])
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"residual must be {(*x.shape[:-1], weight.shape[0])}, got {tuple(residual.shape)}")
    tensors = [weight] if residual is None else [weight, residual]
    if not _use_kernel(x, tensors, backend):
        y = F.linear(x, weight)
        return y if residual is None else residual + y
    return _launch(x, [weight], [None], PLAIN if residual is None else RESIDUAL, residual)[0]


def swiglu(x, gate_weight, up_weight, *, backend="auto"):
    """F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight) (no biases), the two weights of equal shape."""
    _check_weights(x, [gate_weight, up_weight], [None, None])
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"swiglu's gate and up weights must have one shape, got {tuple(gate_weight.shape)} and "
                         f"{tuple(up_weight.shape)}")
    if not _use_kernel(x, [gate_weight, up_weight], backend):
        x = _autocast_once(x, 2)
        return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)
    return _launch(x, [gate_weight, up_weight], [None, None], SWIGLU)[0]
