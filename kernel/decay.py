"""The per-token log decay of the "neg_softplus" blocks, g = -softplus(x) in float32 (README.md, "Attention
types"): one Triton kernel when decoding on CUDA instead of a cast, a softplus and a negation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from .attention import resolve_backend

BLOCK = 1024


@triton.jit
def _neg_softplus_kernel(X, G, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # F.softplus (beta 1, threshold 20): x above the threshold, log1p(e^x) = max(x, 0) + log1p(e^-|x|) at and
    # below it, log1p(y) as log(u) y / (u - 1) with u = 1 + y (exact to a few ulps for tiny y, where log(u)
    # alone would be 0)
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    tiny = u == 1.0
    log1p = tl.where(tiny, y, tl.log(u) * (y / tl.where(tiny, 1.0, u - 1.0)))
    tl.store(G + offs, -tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p), mask=mask)


def neg_softplus(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """-F.softplus(x.float()): the log decay g (float32, x's shape) from the decay projection x of any float dtype.

    backend as for attention (kernel/attention.py): "triton" runs the kernel, "torch" the formula. Whenever
    autograd needs the result's graph the formula runs, as the kernel has no backward.
    """
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if needs_grad or resolve_backend(backend, x) == "torch":
        return -F.softplus(x.float())
    flat = x.reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.contiguous()
    g = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if g.numel():
        _neg_softplus_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, g, flat.numel(), BLOCK=BLOCK, num_warps=4)
    return g
