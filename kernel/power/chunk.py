"""Chunked linear-time power attention (docs/math.md#linear-time-form), state in and out.

The sequence is cut into chunks of C tokens. With b the cumulative log decay inside a chunk (b_t sums g
from the chunk's first token to t, so b <= 0 and L = b_last is the chunk's total decay) and M_c = [S, z]
the state entering chunk c ([D, dv + 1], float32):
    [num_t, den_t] = intra_t + e^{b_t} phi(scale q_t)^T M_c
    intra_t        = sum_{j <= t in the chunk} e^{b_t - b_j} w(q_t, k_j) [v_j, 1]    (the quadratic kernel)
    M_{c+1}        = e^{L_c} M_c + U_c,   U_c = sum_{j in c} e^{L_c - b_j} phi(k_j) [v_j, 1]^T
The states M_c come from one sequential pass over the chunks (a Triton kernel on the GPU, forward and
backward), not from a product over all chunk pairs. Every exponent is a difference inside one chunk, so
each factor is <= 1 and nothing overflows at any length; b is summed in float64.
The state's two parts go apart: S [D, dv] through the fused feature products of features.py (phi formed on
chip), z [D] through d x d products (the normaliser kernels there), so no product runs over a [v, 1] padded
to 16 columns for the one column of z. Likewise intra's two parts: the quadratic kernel on v, its own row
sums of the weights as the den part (attention(..., return_den=True)), and one fused kernel combines intra and
inter, divides and casts. For power 2 on the kernels the three (in-chunk kernel, state part: chunk sums, scans,
the queries' reads of S and z; combine) are one autograd function with its backward written out
(_FusedChunkCore), which can form the states again instead of keeping them (recompute_states), and two small
kernels compute the chunks' decays from g and gather d g; elsewhere autograd strings the three and a few
elementwise ops on the decays together. Those kernels take the chunks as strided blocks (features.py), so the
model's q, k, v, views of its [B, N, H, d] projection, are read and o and the gradients written in that layout
(layout "bnhd"), without transposed copies.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from .. import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from ..attention import attention, resolve_backend
from ..reference import bhnd_views
from ..triton_attention import MAX_GRID_HEADS, attention_backward, attention_forward
from .features import (_block_start, _strides, apply, feature_apply, feature_dot, feature_outer, feature_weighted_sum,
                       grad, gram, outer, quad)
from .naive import normalized, state_size

# The scans' launch constants: state entries per program and warps (bench/kernel_sweep.py --kernels scan)
SCAN = dict(BLOCK=1024, NUM_WARPS=4)
COMBINE_ROWS = 32
SEGMENT_TOKENS = 1 << 23  # token-heads per piece of a long input without gradients: ~9 GB of bf16 states


@triton.jit
def _chunk_decay(G, t_, H2, SG1, SG2, SG, c, mask, C):
    """b = cumsum g over block t_'s chunk in float64 (g blocks [U, C, H2] of strides SG1, SG2, token stride SG) and
    b_last exactly."""
    b = tl.cumsum(tl.load(_block_start(G, t_, H2, SG1, SG2) + c * SG, mask=mask, other=0.0).to(tl.float64), 0)
    return b, tl.sum(tl.where(c == C - 1, b, 0.0), 0)


@triton.jit
def _decay_fwd_kernel(G, SG1, SG2, SG, H2, W, L, QD, C, sq_scale, BLOCK_C: tl.constexpr):
    """One chunk's decays from its log decays g (block t_ of the blocks [U, C, H2] with strides SG1, SG2 and token
    stride SG; features.py): b = cumsum g (float64), L = b_last, the keys' e^{L - b} and the queries' sq_scale e^b
    (float32, [T, C] in block order)."""
    t_ = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    b, last = _chunk_decay(G, t_, H2, SG1, SG2, SG, c, mask, C)
    tl.store(W + t_ * C + c, tl.exp(last - b).to(tl.float32), mask=mask)
    tl.store(QD + t_ * C + c, (tl.exp(b) * sq_scale).to(tl.float32), mask=mask)
    tl.store(L + t_, last.to(tl.float32))


@triton.jit
def _decay_bwd_kernel(G, SG1, SG2, SG, H2, DW, DL, DQD, DA_Q, DA_K, DG, SD1, SD2, SD, C, sq_scale,
                      HAS_DQD: tl.constexpr, HAS_DA: tl.constexpr, BLOCK_C: tl.constexpr):
    """d g of one chunk from the gradients of _decay_fwd_kernel's outputs (d qd with HAS_DQD) and, HAS_DA, of the
    in-chunk kernel's cumulative decay, which is b (its two terms): d b = d a - e^{L - b} d w + sq_scale e^b d qd,
    plus d L + sum_j e^{L - b_j} d w_j at the last token; d g is the reverse cumulative sum of d b (float64),
    into blocks of DG's strides SD1, SD2, SD."""
    t_ = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    b, last = _chunk_decay(G, t_, H2, SG1, SG2, SG, c, mask, C)
    DG = _block_start(DG, t_, H2, SD1, SD2)
    dw = tl.exp(last - b) * tl.load(DW + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    db = -dw
    if HAS_DQD:
        db += tl.exp(b) * sq_scale * tl.load(DQD + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    if HAS_DA:
        db += tl.load(DA_Q + t_ * C + c, mask=mask, other=0.0).to(tl.float64) + \
            tl.load(DA_K + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    db += tl.where(c == C - 1, tl.load(DL + t_).to(tl.float64) + tl.sum(dw, 0), 0.0)
    tl.store(DG + c * SD, tl.cumsum(db, 0, reverse=True).to(DG.dtype.element_ty), mask=mask)


def _decays(g, sq_scale):
    """(keys' decays w [T, C], chunk decays L [T], queries' decays qd [T, C]), float32 in block order, of the
    chunks' log decays g, blocks [U, C, H2] (any strides, any float dtype), by _decay_fwd_kernel."""
    U, C, heads = g.shape
    T = U * heads
    w, qd = torch.empty(T, C, dtype=torch.float32, device=g.device), torch.empty(T, C, dtype=torch.float32,
                                                                                device=g.device)
    L = torch.empty(T, dtype=torch.float32, device=g.device)
    _decay_fwd_kernel[(T,)](g, *_strides(g), heads, w, L, qd, C, sq_scale, BLOCK_C=triton.next_power_of_2(C))
    return w, L, qd


@triton.jit
def _load_or_zeros(PTR, offs, mask, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    if PRESENT:
        return tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK], tl.float32)


@triton.jit
def _first_chunk(bh, n, H2):
    """Block index of sequence bh's first chunk: blocks are in the order (batch, chunk, head of H2), so its chunks
    are H2 apart (H2 = 1: a sequence's chunks are consecutive)."""
    return (bh // H2) * n * H2 + bh % H2


@triton.jit
def _scan_fwd_kernel(U, LOGD, H0, STATES, FINAL, n, M, H2, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    """STATES[c] = state entering chunk c; FINAL = state after the last chunk. One program per (head, block).
    U, LOGD, STATES in block order (_first_chunk). Each step loads the next chunk's sums and decay before it
    updates the state, so the update never waits on a load issued in the same step."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    t0 = _first_chunk(bh, n, H2)
    h = _load_or_zeros(H0 + bh * M, offs, mask, HAS_H0, BLOCK)
    u = tl.load(U + t0 * M + offs, mask=mask, other=0.0).to(tl.float32)
    log_decay = tl.load(LOGD + t0)
    for c in range(n):
        t_ = t0 + c * H2
        row = t_ * M
        tl.store(STATES + row + offs, h.to(STATES.dtype.element_ty), mask=mask)
        more = c + 1 < n
        u_next = tl.load(U + row + H2 * M + offs, mask=mask & more, other=0.0).to(tl.float32)
        log_decay_next = tl.load(LOGD + t_ + H2, mask=more, other=0.0)
        h = tl.exp(log_decay) * h + u
        u, log_decay = u_next, log_decay_next
    tl.store(FINAL + bh * M + offs, h, mask=mask)


@triton.jit
def _scan_bwd_kernel(STATES, LOGD, DSTATES, DFINAL, DU, DLOGD, DH0, n, M, H2, NBLOCKS,
                     HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse pass: dU_c = dM_{c+1}; dL_c = e^{L_c} <dM_{c+1}, M_c> (one partial sum per block). Each step loads
    the previous chunk's rows before it uses the current ones (as the forward)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    dh = _load_or_zeros(DFINAL + bh * M, offs, mask, HAS_DFINAL, BLOCK)
    t_last = _first_chunk(bh, n, H2) + (n - 1) * H2
    h = tl.load(STATES + t_last * M + offs, mask=mask, other=0.0).to(tl.float32)
    dstate = tl.load(DSTATES + t_last * M + offs, mask=mask, other=0.0).to(tl.float32)
    log_decay = tl.load(LOGD + t_last)
    for i in range(n):
        t_ = t_last - i * H2
        row = t_ * M
        more = i + 1 < n
        h_prev = tl.load(STATES + row - H2 * M + offs, mask=mask & more, other=0.0).to(tl.float32)
        dstate_prev = tl.load(DSTATES + row - H2 * M + offs, mask=mask & more, other=0.0).to(tl.float32)
        log_decay_prev = tl.load(LOGD + t_ - H2, mask=more, other=0.0)
        tl.store(DU + row + offs, dh.to(DU.dtype.element_ty), mask=mask)
        decay = tl.exp(log_decay)
        tl.store(DLOGD + t_ * NBLOCKS + blk, decay * tl.sum(dh * h, axis=0))
        dh = decay * dh + dstate
        h, dstate, log_decay = h_prev, dstate_prev, log_decay_prev
    tl.store(DH0 + bh * M + offs, dh, mask=mask)


def _scan_forward(u, log_decay, h0, states_dtype, n, heads=1):
    """The Triton scan: (states [T, M] in states_dtype, final [BH, M] float32) from contiguous u [T, M] and float32
    log_decay [T] in block order (the chunks of T / n sequences, _first_chunk; heads = 1: [BH, n] order), h0
    [BH, M] float32 or None."""
    T, M = u.shape
    states = torch.empty(T, M, dtype=states_dtype, device=u.device)
    final = torch.empty(T // n, M, dtype=torch.float32, device=u.device)
    _scan_fwd_kernel[(T // n, triton.cdiv(M, SCAN["BLOCK"]))](u, log_decay, u if h0 is None else h0, states, final,
                                                              n, M, heads, HAS_H0=h0 is not None,
                                                              BLOCK=SCAN["BLOCK"], num_warps=SCAN["NUM_WARPS"])
    return states, final


def _scan_backward(states, log_decay, dstates, dfinal, u_dtype, n, heads=1):
    """(d u in u_dtype, d log_decay, d h0 float32) of _scan_forward; dstates and dfinal may be None (zero)."""
    T, M = states.shape
    nblocks = triton.cdiv(M, SCAN["BLOCK"])
    dstates = torch.zeros_like(states) if dstates is None else dstates.contiguous()
    du = torch.empty(T, M, dtype=u_dtype, device=states.device)
    dlog_parts = torch.empty(T, nblocks, dtype=torch.float32, device=states.device)
    dh0 = torch.empty(T // n, M, dtype=torch.float32, device=states.device)
    _scan_bwd_kernel[(T // n, nblocks)](states, log_decay, dstates,
                                        dfinal.float().contiguous() if dfinal is not None else states, du,
                                        dlog_parts, dh0, n, M, heads, nblocks, HAS_DFINAL=dfinal is not None,
                                        BLOCK=SCAN["BLOCK"], num_warps=SCAN["NUM_WARPS"])
    return du, dlog_parts.sum(-1), dh0


class _TritonStateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, log_decay, h0, states_dtype):
        BH, n, M = u.shape
        states, final = _scan_forward(u.view(BH * n, M), log_decay.view(-1), h0, states_dtype, n)
        ctx.save_for_backward(states, log_decay)
        ctx.has_h0 = h0 is not None
        ctx.u_dtype = u.dtype
        return states.view(BH, n, M), final

    @staticmethod
    def backward(ctx, dstates, dfinal):
        states, log_decay = ctx.saved_tensors
        BH, n = log_decay.shape
        du, dlog, dh0 = _scan_backward(states, log_decay.view(-1), None if dstates is None else dstates.reshape(
            BH * n, -1), dfinal, ctx.u_dtype, n)
        return du.view(BH, n, -1), dlog.view(BH, n), dh0 if ctx.has_h0 else None, None


def state_scan(u, log_decay, h0=None, *, states_dtype=None, backend="auto"):
    """M_0 = h0 (or 0), M_{c+1} = e^{log_decay_c} M_c + u_c over the chunk axis, accumulated in float32.

    u: [BH, n, M] (any float dtype); log_decay: [BH, n] (<= 0); h0: [BH, M] or None. Returns states
    [BH, n, M] (the state entering each chunk, in states_dtype, float32 by default) and the final state
    [BH, M] (float32). Float64 inputs stay float64 throughout. Differentiable.
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    if resolve_backend(backend, u) == "torch" or compute == torch.float64:
        h = u.new_zeros(u.shape[0], u.shape[2], dtype=compute) if h0 is None else h0.to(compute)
        states = []
        for c in range(u.shape[1]):
            states.append(h)
            h = torch.exp(log_decay[:, c, None]).to(compute) * h + u[:, c].to(compute)
        states = torch.stack(states, dim=1)
        return states.to(states_dtype or compute), h
    return _TritonStateScan.apply(u.contiguous(), log_decay.float().contiguous(),
                                  None if h0 is None else h0.float().contiguous(), states_dtype or torch.float32)


@triton.jit
def _natural_rows(rows, C, H2):
    """Rows in block order (block t = u H2 + h of C tokens, then the token) -> the same rows of a [U, C, H2, .]
    tensor (a [B, N, H, .] layout): the in-chunk kernel's output, o and d o. H2 = 1: the same rows."""
    t_, token = rows // C, rows % C
    return ((t_ // H2) * C + token) * H2 + t_ % H2


@triton.jit
def _combine_fwd_kernel(INTRA, INTRA_DEN, INTER, INTER_Z, QD, O, DEN, R, dv, C, H2, NORMALIZE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """o = num / den (0 where den = 0) or num, with num = intra + inter * qd and den = intra_den + inter_z * qd,
    for BLOCK_R rows in block order; intra and o in the natural order (_natural_rows)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    natural = _natural_rows(rows, C, H2)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < dv)
    qd = tl.load(QD + rows, mask=rmask, other=0.0)
    num = tl.load(INTRA + natural[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32) + \
        tl.load(INTER + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0) * qd[:, None]
    if NORMALIZE:
        den = tl.load(INTRA_DEN + rows, mask=rmask, other=0.0) + tl.load(INTER_Z + rows, mask=rmask, other=0.0) * qd
        num = tl.where(den[:, None] == 0.0, 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None])
        tl.store(DEN + rows, den, mask=rmask)
    tl.store(O + natural[:, None] * dv + cols[None, :], num.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(DO, O, DEN, INTER, INTER_Z, QD, DINTRA, DINTRA_DEN, DINTER, DINTER_Z, DQD, R, dv, C, H2,
                        NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """d num and d den from d o, then d intra = d num, d inter = d num * qd (and the same for the dens),
    d qd = <d num, inter> + d den * inter_z. d o, o and d intra in the natural order, as the forward's."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    natural = _natural_rows(rows, C, H2)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < dv)
    do = tl.load(DO + natural[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    qd = tl.load(QD + rows, mask=rmask, other=0.0)
    inter = tl.load(INTER + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0)
    dnum = do
    if NORMALIZE:  # o = num / den: d num = d o / den, d den = -<d o, o> / den (both 0 where den = 0)
        den = tl.load(DEN + rows, mask=rmask, other=0.0)
        o = tl.load(O + natural[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        dnum = do * inv[:, None]
        dden = -tl.sum(do * o, axis=1) * inv
        tl.store(DINTRA_DEN + rows, dden, mask=rmask)
        tl.store(DINTER_Z + rows, dden * qd, mask=rmask)
    tl.store(DINTRA + natural[:, None] * dv + cols[None, :], dnum.to(DINTRA.dtype.element_ty), mask=mask)
    tl.store(DINTER + rows[:, None] * dv + cols[None, :], (dnum * qd[:, None]).to(DINTER.dtype.element_ty), mask=mask)
    dqd = tl.sum(dnum * inter, axis=1)
    if NORMALIZE:
        dqd += dden * tl.load(INTER_Z + rows, mask=rmask, other=0.0)
    tl.store(DQD + rows, dqd, mask=rmask)


def _combine_forward(intra, intra_den, inter, inter_z, qd, normalize, out_dtype, C=1, heads=1):
    """The fused combine's kernel on contiguous [R, dv] / [R] tensors: (o in out_dtype, den float32, empty without
    normalisation). heads > 1: intra and o hold their rows in the natural order of blocks of C tokens and heads
    (_natural_rows), the others in block order."""
    R, dv = intra.shape
    o = torch.empty(R, dv, dtype=out_dtype, device=intra.device)
    den = torch.empty(R if normalize else 0, dtype=torch.float32, device=intra.device)
    _combine_fwd_kernel[(triton.cdiv(R, COMBINE_ROWS),)](intra, intra_den if normalize else qd, inter,
                                                        inter_z if normalize else qd, qd, o, den, R, dv, C, heads,
                                                        NORMALIZE=normalize, BLOCK_R=COMBINE_ROWS,
                                                        BLOCK_E=triton.next_power_of_2(dv))
    return o, den


def _combine_backward(do, o, den, inter, inter_z, qd, normalize, dintra_dtype, dinter_dtype, C=1, heads=1):
    """(d intra, d intra_den, d inter, d inter_z, d qd) of _combine_forward, d intra and d inter rounded to the given
    dtypes (the dens None without normalisation); d o and d intra in o's row order."""
    R, dv = o.shape
    dintra = torch.empty(R, dv, dtype=dintra_dtype, device=o.device)
    dinter = torch.empty(R, dv, dtype=dinter_dtype, device=o.device)
    dqd = torch.empty_like(qd)
    dintra_den, dinter_z = (torch.empty_like(qd), torch.empty_like(qd)) if normalize else (None, None)
    _combine_bwd_kernel[(triton.cdiv(R, COMBINE_ROWS),)](do.contiguous(), o, den, inter,
                                                        inter_z if normalize else qd, qd, dintra,
                                                        dqd if dintra_den is None else dintra_den, dinter,
                                                        dqd if dinter_z is None else dinter_z, dqd, R, dv, C,
                                                        heads, NORMALIZE=normalize, BLOCK_R=COMBINE_ROWS,
                                                        BLOCK_E=triton.next_power_of_2(dv))
    return dintra, dintra_den, dinter, dinter_z, dqd


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, intra, intra_den, inter, inter_z, qd, normalize, out_dtype):
        o, den = _combine_forward(intra, intra_den, inter, inter_z, qd, normalize, out_dtype)
        ctx.save_for_backward(o, den, inter, inter_z, qd)
        ctx.normalize, ctx.intra_dtype = normalize, intra.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        o, den, inter, inter_z, qd = ctx.saved_tensors
        return *_combine_backward(do, o, den, inter, inter_z, qd, ctx.normalize, ctx.intra_dtype, inter.dtype), \
            None, None


def combine(intra, intra_den, inter, inter_z, query_decay, *, normalize, fused, out_dtype):
    """o = num / den (normalize) or num in out_dtype, num = intra + inter * query_decay, den = intra_den +
    inter_z * query_decay: intra, inter [R, dv]; intra_den, inter_z (None without normalisation) and
    query_decay [R], in the compute dtype (intra in q's without normalisation); o [R, dv]. fused: one Triton
    kernel each way (no float32 [R, dv + 1] temporaries); otherwise PyTorch."""
    if fused:
        return _Combine.apply(intra.contiguous(), None if intra_den is None else intra_den.contiguous(),
                              inter.contiguous(), None if inter_z is None else inter_z.contiguous(),
                              query_decay.contiguous(), normalize, out_dtype)
    qd = query_decay[:, None]
    num = torch.addcmul(intra, inter, qd)
    if not normalize:
        return num.to(out_dtype)
    den = torch.addcmul(intra_den[:, None], inter_z[:, None], qd)
    return normalized(torch.cat([num, den], dim=1), True).to(out_dtype)


def _form_states(k, v, w, L, h0, *, power, fused, states_dtype, backend, n=None, heads=1):
    """The states S entering each chunk and the final one [BH, D dv] (float32): chunk sums U = phi(k)^T (w v), then
    the scan. fused: the kernels, no autograd (w, L [T] float32 in block order, h0 float32; k, v blocks as
    features.py takes them, n chunks of `heads` heads per sequence), states [T, D dv] in block order; otherwise
    differentiable (PyTorch products, and the scan of `backend`; L [BH, n]), states [BH, n, D dv]."""
    if fused:
        return _scan_forward(outer(k, v, w).view(w.shape[0], -1), L, h0, states_dtype, n, heads)
    BH, n = L.shape
    u = feature_outer(k, v, w, power=power)
    return state_scan(u.reshape(BH, n, -1), L, h0, states_dtype=states_dtype, backend=backend)


def _state_part(q, k, v, w, L, h0, h0_z, *, power, need_z, read_z, states_dtype, backend):
    """(inter, inter_z, final S, final z) through autograd: the states, the queries' reads phi(q) S and, read_z,
    phi(q) . z; z formed only with need_z. Blocks q, k [T, C, d], v [T, C, dv], key decays w [T, C], chunk
    decays L [BH, n]."""
    T = q.shape[0]
    dv = v.shape[-1]
    BH, n = L.shape
    states, final = _form_states(k, v, w, L, h0, power=power, fused=False, states_dtype=states_dtype,
                                 backend=backend)
    inter = feature_apply(q, states.reshape(T, -1, dv), power=power)
    inter_z = final_z = None
    if need_z:
        u_z = feature_weighted_sum(k, w, power=power)
        states_z, final_z = state_scan(u_z.reshape(BH, n, -1), L, h0_z, backend=backend)
        if read_z:
            inter_z = feature_dot(q, states_z.reshape(T, -1), power=power)
    return inter, inter_z, final, final_z


def _fused_state_forward(q, k, v, w, L, h0, h0_z, need_z, read_z, n, heads):
    """_state_part's forward for power 2 on the fused feature kernels (features.py), no autograd: (inter, inter_z,
    final S, final z, per-chunk states S in q's dtype, per-chunk z float32). q, k, v blocks [U, C, heads, .]
    (n chunks per sequence); w, L, h0, h0_z float32; inter [T, C, dv], inter_z [T, C] and the states in block
    order."""
    T = w.shape[0]
    dv = v.shape[-1]
    states, final = _form_states(k, v, w, L, h0, power="2", fused=True, states_dtype=q.dtype, backend="triton", n=n,
                                 heads=heads)
    inter = apply(q, states.view(T, -1, dv), torch.float32)
    inter_z = final_z = states_z = None
    if need_z:
        states_z, final_z = _scan_forward(gram(k, w), L, h0_z, torch.float32, n, heads)
        if read_z:
            inter_z = quad(q, states_z)
    return inter, inter_z, final, final_z, states, states_z


def _fused_state_backward(q, k, v, w, L, h0, states, states_z, dinter, dinter_z, dfinal, dfinal_z, n, heads,
                          grads, more_dq=None, more_dk=None, more_dv=None):
    """(d w, d L, d h0, d h0_z) of _fused_state_forward from d inter (in q's dtype: the products read it rounded,
    as the forward's operands), d inter_z, d final, d final_z (each None when it does not reach the loss; d inter
    None: q gets none); d q, d k, d v are written into grads (blocks as q, k, v; d q's None when d inter is).
    states None: formed again here. Each of d q, d k, d v is the float32 sum of its kernels' terms and of more_dq,
    more_dk, more_dv (the in-chunk term's, when given) rounded once."""
    T = w.shape[0]
    dv = v.shape[-1]
    out_dq, out_dk, out_dv = grads
    if states is None:
        states, _ = _form_states(k, v, w, L, h0, power="2", fused=True, states_dtype=q.dtype, backend="triton", n=n,
                                 heads=heads)
    dstates = None
    if dinter is not None:
        dq_z = None if dinter_z is None else quad(q, states_z, dinter_z)
        grad(q, states.view(T, -1, dv), dinter, adds=(dq_z, more_dq), out=out_dq)
        dstates = outer(q, dinter).view(T, -1)
    du, dL, dh0 = _scan_backward(states, L, dstates, dfinal, q.dtype, n, heads)
    du = du.view(T, -1, dv)
    _, dw = apply(k, du, v.dtype, w, v, add=more_dv, out=out_dv)
    dk_z = dh0_z = None
    if states_z is not None:
        dstates_z = None if dinter_z is None else gram(q, dinter_z)
        du_z, dL_z, dh0_z = _scan_backward(states_z, L, dstates_z, dfinal_z, torch.float32, n, heads)
        dk_z, dw_z = quad(k, du_z, w, value=True)
        dw, dL = dw + dw_z, dL + dL_z
    grad(k, du, v, w, adds=(dk_z, more_dk), out=out_dk)
    return dw, dL, dh0, dh0_z


class _FusedChunkCore(torch.autograd.Function):
    """The chunked form's core for power 2 on the GPU kernels as one autograd function, backward written out: the
    chunks' decays (_decay_fwd_kernel), the in-chunk quadratic kernel (unnormalised, every chunk a sequence; its
    sums in float32 when normalising), the state part (_fused_state_forward) and the combine kernel. In the
    backward pass the combine writes d intra and d inter rounded to q's dtype once, as the kernels read them; the
    in-chunk kernel's d q, d k, d v join the state part's inside its kernels (one rounding each); one kernel
    gathers every decay's gradient into d g. Separate autograd functions cast float32 gradients, added bf16 ones
    and ran some thirty small float64 ops on the decays in extra passes. recompute: keep no per-chunk states S
    (~8x the values' size in bf16) for the backward but form them again there (outer product and scan), what
    activation checkpointing needs.
    q, k [U, C, heads, d], v [U, C, heads, dv], g [U, C, heads] or None: blocks (features.py) of n chunks per
    sequence, block t = u heads + h, any strides but the columns' (views of a [B, N, H, .] layout with
    heads = H, U = B n, or of [B, H, N, .] with heads = 1, U = B H n); o and d q, d k, d v are contiguous
    [U, C, heads, .] (the same layout, no transposes); h0, h0_z float32. qkv: None, or the [U, C, 3, heads, d]
    tensor whose thirds q, k, v are (_joint_projection; then given without autograd history): its gradient is
    written as one tensor, where three would be concatenated by autograd (a copy of the projection's size)."""

    @staticmethod
    def forward(ctx, q, k, v, qkv, g, h0, h0_z, n, scale, normalize, need_z, recompute):
        U, C, heads, _ = q.shape
        ctx.joint_shape = None if qkv is None else qkv.shape
        dv = v.shape[-1]
        sq_scale = scale * scale
        w, L, qd = _decays(torch.zeros(U, C, heads, dtype=torch.float32, device=q.device) if g is None else g,
                           sq_scale)
        # the in-chunk kernel on [U, heads, C, .] views: each chunk a sequence, its outputs [U, C, heads, .]
        intra, intra_den, att_saved, ctx.att_info = attention_forward(
            *(t.transpose(1, 2) for t in (q, k, v)), None if g is None else g.transpose(1, 2), "2", False, scale,
            True, torch.float32 if normalize else q.dtype)
        inter, inter_z, final, final_z, states, states_z = _fused_state_forward(q, k, v, w, L, h0, h0_z, need_z,
                                                                                 normalize, n, heads)
        o, den = _combine_forward(intra.transpose(1, 2).reshape(-1, dv), intra_den.view(-1), inter.view(-1, dv),
                                  inter_z, qd.view(-1), normalize, q.dtype, C, heads)
        ctx.save_for_backward(*att_saved, g, w, L, h0, None if recompute else states, states_z, o, den, inter,
                              inter_z, qd)
        ctx.normalize, ctx.sq_scale, ctx.n = normalize, sq_scale, n
        ctx.has_h0, ctx.has_h0_z = h0 is not None, h0_z is not None
        ctx.set_materialize_grads(False)
        return o.view(U, C, heads, dv), final, final_z

    @staticmethod
    def backward(ctx, do, dfinal, dfinal_z):
        saved = ctx.saved_tensors
        att_saved, (g, w, L, h0, states, states_z, o, den, inter, inter_z, qd) = saved[:-11], saved[-11:]
        q, k, v = (t.transpose(1, 2) for t in att_saved[:3])  # the blocks the forward took
        U, C, heads, dv = v.shape
        n = ctx.n
        dinter = dinter_z = dqd = da = None
        more = ()
        if ctx.joint_shape is None:
            grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        else:
            dqkv = torch.empty(ctx.joint_shape, dtype=q.dtype, device=q.device)
            grads = list(dqkv.unbind(2))
        if do is not None:  # None when only the final state reaches the loss: then q gets no gradient
            dintra, dintra_den, dinter, dinter_z, dqd = _combine_backward(
                do.contiguous().view(-1, dv), o, den, inter, inter_z, qd.view(-1), ctx.normalize, q.dtype, q.dtype,
                C, heads)
            *more, da = attention_backward(att_saved, ctx.att_info, dintra.view(U, C, heads, dv).transpose(1, 2),
                                           None if dintra_den is None else dintra_den.view(U, heads, C))
            more = [x.transpose(1, 2) for x in more]  # [U, C, heads, .], as q, k, v
            dinter = dinter.view(-1, C, dv)
            dinter_z = None if dinter_z is None else dinter_z.view(-1, C)
        else:
            if ctx.joint_shape is not None:
                grads[0].zero_()
            grads[0] = None
        dw, dL, dh0, dh0_z = _fused_state_backward(q, k, v, w, L, h0, states, states_z, dinter, dinter_z, dfinal,
                                                   dfinal_z, n, heads, grads, *more)
        dg = None
        if g is not None:
            dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            _decay_bwd_kernel[(U * heads,)](g, *_strides(g), heads, dw, dL, qd if dqd is None else dqd,
                                            *(da or (dw, dw)), dg, *_strides(dg), C, ctx.sq_scale,
                                            HAS_DQD=dqd is not None,
                                            HAS_DA=da is not None, BLOCK_C=triton.next_power_of_2(C))
        grads = (*grads, None) if ctx.joint_shape is None else (None, None, None, dqkv)
        return (*grads, dg, dh0 if ctx.has_h0 else None, dh0_z if ctx.has_h0_z else None, None, None, None, None,
                None)


def chunk_power_attention(q, k, v, g, *, power, scale, normalize, initial_state, output_final_state, chunk_size,
                          recompute_states=False, backend="auto", layout="bhnd"):
    """o ([B, H, N, dv], q's dtype) and the final state ([B, H, D, dv + 1], float32 or float64; None unless
    output_final_state).

    q, k: [B, H, N, d]; v: [B, H, N, dv]; g: [B, H, N] or None; initial_state: [B, H, D, dv + 1] or None.
    Without gradients (a prefill) a long input runs in segments of whole chunks with the state passed on
    (exact: a split anywhere gives the outputs of one call), so that the per-chunk states held at once stay
    within SEGMENT_TOKENS token-heads (32 prompts of 128K tokens would otherwise need 140 GB of them and their
    chunk sums, for d = dv = 64 in bf16). recompute_states: keep no per-chunk states for the backward pass but
    form them again there (_FusedChunkCore; torch.utils.checkpoint of the state part elsewhere).
    layout "bnhd": q, k, v, g are the [B, H, N, .] views of [B, N, H, .] tensors (kernel.reference.bhnd_views),
    and o is returned so: the fused kernels (power 2 on the GPU) read and write that layout with its strides, no
    transposed copies (elsewhere the PyTorch path copies).
    """
    B, H, N = q.shape[:3]
    C = max(1, min(chunk_size, N))
    segment = max(1, SEGMENT_TOKENS // (B * H * C)) * C
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, initial_state))
    if needs_grad or N <= segment:
        return _chunk_power_attention(q, k, v, g, power=power, scale=scale, normalize=normalize,
                                      initial_state=initial_state, output_final_state=output_final_state,
                                      chunk_size=C, recompute_states=recompute_states, backend=backend,
                                      layout=layout)
    outs, state = [], initial_state
    for s in range(0, N, segment):
        piece = [None if t is None else t[:, :, s:s + segment] for t in (q, k, v, g)]
        o, state = _chunk_power_attention(*piece, power=power, scale=scale, normalize=normalize, initial_state=state,
                                          output_final_state=True, chunk_size=C, recompute_states=False,
                                          backend=backend, layout=layout)
        outs.append(o)
    return torch.cat(outs, dim=2), state if output_final_state else None


def _chunk_power_attention(q, k, v, g, *, power, scale, normalize, initial_state, output_final_state, chunk_size,
                           recompute_states, backend, layout):
    B, H, N, d = q.shape
    dv = v.shape[-1]
    C = max(1, min(chunk_size, N))
    pad = (-N) % C
    n = (N + pad) // C
    T = B * H * n
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    fused = resolve_backend(backend, q) == "triton" and compute == torch.float32
    if fused and power == "2" and T > MAX_GRID_HEADS:  # the in-chunk kernel's grid: every chunk is a sequence
        return _in_pieces(q, k, v, g, initial_state, n, power=power, scale=scale, normalize=normalize,
                          output_final_state=output_final_state, chunk_size=C, recompute_states=recompute_states,
                          backend=backend, layout="bhnd")
    D = state_size(d, power)
    h0 = None if initial_state is None else initial_state[..., :dv].reshape(B * H, D * dv)
    h0_z = None if initial_state is None else initial_state[..., dv].reshape(B * H, D)
    # z only where it is read: by the queries when normalising, in the final state when that is returned
    need_z = normalize or output_final_state
    # padded keys are 0 (no weight, no state), padded decays 0 (no decay); padded queries are cut off
    if fused and power == "2":
        heads = H if layout == "bnhd" else 1
        blocks = _fused_blocks(q, k, v, g, C, pad, layout)
        qkv = _joint_projection(q, k, v, C) if layout == "bnhd" and not pad else None
        if qkv is not None:
            blocks = (*(t.detach() for t in qkv.unbind(2)), blocks[3])
        o, final, final_z = _FusedChunkCore.apply(
            *blocks[:3], qkv, blocks[3], *(None if t is None else t.float().contiguous() for t in (h0, h0_z)), n,
            scale, normalize, need_z, recompute_states)
        o = o.view(B, N + pad, H, dv).transpose(1, 2) if heads > 1 else o.view(B, H, N + pad, dv)
        return _finish(o, final, final_z, B, H, N, D, dv, output_final_state)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # once: views of the [B, N, H, d] layout would be
    # copied by each reshape below
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    blocks = q.reshape(T, C, d), k.reshape(T, C, d), v.reshape(T, C, dv)
    gl = torch.zeros(B, H, n, C, dtype=torch.float64, device=q.device) if g is None else \
        F.pad(g, (0, pad)).to(torch.float64).reshape(B, H, n, C)

    # across chunks: the state M = [S, z] in its two parts (module docstring). The queries enter unscaled:
    # phi(scale q) = scale^p phi(q) joins e^b below.
    b = torch.cumsum(gl, dim=-1)  # in-chunk cumulative decay, float64
    L = b[..., -1].reshape(B * H, n)
    key_decay = torch.exp(L.reshape(B, H, n, 1) - b).reshape(T, C)
    query_decay = (torch.exp(b) * scale ** int(power)).to(compute).reshape(-1)
    # inside the chunks: the quadratic kernel, unnormalised, every chunk a sequence of its own: the sums num and,
    # normalising, den (the kernel's own row sums). Normalising, they stay in float32: rounded to bf16 before the
    # division by the whole context's den, they doubled the bf16 error of dq and dk at weak decay (bench/NOTES.md).
    intra = attention(*(t.reshape(T, 1, C, -1) for t in blocks), None if g is None else gl.reshape(T, 1, C),
                      power=power, normalize=False, scale=scale, backend=backend,
                      out_dtype=compute if normalize else q.dtype, return_den=normalize)
    intra, intra_den = intra if normalize else (intra, None)
    part = functools.partial(_state_part, power=power, need_z=need_z, read_z=normalize, states_dtype=q.dtype,
                             backend=backend)
    args = (*blocks, key_decay, L, h0, h0_z)
    recompute = recompute_states and torch.is_grad_enabled()
    inter, inter_z, final, final_z = checkpoint(part, *args, use_reentrant=False) if recompute else part(*args)
    o = combine(intra.reshape(-1, dv), None if intra_den is None else intra_den.reshape(-1),
                inter.reshape(-1, dv).to(compute), None if inter_z is None else inter_z.reshape(-1), query_decay,
                normalize=normalize, fused=fused, out_dtype=q.dtype)
    return _finish(o.reshape(B, H, -1, dv), final, final_z, B, H, N, D, dv, output_final_state)


def _fused_blocks(q, k, v, g, C, pad, layout):
    """q, k, v, g ([B, H, N, .] views; of [B, N, H, .] tensors for layout "bnhd") as _FusedChunkCore's blocks
    [U, C, heads, .], padded with pad zero tokens: views where the strides allow (a [B, N, H, .] view of a wider
    projection, as the model's q, k, v, included), padded copies otherwise."""
    if layout == "bnhd":
        q, k, v, g = bhnd_views("bnhd", q, k, v, g)  # [B, N, H, .]
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
            g = None if g is None else F.pad(g, (0, 0, 0, pad))
        return tuple(None if t is None else t.reshape(-1, C, *t.shape[2:]) for t in (q, k, v, g))
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = None if g is None else F.pad(g, (0, pad))
    return tuple(None if t is None else t.reshape(-1, C, 1, *t.shape[3:]) for t in (q, k, v, g))


def _joint_projection(q, k, v, C):
    """The one [B, N, 3 H d] tensor whose thirds q, k, v ([B, H, N, d] views of [B, N, H, d]) are, as blocks
    [U, C, 3, H, d] (U = B N / C; the model's projection split in three), or None when they are not (other
    tensors, strides or offsets)."""
    base = q._base
    B, H, N, d = q.shape
    if base is None or k._base is not base or v._base is not base or v.shape != q.shape or \
            not base.is_contiguous() or tuple(base.shape) != (B, N, 3 * H * d):
        return None
    width = H * d
    for i, t in enumerate((q, k, v)):
        if t.stride() != (N * 3 * width, d, 3 * width, 1) or t.storage_offset() != base.storage_offset() + i * width:
            return None
    return base.view(B * N // C, C, 3, H, d)


def _finish(o, final, final_z, B, H, N, D, dv, output_final_state):
    """o [B, H, N, dv] from the padded [B, H, N + pad, dv], and the final state [B, H, D, dv + 1] or None."""
    if output_final_state:
        final = torch.cat([final.reshape(B, H, D, dv), final_z.reshape(B, H, D, 1)], dim=-1)
    return o[:, :, :N], final if output_final_state else None


def _in_pieces(q, k, v, g, initial_state, n, **kwargs):
    """_chunk_power_attention over slices of the sequences (batch x heads, each its own state) of at most
    MAX_GRID_HEADS chunks in all: the outputs and final states of one call."""
    B, H, N = q.shape[:3]
    per_call = MAX_GRID_HEADS // n
    if per_call == 0:
        raise ValueError(f"the chunked form on the GPU takes at most {MAX_GRID_HEADS} chunks per sequence, got {n} "
                         f"(N = {N}); use a larger chunk_size")
    flat = [None if t is None else t.reshape(B * H, 1, *t.shape[2:]) for t in (q, k, v, g, initial_state)]
    outs, finals = [], []
    for s in range(0, B * H, per_call):
        o, final = _chunk_power_attention(*(None if t is None else t[s:s + per_call] for t in flat[:4]),
                                          initial_state=None if flat[4] is None else flat[4][s:s + per_call],
                                          **kwargs)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs).reshape(B, H, N, -1)
    return o, None if finals[0] is None else torch.cat(finals).reshape(B, H, *finals[0].shape[2:])
