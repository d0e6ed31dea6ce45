"""Causal depthwise conv1d over the channels of [B, N, C] activations (the q/k/v input conv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from .attention import resolve_backend

try:  # optional CUDA extension (Dao-AILab/causal-conv1d)
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = bias + sum_i weight[:, 0, i] * x_{t-k+1+i} with zero left padding.

    x: [B, N, C]; weight: [C, 1, k] (nn.Conv1d's depthwise layout); bias: [C] or None. Returns [B, N, C].
    """
    channels, _, width = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"conv expects {channels} channels in the last dim of x, got shape {tuple(x.shape)}")
    xt = x.transpose(1, 2)
    if causal_conv1d_fn is not None and x.is_cuda and 2 <= width <= 4:
        return causal_conv1d_fn(xt, weight[:, 0], bias).transpose(1, 2)
    y = F.conv1d(xt, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=width - 1, groups=channels)
    return y[..., : x.shape[1]].transpose(1, 2)


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


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The conv of one new token continuing a sequence: x [B, 1, C]; conv_state [B, k-1, C] the sequence's
    last k-1 inputs (zeros: the conv's zero padding), shifted in place to end with x. Returns y [B, 1, C].
    On the GPU one fused kernel (float32 sums): decoding runs it once per layer and token."""
    batch, _, channels = x.shape
    width = weight.shape[-1]
    if resolve_backend(backend, x) == "torch":
        window = torch.cat([conv_state, x], dim=1)
        y = torch.einsum("bkc,ck->bc", window.float(), weight[:, 0].float())[:, None]
        y = (y if bias is None else y + bias.float()).to(x.dtype)
        conv_state.copy_(window[:, 1:])
        return y
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous (it is updated in place)")
    y = torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(channels))
    _step_kernel[(batch, triton.cdiv(channels, block))](x.contiguous(), conv_state, weight.contiguous(),
                                                        x if bias is None else bias, y, channels, K=width,
                                                        HAS_BIAS=bias is not None, BLOCK=block)
    return y
