"""Attention-core math of 2Mamba: one public function per operation, reference beside the kernels."""
from .attention import attention
from .conv import causal_conv1d, causal_conv1d_step
from .decay import neg_softplus
from .dense import linear, linears, swiglu
from .kron import kron
from .norm import rms_norm
from .power import power_attention
from .reference import attention_reference

__all__ = [
    "attention", "attention_reference", "causal_conv1d", "causal_conv1d_step", "kron", "linear", "linears",
    "neg_softplus", "power_attention", "rms_norm", "swiglu",
]
