"""Triton forward and backward of kron(x), the symmetric second-order feature map (see kernel/kron.py).

Forward: y[r, e] = c_e x[r, i_e] x[r, j_e] over (row block, entry block) tiles; (i_e, j_e, c_e) come
from small index tables. Backward: with U[i, j] = dy[e(i, j)] c_e for i <= j, dx = (U + U^T) x, i.e.
dx[r, t] = sum_j dy[r, e(min(t, j), max(t, j))] f[t, j] x[r, j] with f = c off the diagonal and 2 on it.
The backward walks j and gathers one column of (U + U^T) per step from the (cached) row of dy.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)

BLOCK_ROWS = 16
BLOCK_ENTRIES = 128


@functools.lru_cache(maxsize=None)
def _tables(d: int, device: torch.device):
    """(i_e, j_e, c_e) per output entry, and the [d, d] tables e(min, max) and f used by the backward."""
    i, j = torch.triu_indices(d, d)
    c = torch.where(i == j, 1.0, math.sqrt(2.0))
    entry = torch.empty(d, d, dtype=torch.int32)
    entry[i, j] = torch.arange(i.numel(), dtype=torch.int32)
    entry[j, i] = entry[i, j]
    factor = torch.full((d, d), math.sqrt(2.0))
    factor.fill_diagonal_(2.0)
    return tuple(t.contiguous().to(device) for t in (i.to(torch.int32), j.to(torch.int32), c, entry, factor))


@triton.jit
def _kron_fwd_kernel(X, I, J, C, Y, M, D: tl.constexpr, E: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_ENTRIES: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ents = tl.program_id(1) * BLOCK_ENTRIES + tl.arange(0, BLOCK_ENTRIES)
    emask = ents < E
    i = tl.load(I + ents, mask=emask, other=0)
    j = tl.load(J + ents, mask=emask, other=0)
    c = tl.load(C + ents, mask=emask, other=0.0)
    mask = (rows[:, None] < M) & emask[None, :]
    xi = tl.load(X + rows[:, None] * D + i[None, :], mask=mask, other=0.0).to(tl.float32)
    xj = tl.load(X + rows[:, None] * D + j[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * E + ents[None, :], (xi * xj * c[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _kron_bwd_kernel(X, DY, ENTRY, F, DX, M, D: tl.constexpr, E: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rmask = rows < M
    t = tl.arange(0, BLOCK_D)
    tmask = t < D
    mask = rmask[:, None] & tmask[None, :]
    dx = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for j in range(D):
        e = tl.load(ENTRY + t * D + j, mask=tmask, other=0)
        f = tl.load(F + t * D + j, mask=tmask, other=0.0)
        dy = tl.load(DY + rows[:, None] * E + e[None, :], mask=mask, other=0.0).to(tl.float32)
        xj = tl.load(X + rows * D + j, mask=rmask, other=0.0).to(tl.float32)
        dx += dy * f[None, :] * xj[:, None]
    tl.store(DX + rows[:, None] * D + t[None, :], dx.to(DX.dtype.element_ty), mask=mask)


class _TritonKron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        d = x.shape[-1]
        e = d * (d + 1) // 2
        x2 = x.reshape(-1, d).contiguous()
        m = x2.shape[0]
        i, j, c, _, _ = _tables(d, x.device)
        y = torch.empty(m, e, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, BLOCK_ROWS), triton.cdiv(e, BLOCK_ENTRIES))
        if m:
            _kron_fwd_kernel[grid](x2, i, j, c, y, m, D=d, E=e, BLOCK_ROWS=BLOCK_ROWS, BLOCK_ENTRIES=BLOCK_ENTRIES)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], e)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        m, d = x2.shape
        e = d * (d + 1) // 2
        dy2 = dy.reshape(-1, e).contiguous()
        _, _, _, entry, factor = _tables(d, x2.device)
        dx = torch.empty_like(x2)
        if m:
            _kron_bwd_kernel[(triton.cdiv(m, BLOCK_ROWS),)](x2, dy2, entry, factor, dx, m, D=d, E=e,
                                                            BLOCK_ROWS=BLOCK_ROWS,
                                                            BLOCK_D=triton.next_power_of_2(d))
        return dx.reshape(ctx.x_shape)


def triton_kron(x: torch.Tensor) -> torch.Tensor:
    """phi(x) over the last dimension, [..., d] -> [..., d (d + 1) / 2]; differentiable."""
    return _TritonKron.apply(x)
