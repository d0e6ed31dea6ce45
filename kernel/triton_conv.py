"""Triton causal depthwise conv1d over the channels of [B, N, C] activations, forward and backward.

y_t = bias + sum_i w_i x_{t-k+1+i} (zero rows before t = 0), per channel, for short windows (the q/k/v input
conv, k = 2..4). It works in the [B, N, C] layout the projections produce and the attention kernels read,
so no transposes or padded copies are made (nn.functional.conv1d needs [B, C, N]); fp32 accumulation.
Backward: dx_t = sum_i w_i dy_{t+k-1-i}; dw_i and dbias are sums over all (b, t), formed per span of rows
and block of channels and summed over the spans in PyTorch (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_compat import INTERPRET

# rows x channels per program (4 warps): 32 x 64 compiles for sm_90 without spills in either kernel (the
# backward of 64 x 128 spills; checked offline with cuobjdump --dump-resource-usage). Small in the
# interpreter so that tests cross block edges.
BLOCK_N, BLOCK_C = (8, 16) if INTERPRET else (32, 64)
# The backward's tiles (rows x the same channels) and tiles per program, whose dw and dbias sums it keeps in
# float32 tiles: 16 rows, as 32 took all 255 registers (bench/kernel_resources.py-style ptxas -v). Two tiles in the
# interpreter, so that tests cross programs.
BWD_BLOCK_N, BWD_TILES = (8, 2) if INTERPRET else (16, 16)
MAX_WIDTH = 4


@triton.jit
def _rows(X, b, offs_n, offs_c, N, C, s_b, s_n, s_c):
    """x[b, offs_n, offs_c] as fp32, zero outside [0, N) x [0, C) (the conv's zero padding)."""
    mask = (offs_n[:, None] >= 0) & (offs_n[:, None] < N) & (offs_c[None, :] < C)
    ptrs = X + b * s_b + offs_n[:, None].to(tl.int64) * s_n + offs_c[None, :] * s_c
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, Y, N, C, sx_b, sx_n, sx_c, sy_b, sy_n, sy_c,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(WIDTH):
        w = tl.load(W + offs_c * WIDTH + i, mask=c_mask, other=0.0).to(tl.float32)
        acc += w[None, :] * _rows(X, b, offs_n - (WIDTH - 1 - i), offs_c, N, C, sx_b, sx_n, sx_c)
    mask = (offs_n[:, None] < N) & c_mask[None, :]
    ptrs = Y + b * sy_b + offs_n[:, None].to(tl.int64) * sy_n + offs_c[None, :] * sy_c
    tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _shift_terms(X, DY, W, b, offs_n, offs_c, c_mask, dy, dx, acc, N, C, sx_b, sx_n, sx_c, sdy_b, sdy_n, sdy_c,
                 SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """The tap that reads x SHIFT rows back (tap WIDTH - 1 - SHIFT): y_t took w x_{t-SHIFT}, so dx_t gets
    w dy_{t+SHIFT}, and its dw sums dy_t x_{t-SHIFT} (acc, reduced once per program)."""
    w = tl.load(W + offs_c * WIDTH + WIDTH - 1 - SHIFT, mask=c_mask, other=0.0).to(tl.float32)
    dx += w[None, :] * _rows(DY, b, offs_n + SHIFT, offs_c, N, C, sdy_b, sdy_n, sdy_c)
    acc += dy * _rows(X, b, offs_n - SHIFT, offs_c, N, C, sx_b, sx_n, sx_c)
    return dx, acc


@triton.jit
def _conv_bwd_kernel(X, W, DY, DX, DWB, N, C, sx_b, sx_n, sx_c, sdy_b, sdy_n, sdy_c,
                     WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    """dx of TILES x BLOCK_N rows and BLOCK_C channels, and their share of dw_0..dw_{k-1} and dbias: rows
    (WIDTH + 1) of DWB[program]. The products dy_t x_{t-shift} add up in float32 tiles over the program's rows and
    are reduced across rows once at the end (a reduction per tile of 32 rows ran the backward 5x the forward's
    time on an H200, bench/NOTES.md). At most four taps (one accumulator each)."""
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    zeros = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    acc_bias, acc0, acc1, acc2, acc3 = zeros, zeros, zeros, zeros, zeros  # acc<s>: the tap reading s rows back
    for tile in range(TILES):
        offs_n = (tl.program_id(0) * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        dy = _rows(DY, b, offs_n, offs_c, N, C, sdy_b, sdy_n, sdy_c)
        acc_bias += dy
        dx = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        dx, acc0 = _shift_terms(X, DY, W, b, offs_n, offs_c, c_mask, dy, dx, acc0, N, C, sx_b, sx_n, sx_c, sdy_b,
                                sdy_n, sdy_c, 0, WIDTH)
        if WIDTH > 1:
            dx, acc1 = _shift_terms(X, DY, W, b, offs_n, offs_c, c_mask, dy, dx, acc1, N, C, sx_b, sx_n, sx_c,
                                    sdy_b, sdy_n, sdy_c, 1, WIDTH)
        if WIDTH > 2:
            dx, acc2 = _shift_terms(X, DY, W, b, offs_n, offs_c, c_mask, dy, dx, acc2, N, C, sx_b, sx_n, sx_c,
                                    sdy_b, sdy_n, sdy_c, 2, WIDTH)
        if WIDTH > 3:
            dx, acc3 = _shift_terms(X, DY, W, b, offs_n, offs_c, c_mask, dy, dx, acc3, N, C, sx_b, sx_n, sx_c,
                                    sdy_b, sdy_n, sdy_c, 3, WIDTH)
        mask = (offs_n[:, None] < N) & c_mask[None, :]
        tl.store(DX + b * N * C + offs_n[:, None].to(tl.int64) * C + offs_c[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
    part = DWB + ((b * tl.num_programs(0) + tl.program_id(0)) * (WIDTH + 1)) * C + offs_c
    tl.store(part + WIDTH * C, tl.sum(acc_bias, 0), mask=c_mask)
    tl.store(part + (WIDTH - 1) * C, tl.sum(acc0, 0), mask=c_mask)
    if WIDTH > 1:
        tl.store(part + (WIDTH - 2) * C, tl.sum(acc1, 0), mask=c_mask)
    if WIDTH > 2:
        tl.store(part + (WIDTH - 3) * C, tl.sum(acc2, 0), mask=c_mask)
    if WIDTH > 3:
        tl.store(part + (WIDTH - 4) * C, tl.sum(acc3, 0), mask=c_mask)


def _grid(B, N, C, rows=BLOCK_N):
    return (triton.cdiv(N, rows), triton.cdiv(C, BLOCK_C), B)


class _TritonCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        B, N, C = x.shape
        width = weight.shape[-1]
        w = weight.reshape(C, width)
        w = w if w.is_contiguous() else w.contiguous()
        y = x.new_empty(B, N, C)
        _conv_fwd_kernel[_grid(B, N, C)](x, w, w if bias is None else bias, y, N, C, *x.stride(), *y.stride(),
                                         WIDTH=width, HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, w)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        B, N, C = x.shape
        width = w.shape[-1]
        grid = _grid(B, N, C, BWD_BLOCK_N * BWD_TILES)
        dx = x.new_empty(B, N, C)
        parts = torch.empty(B * grid[0], width + 1, C, dtype=torch.float32, device=x.device)
        _conv_bwd_kernel[grid](x, w, dy, dx, parts, N, C, *x.stride(), *dy.stride(), WIDTH=width,
                               BLOCK_N=BWD_BLOCK_N, BLOCK_C=BLOCK_C, TILES=BWD_TILES)
        sums = parts.sum(0)  # [width + 1, C]
        dweight = sums[:width].t().reshape(ctx.weight_shape).to(ctx.weight_dtype)
        dbias = None if ctx.bias_dtype is None else sums[width].to(ctx.bias_dtype)
        return dx, dweight, dbias


def triton_causal_conv1d(x, weight, bias=None):
    """causal_conv1d (kernel/conv.py) through the Triton kernels: x [B, N, C] with any strides, weight
    [C, 1, k] (k <= MAX_WIDTH), bias [C] or None; y [B, N, C] contiguous in x's dtype. Differentiable in all
    three."""
    if weight.shape[-1] > MAX_WIDTH:
        raise ValueError(f"the Triton conv takes windows of up to {MAX_WIDTH} taps, got {weight.shape[-1]}; "
                         "kernel.conv.causal_conv1d runs wider ones through conv1d")
    return _TritonCausalConv.apply(x, weight, bias)


@triton.jit
def _step_kernel(X, STATE, W, BIAS, Y, C, K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One token of one sequence, a block of channels: y = bias + w . [state rows, x]; the state shifts by one."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    x = tl.load(X + b * C + c, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(W + c * K + K - 1, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=mask, other=0.0).to(tl.float32)
    row = STATE + b * (K - 1) * C + c
    for i in tl.static_range(K - 1):
        older = tl.load(row + i * C, mask=mask, other=0.0)
        y += older.to(tl.float32) * tl.load(W + c * K + i, mask=mask, other=0.0).to(tl.float32)
        if i > 0:
            tl.store(row + (i - 1) * C, older, mask=mask)
    if K > 1:
        tl.store(row + (K - 2) * C, x.to(STATE.dtype.element_ty), mask=mask)
    tl.store(Y + b * C + c, y.to(Y.dtype.element_ty), mask=mask)


def triton_causal_conv1d_step(x, conv_state, weight, bias=None):
    """kernel.conv.causal_conv1d_step on the GPU: x [B, 1, C], conv_state [B, k-1, C] updated in place."""
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous (it is updated in place)")
    batch, _, channels = x.shape
    y = torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(channels))
    _step_kernel[(batch, triton.cdiv(channels, block))](x.contiguous(), conv_state, weight.contiguous(),
                                                        x if bias is None else bias, y, channels, K=weight.shape[-1],
                                                        HAS_BIAS=bias is not None, BLOCK=block)
    return y
