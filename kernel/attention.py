"""The public attention-core op: one entry point, dispatching to Triton on CUDA and to the reference elsewhere."""
from __future__ import annotations

import os

import torch

from .reference import attention_reference, bhnd_views, check_attention_args

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" means Triton for CUDA tensors and the PyTorch reference otherwise; the environment variable
    TWOMAMBA_ATTENTION_BACKEND ("triton" or "torch") overrides "auto", e.g. to train through the reference."""
    if backend == "auto":
        backend = os.environ.get("TWOMAMBA_ATTENTION_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (argument or TWOMAMBA_ATTENTION_BACKEND)")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def attention(q, k, v, g=None, *, power="2", normalize=True, scale=None, backend="auto", layout="bhnd",
              out_dtype=None, return_den=False):
    """Causal attention core of every generic 2Mamba block (docs/math.md#attention-core, #kernels).

    q, k, v: [B, H, N, d]; g: per-token log decay [B, H, N] (<= 0, cumulated inside) or None;
    power: "1" (s), "2" (s^2) or "exp" (e^s) with s = scale * q.k (scale defaults to 1/sqrt(d));
    normalize: divide by the row sum (sm_norm); rows whose sum is 0 give 0. Returns o in q's dtype, or in
    out_dtype (e.g. float32 sums of bf16 inputs: the chunked form's in-chunk term, kernel/power/chunk.py).
    layout "bnhd": q, k, v [B, N, H, d], g [B, N, H] and o [B, N, H, dv] instead (the Triton kernels read any
    strides and write o in that layout, so a block passes its projections' views without copies).
    return_den (normalize=False, powers "1" and "2"): also the weights' row sums den_i = sum_{j<=i} w_ij (float32,
    float64 for float64 inputs; g's layout), (o, den): the chunked form's in-chunk numerator and normaliser,
    which it divides by the whole context's (kernel/power/chunk.py). Differentiable in both.
    """
    views = bhnd_views(layout, q, k, v, g)
    scale = check_attention_args(*views, power, scale)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None (q's dtype), got {out_dtype!r}")
    if return_den and (normalize or power == "exp"):
        raise ValueError(f"return_den needs normalize=False and power '1' or '2', got normalize={normalize}, "
                         f"power={power!r}")
    if resolve_backend(backend, q) == "torch":
        out = attention_reference(*views, power=power, normalize=normalize, scale=scale, out_dtype=out_dtype,
                                  return_den=return_den)
        return bhnd_views(layout, *out) if return_den else bhnd_views(layout, out)[0]
    from .triton_attention import triton_attention

    return triton_attention(q, k, v, g, power=power, normalize=normalize, scale=scale, layout=layout,
                            out_dtype=out_dtype, return_den=return_den)
