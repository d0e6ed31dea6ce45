"""Triton RMSNorm forward: one program per row, the whole row in one block (kernel/norm.py's contract)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 16384 fp32 values over 16 warps is 32 registers a thread for the row (and as many for the weight)
MAX_CHANNELS = 16384


@triton.jit
def _rms_norm_kernel(X, W, Y, C, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    # div_rn: "/" on fp32 is the approximate div.full.f32 on NVIDIA, ATen's mean divides with IEEE rounding
    # (C * 1.0: a float C whether C is a scalar or the constant that Triton makes of C == 1)
    rstd = tl.rsqrt(tl.math.div_rn(tl.sum(x * x, 0), C * 1.0) + eps)
    normed = (x * rstd).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    # PyTorch multiplies in float32 (float64 for a float64 result) and rounds once; the exact product of two
    # bf16 or fp16 values fits in float32, so a correctly rounded multiply in Y's dtype gives the same bits
    out = Y.dtype.element_ty
    tl.store(Y + row * C + offs, normed.to(out) * w.to(out), mask=mask)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernel.norm.rms_norm through the kernel: x [..., C] with a contiguous last dim (copied otherwise), weight
    [C]; y contiguous in torch.result_type(weight, x)."""
    C = x.shape[-1]
    if C > MAX_CHANNELS:
        raise ValueError(f"the Triton rms_norm supports at most {MAX_CHANNELS} channels, got {C}")
    rows = x.reshape(-1, C)  # a view with a row stride when the leading dims merge, a copy otherwise
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if y.numel():
        block = triton.next_power_of_2(C)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), y, C, rows.stride(0), eps, BLOCK=block,
                                           num_warps=min(max(block // 256, 1), 16))
    return y
