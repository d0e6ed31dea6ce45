"""Linear-time (chunked) form of power-2 attention, i.e. 2Mamba (SPEC section 4, "Linear-time form").

(s q.k)^2 = phi(s q) . phi(k) with phi = kron (D = d(d+1)/2 features), so the causal sum splits at chunk
borders. Inside each chunk of C tokens the quadratic kernel runs as usual (un-normalised, chunk-local
decay). Earlier chunks enter through per-chunk states
    U_c = sum_{j in c} e^{a_end(c) - a_j} phi(k_j) [v_j, 1]^T            ([D, dv + 1])
    S_c = sum_{c' <= c} e^{a_end(c) - a_end(c')} U_c'                     (state after chunk c)
and query i of chunk c + 1 adds e^{a_i - a_end(c)} phi(s q_i)^T S_c. The extra column of ones carries the
normaliser. Every exponent is a difference of cumulative decays inside one chunk or between chunk ends,
taken in float64, so each factor is <= 1 and nothing overflows.

Cost per head: O(N C d) inside chunks, O(N D dv) for the states and queries, and O((N/C)^2 D dv) for
the chunk-to-chunk sum, done as one matrix product (fine while N/C is in the hundreds). Everything is
PyTorch autograd around the Triton attention and kron kernels, so gradients reach q, k, v and g.
The normalisation o = num / den is differentiated by autograd, so this form does not have the quadratic
kernel's protection of the diagonal term: a row dominated by its own key (the first token, strong decay)
gets dL/dq_i from a cancellation, rounding noise amplified by 1 / s_ii for tiny s_ii.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attention
from .kron import kron
from .reference import check_attention_args


def chunked_squared_attention(q, k, v, g=None, *, normalize=True, scale=None, chunk=256, backend="auto"):
    """Same result as attention(q, k, v, g, power="2", normalize=normalize, scale=scale), in linear time.

    q, k: [B, H, N, d]; v: [B, H, N, dv]; g: [B, H, N] per-token log decay or None; chunk: tokens per chunk.
    backend is passed to the intra-chunk attention and to kron.
    """
    scale = check_attention_args(q, k, v, g, "2", scale)
    B, H, N, d = q.shape
    dv = v.shape[-1]
    pad = (-N) % chunk
    n = (N + pad) // chunk
    if g is None:
        g = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
    # padded keys have k = 0 (no weight anywhere), padded queries are cut off at the end
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g = F.pad(g, (0, pad))
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

    def chunks(t):
        return t.reshape(B, H * n, chunk, *t.shape[3:])

    intra = attention(chunks(q), chunks(k), chunks(v1), chunks(g), power="2", normalize=False, scale=scale,
                      backend=backend).reshape(B, H, n, chunk, dv + 1)

    a_local = torch.cumsum(g.double().reshape(B, H, n, chunk), dim=-1)  # a_i - a_end(previous chunk)
    a_chunk = a_local[..., -1]  # log decay across each chunk
    a_end = torch.cumsum(a_chunk, dim=-1)
    fq = kron((q * scale).reshape(B, H, n, chunk, d), backend=backend)
    fk = kron(k.reshape(B, H, n, chunk, d), backend=backend)

    key_decay = torch.exp(a_chunk[..., None] - a_local).to(v1.dtype)
    states = torch.einsum("bhncD,bhnce->bhnDe", fk, v1.reshape(B, H, n, chunk, dv + 1) * key_decay[..., None])
    # carry[c] = sum_{c' < c} e^{a_end(c - 1) - a_end(c')} U_c': the state each chunk's queries read
    gap = (a_end - a_chunk)[..., :, None] - a_end[..., None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    carry_weights = torch.exp(gap.masked_fill(~earlier, float("-inf"))).float()
    carry = torch.einsum("bhmn,bhnDe->bhmDe", carry_weights, states.float())
    inter = torch.einsum("bhncD,bhnDe->bhnce", fq, carry.to(fq.dtype))
    total = intra.float() + inter.float() * torch.exp(a_local).float()[..., None]
    total = total.reshape(B, H, n * chunk, dv + 1)[:, :, :N]
    num, den = total[..., :dv], total[..., dv:]
    if normalize:
        zero = den == 0  # rows with a zero normaliser give 0, and no NaN gradient through the unused branch
        num = torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
    return num.to(q.dtype)
