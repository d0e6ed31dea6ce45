"""Causal depthwise conv1d over the channels of [B, N, C] activations (the q/k/v input conv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import resolve_backend


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """y_t = bias + sum_i weight[:, 0, i] * x_{t-k+1+i} with zero left padding.

    x: [B, N, C]; weight: [C, 1, k] (nn.Conv1d's depthwise layout); bias: [C] or None. Returns [B, N, C].
    backend as for attention (kernel/attention.py): "triton" runs kernel/triton_conv.py in the [B, N, C]
    layout (contiguous y; windows of up to 4 taps), "torch" nn.functional.conv1d. (The causal-conv1d
    extension is not used here: it takes only inputs whose batch and channel strides are multiples of 8, which
    the split projections of the blocks are not, e.g. the Mamba-2 block's xBC.)
    """
    channels, _, width = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"conv expects {channels} channels in the last dim of x, got shape {tuple(x.shape)}")
    if resolve_backend(backend, x) == "triton":
        from .triton_conv import MAX_WIDTH, triton_causal_conv1d

        if width <= MAX_WIDTH:  # wider windows (no config uses them) take conv1d below
            return triton_causal_conv1d(x, weight, bias)
    # Zero rows on the left only: y is [B, C, N] itself, so the [B, N, C] view returned has feature stride N
    # (not N + k - 1: aligned for the attention kernels, which read it with its strides). The pad is the copy
    # that conv1d would make of the transposed input anyway.
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight.to(x.dtype),
                 None if bias is None else bias.to(x.dtype), groups=channels)
    return y.transpose(1, 2)


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The conv of one new token continuing a sequence: x [B, 1, C]; conv_state [B, k-1, C] the sequence's
    last k-1 inputs (zeros: the conv's zero padding), shifted in place to end with x. Returns y [B, 1, C].
    backend "triton": one fused kernel (float32 sums), as decoding runs it once per layer and token."""
    if resolve_backend(backend, x) == "triton":
        from .triton_conv import triton_causal_conv1d_step

        return triton_causal_conv1d_step(x, conv_state, weight, bias)
    window = torch.cat([conv_state, x], dim=1)
    y = torch.einsum("bkc,ck->bc", window.float(), weight[:, 0].float())[:, None]
    y = (y if bias is None else y + bias.float()).to(x.dtype)
    conv_state.copy_(window[:, 1:])
    return y
