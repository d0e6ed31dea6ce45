"""RMSNorm of the decoder layers (GPT_Trainer/LlamaDecoderLayerClean.py): one Triton kernel when decoding on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import resolve_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype): Llama's RMSNorm, normalised in
    float32 and rounded to x's dtype before the weight; the result has torch.result_type(weight, x).

    x: [..., C] of any float dtype; weight: [C]. backend as for attention (kernel/attention.py): "triton" runs
    kernel/triton_norm.py (4 launches in one for a bf16 model), "torch" the formula. Whenever autograd needs
    the result's graph the formula runs, as the kernel has no backward.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm expects a weight of shape {tuple(x.shape[-1:])}, got {tuple(weight.shape)}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad or resolve_backend(backend, x) == "torch":
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    from .triton_norm import triton_rms_norm

    return triton_rms_norm(x, weight, eps)
