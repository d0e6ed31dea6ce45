"""Pure-PyTorch reference of the attention core: the ground truth for every kernel.

It materialises the N x N weight matrix, so it is O(N^2) in time and memory. It computes in float32
(float64 when given float64 inputs) and returns q's dtype.
"""
from __future__ import annotations

import torch

POWERS = ("1", "2", "exp")
LAYOUTS = ("bhnd", "bnhd")


def bhnd_views(layout, *tensors):
    """The tensors as [B, H, N, ...] views: as given for layout "bhnd", with dims 1 and 2 swapped for "bnhd"
    ([B, N, H, ...], a projection's output before any transpose); no copies, None stays None. The swap is its
    own inverse, so the same call turns [B, H, N, ...] results into the caller's layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bhnd":
        return tensors
    return tuple(None if t is None else t.transpose(1, 2) for t in tensors)


def check_attention_args(q, k, v, g, power, scale):
    """Validate the public arguments of `attention`; returns the scale to use."""
    if power not in POWERS:
        raise ValueError(f"power must be one of {POWERS}, got {power!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, d]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must share [B, H, N] with q, got {tuple(v.shape)} and {tuple(q.shape)}")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(f"g (per-token log decay) must be [B, H, N] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention_weights(q, k, g=None, *, power="2", scale=None):
    """Un-normalised causal weights w[b, h, i, j] and the row shift m[b, h, i] they were divided by.

    For power "exp" the weights are exp(s_ij + a_i - a_j - m_i) with m_i the row maximum (m is 0 for the
    other powers), so w never overflows; the true weights are w * exp(m).
    """
    scale = check_attention_args(q, k, q, g, power, scale)
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if g is not None:
        a = torch.cumsum(g, dim=-1)
        # a_i - a_j <= 0 on and below the diagonal; mask above it before exponentiating.
        log_decay = (a[..., :, None] - a[..., None, :]).masked_fill(~causal, float("-inf"))
    else:
        log_decay = torch.zeros_like(s).masked_fill(~causal, float("-inf"))
    if power == "exp":
        logits = s + log_decay
        m = logits.amax(dim=-1)
        return torch.exp(logits - m[..., None]), m
    w = s if power == "1" else s * s
    return w * torch.exp(log_decay), torch.zeros_like(s[..., 0])


def attention_reference(q, k, v, g=None, *, power="2", normalize=True, scale=None, out_dtype=None,
                        return_den=False):
    """o_i = sum_{j<=i} w_ij v_j (/ sum_{j<=i} w_ij when normalize), w as in docs/math.md#attention-core.

    q, k: [B, H, N, d]; v: [B, H, N, dv]; g: [B, H, N] per-token log decay (<= 0) or None.
    A row whose normaliser is 0 gives 0. o in out_dtype (q's dtype by default). return_den (unnormalised,
    powers "1" and "2"): (o, den) with den_i = sum_{j<=i} w_ij [B, H, N] in the compute dtype.
    """
    out_dtype = out_dtype or q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    g = None if g is None else g.to(compute)
    w, m = attention_weights(q, k, g, power=power, scale=scale)
    o = torch.einsum("bhij,bhjd->bhid", w, v)
    if normalize:
        den = w.sum(dim=-1, keepdim=True)
        o = torch.where(den == 0, torch.zeros_like(o), o / torch.where(den == 0, torch.ones_like(den), den))
    elif power == "exp":
        o = o * torch.exp(m)[..., None]
    if return_den:
        return o.to(out_dtype), w.sum(dim=-1)
    return o.to(out_dtype)

