"""kron(x): the symmetric second-order feature map phi with phi(q) . phi(k) == (q . k)^2.

phi(x) holds x_i * x_j for i <= j in row-major order (i outer), the cross terms (i < j) scaled by sqrt(2),
so it has d (d + 1) / 2 entries (2080 for d = 64) instead of the d^2 of a plain Kronecker product.
"""
from __future__ import annotations

import math

import torch

from .attention import resolve_backend


def kron_indices(d: int, device=None, dtype=torch.float32):
    """Index pairs (i, j), i <= j, and the per-entry scale (1 on the diagonal, sqrt 2 off it)."""
    i, j = torch.triu_indices(d, d, device=device)
    scale = torch.full(i.shape, math.sqrt(2.0), device=device, dtype=dtype).masked_fill(i == j, 1.0)
    return i, j, scale


def kron_reference(x: torch.Tensor) -> torch.Tensor:
    i, j, scale = kron_indices(x.shape[-1], x.device, x.dtype)
    return x[..., i] * x[..., j] * scale


def kron(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """phi(x) over the last dimension: [..., d] -> [..., d (d + 1) / 2], differentiable."""
    if resolve_backend(backend, x) == "torch":
        return kron_reference(x)
    from .triton_kron import triton_kron

    return triton_kron(x)
