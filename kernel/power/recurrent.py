"""Recurrent power attention: the one-token decode step as one fused Triton kernel.

For a single new token (per head): M <- e^g M + phi(k) [v, 1]^T, [num, den] = phi(scale q)^T M, updated
in place. One program per (head, block of feature rows, group of columns) forms phi(k) and phi(q) for its
rows from the index tables of kron (docs/math.md#linear-time-form) and updates them; a second small kernel
sums the blocks' shares of [num, den] and divides. Longer inputs and CPU tensors use the token loop of naive.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from ..attention import resolve_backend
from ..kron import kron_indices
from .naive import power_attention_naive, state_size, zero_state

# One program per (head, block of BLOCK_R feature rows, group of BLOCK_V state columns), no loop: the step only
# streams the float32 state through (read once, written once), and many small programs keep every SM's loads
# in flight; the state is loaded before the features are gathered, so its loads go out first. The blocks'
# shares of [num, den] are summed by a second small kernel. The fastest of bench/kernel_sweep.py (H200, batch
# 32, zero_state's layout).
BLOCK_R = 256
BLOCK_V = 16
NUM_WARPS = 1


@functools.lru_cache(maxsize=None)
def _feature_tables(d: int, power: str, device: torch.device):
    """(i_e, j_e, c_e): feature e of phi(x) is c_e x[i_e] x[j_e] (power "2") or x[i_e] (power "1")."""
    if power == "1":
        i = torch.arange(d, dtype=torch.int32, device=device)
        return i, i, torch.ones(d, device=device)
    i, j, c = kron_indices(d, device)
    return i.int(), j.int(), c


@triton.jit
def _step_kernel(Q, K, V, G, STATE, PART, I, J, C, scale, D, H, sqb, sqh, skb, skh, svb, svh, sgb, sgh,
                 ssb, ssh, ssr, ssc, dv: tl.constexpr, SQUARE: tl.constexpr, HAS_DECAY: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows [r BLOCK_R, (r + 1) BLOCK_R) and columns [c BLOCK_V, (c + 1) BLOCK_V) of one head's state [S, z]
    ([D, dv + 1]); the column group 0 also updates the normaliser column z. PART[bh, r] = these rows' share of
    [num, den]. q, k, v, g and the state are read through their strides (views of the projection need no copy;
    the column-major state of zero_state is read in aligned vectors)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    grp = tl.program_id(2)
    b, h = bh // H, bh % H
    cols = grp * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < dv
    rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < D
    row_ptr = STATE + b * ssb + h * ssh + rows.to(tl.int64) * ssr
    ptrs = row_ptr[:, None] + cols[None, :] * ssc
    mask = rmask[:, None] & cmask[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0)
    zmask = rmask & (grp == 0)  # z in the first group only (masked lanes touch no memory)
    z = tl.load(row_ptr + dv * ssc, mask=zmask, other=0.0)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    v = tl.load(V + b * svb + h * svh + cols, mask=cmask, other=0.0).to(tl.float32)
    i = tl.load(I + rows, mask=rmask, other=0)
    c = tl.load(C + rows, mask=rmask, other=0.0)
    fq = tl.load(Q + i, mask=rmask, other=0.0).to(tl.float32) * scale * c
    fk = tl.load(K + i, mask=rmask, other=0.0).to(tl.float32) * c
    if SQUARE:
        j = tl.load(J + rows, mask=rmask, other=0)
        fq *= tl.load(Q + j, mask=rmask, other=0.0).to(tl.float32) * scale
        fk *= tl.load(K + j, mask=rmask, other=0.0).to(tl.float32)
    decay = 1.0
    if HAS_DECAY:
        decay = tl.exp(tl.load(G + b * sgb + h * sgh).to(tl.float32))
    s = decay * s + fk[:, None] * v[None, :]
    tl.store(ptrs, s, mask=mask)
    part = PART + (bh * tl.num_programs(1) + blk) * (dv + 1)
    tl.store(part + cols, tl.sum(fq[:, None] * s, axis=0), mask=cmask)
    z = decay * z + fk
    tl.store(row_ptr + dv * ssc, z, mask=zmask)
    if grp == 0:
        tl.store(part + dv, tl.sum(fq * z, axis=0))


@triton.jit
def _finish_kernel(PART, OUT, GROUPS, E, dv, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """o = num / den of one head from the row blocks' shares (0 where den = 0), in o's dtype."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], tl.float32)
    for grp in range(GROUPS):
        total += tl.load(PART + (bh * GROUPS + grp) * E + cols, mask=cols < E, other=0.0)
    if NORMALIZE:
        den = tl.sum(tl.where(cols == dv, total, 0.0), axis=0)
        total = tl.where(den == 0.0, 0.0, total / tl.where(den == 0.0, 1.0, den))
    tl.store(OUT + bh * dv + cols, total.to(OUT.dtype.element_ty), mask=cols < dv)


def recurrent_step(q, k, v, g, state, *, power, scale, normalize):
    """One token on the GPU: updates `state` ([B, H, D, dv + 1], float32, any strides; fastest in zero_state's
    column-major layout) in place and returns o ([B, H, 1, dv], q's dtype): two kernels, the state update and
    the division."""
    B, H, _, d = q.shape
    dv = v.shape[-1]
    D, E = state.shape[-2:]
    blocks = triton.cdiv(D, BLOCK_R)
    part = torch.empty(B * H, blocks, E, dtype=torch.float32, device=q.device)
    i, j, c = _feature_tables(d, power, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    g_strides = (0, 0) if g is None else (g.stride(0), g.stride(1))
    block_v = min(BLOCK_V, triton.next_power_of_2(dv))
    grid = (B * H, blocks, triton.cdiv(dv, block_v))
    _step_kernel[grid](q, k, v, q if g is None else g, state, part, i, j, c, float(scale), D, H, q.stride(0),
                       q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *g_strides, *state.stride(),
                       dv=dv, SQUARE=power == "2", HAS_DECAY=g is not None, BLOCK_R=BLOCK_R, BLOCK_V=block_v,
                       num_warps=NUM_WARPS)
    o = torch.empty(B, H, 1, dv, dtype=q.dtype, device=q.device)
    _finish_kernel[(B * H,)](part, o, blocks, E, dv, NORMALIZE=normalize, BLOCK_E=triton.next_power_of_2(E))
    return o


def recurrent_power_attention(q, k, v, g, *, power, normalize, scale, initial_state, output_final_state,
                              inplace=False, backend="auto"):
    """Token-by-token power attention (inference: no gradients through the fused step). inplace: the fused
    step updates a float32 initial_state itself instead of a copy."""
    use_kernel = (q.shape[2] == 1 and resolve_backend(backend, q) == "triton" and q.dtype != torch.float64
                  and not torch.is_grad_enabled())
    if not use_kernel:
        return power_attention_naive(q, k, v, g, power=power, normalize=normalize, scale=scale,
                                     initial_state=initial_state, output_final_state=output_final_state)
    if inplace and initial_state.dtype == torch.float32:
        state = initial_state
    else:
        B, H, _, d = q.shape
        state = zero_state(B, H, state_size(d, power), v.shape[-1], q.device)
        if initial_state is not None:
            state.copy_(initial_state)
    o = recurrent_step(q, k, v, g, state, power=power, scale=scale, normalize=normalize)
    return (o, state) if output_final_state else o
