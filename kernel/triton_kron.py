"""Triton forward and backward of kron(x), the symmetric second-order feature map (see kernel/kron.py).

phi(x) lists x_i x_j for i <= j row by row (i outer), cross terms scaled by sqrt 2, so the entries of one
i are contiguous: e = e(i) + (j - i) with e(i) = i d - i (i - 1) / 2. Both kernels hold a block of rows of
x in registers and walk i, touching one contiguous segment of phi per step (coalesced, no index tables).
Backward: dx_i = sum_{j >= i} f_ij dy_ij x_j (f = 2 on the diagonal, sqrt 2 off it) and, for j > i,
dx_j += sqrt 2 dy_ij x_i.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)

BLOCK_ROWS = 32
SQRT2 = tl.constexpr(1.4142135623730951)


@triton.jit
def _row_block(X, M, D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    x = tl.load(X + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & (cols[None, :] < D), other=0.0)
    return rows, cols, rmask, x.to(tl.float32)


@triton.jit
def _kron_fwd_kernel(X, Y, M, D: tl.constexpr, E: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, rmask, x = _row_block(X, M, D, BLOCK_ROWS, BLOCK_D)
    for i in range(D):
        xi = tl.load(X + rows * D + i, mask=rmask, other=0.0).to(tl.float32)
        start = i * D - i * (i - 1) // 2 - i  # so that entry (i, j) sits at start + j
        y = xi[:, None] * x * tl.where(cols == i, 1.0, SQRT2)[None, :]
        mask = rmask[:, None] & ((cols >= i) & (cols < D))[None, :]
        tl.store(Y + rows[:, None] * E + start + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _kron_bwd_kernel(X, DY, DX, M, R, stride_dy_batch, stride_dy_row, stride_dy_entry, D: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy is read as [M / R, R, E] with any strides (the products that feed it often leave it transposed)."""
    rows, cols, rmask, x = _row_block(X, M, D, BLOCK_ROWS, BLOCK_D)
    dy_rows = DY + (rows // R) * stride_dy_batch + (rows % R) * stride_dy_row
    dx = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for i in range(D):
        xi = tl.load(X + rows * D + i, mask=rmask, other=0.0).to(tl.float32)
        start = i * D - i * (i - 1) // 2 - i
        mask = rmask[:, None] & ((cols >= i) & (cols < D))[None, :]
        dy = tl.load(dy_rows[:, None] + (start + cols[None, :]) * stride_dy_entry, mask=mask,
                     other=0.0).to(tl.float32)
        dxi = tl.sum(dy * x * tl.where(cols == i, 2.0, SQRT2)[None, :], axis=1)
        dx += tl.where(cols[None, :] > i, SQRT2 * dy * xi[:, None], 0.0)
        dx += tl.where(cols[None, :] == i, dxi[:, None], 0.0)
    tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < D))


class _TritonKron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        d = x.shape[-1]
        e = d * (d + 1) // 2
        x2 = x.reshape(-1, d).contiguous()
        m = x2.shape[0]
        y = torch.empty(m, e, dtype=x.dtype, device=x.device)
        if m:
            _kron_fwd_kernel[(triton.cdiv(m, BLOCK_ROWS),)](x2, y, m, D=d, E=e, BLOCK_ROWS=BLOCK_ROWS,
                                                            BLOCK_D=triton.next_power_of_2(d))
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], e)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        m, d = x2.shape
        e = d * (d + 1) // 2
        dy3 = dy.reshape(-1, dy.shape[-2] if dy.dim() > 1 else 1, e)  # a view whenever dy's batch dims allow
        dx = torch.empty_like(x2)
        if m:
            _kron_bwd_kernel[(triton.cdiv(m, BLOCK_ROWS),)](x2, dy3, dx, m, dy3.shape[1], *dy3.stride(), D=d,
                                                            BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(d))
        return dx.reshape(ctx.x_shape)


def triton_kron(x: torch.Tensor) -> torch.Tensor:
    """phi(x) over the last dimension, [..., d] -> [..., d (d + 1) / 2]; differentiable."""
    return _TritonKron.apply(x)
