"""Token-by-token recurrence of power attention: the float64 ground truth for state passing.

Per head, with phi(x) = x (power "1") or kron(x) (power "2", docs/math.md#linear-time-form) and the
state M = [S, z] of shape [D, dv + 1]:
    M_t = e^{g_t} M_{t-1} + phi(k_t) [v_t, 1]^T,     [num_t, den_t] = phi(scale q_t)^T M_t,
    o_t = num_t / den_t (normalize; 0 where den_t == 0) or num_t.
O(N D dv) time, one small step per token: a reference and the CPU decode step, not a training path.
"""
from __future__ import annotations

import torch

from ..kron import kron_reference


def feature_map(x: torch.Tensor, power: str) -> torch.Tensor:
    """phi(x) over the last dimension: x itself for power "1", the symmetric kron for power "2"."""
    return x if power == "1" else kron_reference(x)


def state_size(d: int, power: str) -> int:
    """D, the number of features per key: d for power "1", d (d + 1) / 2 for power "2"."""
    return d if power == "1" else d * (d + 1) // 2


def zero_state(batch: int, heads: int, D: int, dv: int, device, dtype=torch.float32) -> torch.Tensor:
    """An empty context's state, [batch, heads, D, dv + 1] as a view of [batch, heads, dv + 1, D] memory: the
    state's column-major layout, in which the one-token step (recurrent.py) reads and writes every column of a
    block of feature rows in aligned vectors (a row of dv + 1 = 65 floats is not 16-byte aligned). The
    algorithms take a state of any strides; decoding caches allocate theirs here."""
    return torch.zeros(batch, heads, dv + 1, D, device=device, dtype=dtype).transpose(-1, -2)


def normalized(total: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Split [..., dv + 1] = [num, den] and divide; rows with den == 0 give 0 (and a zero gradient)."""
    num, den = total[..., :-1], total[..., -1:]
    if not normalize:
        return num
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def power_attention_naive(q, k, v, g=None, *, power="2", normalize=True, scale=None,
                          initial_state=None, output_final_state=False):
    """Same contract as kernel.power_attention; computes in float32 (float64 for float64 inputs)."""
    B, H, N, d = q.shape
    dv = v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = feature_map(q.to(compute) * scale, power)
    fk = feature_map(k.to(compute), power)
    v1 = torch.cat([v.to(compute), torch.ones_like(v[..., :1], dtype=compute)], dim=-1)
    state = (q.new_zeros(B, H, fk.shape[-1], dv + 1, dtype=compute) if initial_state is None
             else initial_state.to(compute))
    outs = []
    for t in range(N):
        if g is not None:
            state = torch.exp(g[:, :, t].to(compute))[..., None, None] * state
        state = state + fk[:, :, t, :, None] * v1[:, :, t, None, :]
        outs.append(torch.einsum("bhD,bhDe->bhe", fq[:, :, t], state))
    total = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, dv + 1, dtype=compute)
    o = normalized(total, normalize).to(q.dtype)
    return (o, state) if output_final_state else o
