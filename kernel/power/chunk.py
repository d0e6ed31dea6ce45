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
elementwise ops on the decays together.
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
from ..triton_attention import MAX_GRID_HEADS, attention_backward, attention_forward
from .features import apply, feature_apply, feature_dot, feature_outer, feature_weighted_sum, grad, gram, outer, quad
from .naive import normalized, state_size

# The scans' launch constants: state entries per program and warps (bench/kernel_sweep.py --kernels scan)
SCAN = dict(BLOCK=1024, NUM_WARPS=4)
COMBINE_ROWS = 32
SEGMENT_TOKENS = 1 << 23  # token-heads per piece of a long input without gradients: ~9 GB of bf16 states


@triton.jit
def _decay_fwd_kernel(G, W, L, QD, C, sq_scale, BLOCK_C: tl.constexpr):
    """One chunk's decays from its log decays g: b = cumsum g (float64), L = b_last, the keys' e^{L - b} and the
    queries' sq_scale e^b (float32)."""
    t_ = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    b = tl.cumsum(tl.load(G + t_ * C + c, mask=mask, other=0.0).to(tl.float64), 0)
    last = tl.sum(tl.where(c == C - 1, b, 0.0), 0)  # b_last exactly
    tl.store(W + t_ * C + c, tl.exp(last - b).to(tl.float32), mask=mask)
    tl.store(QD + t_ * C + c, (tl.exp(b) * sq_scale).to(tl.float32), mask=mask)
    tl.store(L + t_, last.to(tl.float32))


@triton.jit
def _decay_bwd_kernel(G, DW, DL, DQD, DA_Q, DA_K, DG, C, sq_scale, HAS_DQD: tl.constexpr, HAS_DA: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """d g of one chunk from the gradients of _decay_fwd_kernel's outputs (d qd with HAS_DQD) and, HAS_DA, of the
    in-chunk kernel's cumulative decay, which is b (its two terms): d b = d a - e^{L - b} d w + sq_scale e^b d qd,
    plus d L + sum_j e^{L - b_j} d w_j at the last token; d g is the reverse cumulative sum of d b (float64)."""
    t_ = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    b = tl.cumsum(tl.load(G + t_ * C + c, mask=mask, other=0.0).to(tl.float64), 0)
    last = tl.sum(tl.where(c == C - 1, b, 0.0), 0)
    dw = tl.exp(last - b) * tl.load(DW + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    db = -dw
    if HAS_DQD:
        db += tl.exp(b) * sq_scale * tl.load(DQD + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    if HAS_DA:
        db += tl.load(DA_Q + t_ * C + c, mask=mask, other=0.0).to(tl.float64) + \
            tl.load(DA_K + t_ * C + c, mask=mask, other=0.0).to(tl.float64)
    db += tl.where(c == C - 1, tl.load(DL + t_).to(tl.float64) + tl.sum(dw, 0), 0.0)
    tl.store(DG + t_ * C + c, tl.cumsum(db, 0, reverse=True).to(DG.dtype.element_ty), mask=mask)


def _decays(g, sq_scale):
    """(keys' decays w [T, C], chunk decays L [T], queries' decays qd [T, C]), float32, of the chunks' log decays
    g [T, C] (contiguous, any float dtype), by _decay_fwd_kernel."""
    T, C = g.shape
    w, qd = torch.empty(T, C, dtype=torch.float32, device=g.device), torch.empty(T, C, dtype=torch.float32,
                                                                                device=g.device)
    L = torch.empty(T, dtype=torch.float32, device=g.device)
    _decay_fwd_kernel[(T,)](g, w, L, qd, C, sq_scale, BLOCK_C=triton.next_power_of_2(C))
    return w, L, qd


@triton.jit
def _load_or_zeros(PTR, offs, mask, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    if PRESENT:
        return tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK], tl.float32)


@triton.jit
def _scan_fwd_kernel(U, LOGD, H0, STATES, FINAL, n, M, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    """STATES[c] = state entering chunk c; FINAL = state after the last chunk. One program per (head, block).
    Each step loads the next chunk's sums and decay before it updates the state, so the update never waits on a
    load issued in the same step."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    h = _load_or_zeros(H0 + bh * M, offs, mask, HAS_H0, BLOCK)
    u = tl.load(U + bh * n * M + offs, mask=mask, other=0.0).to(tl.float32)
    log_decay = tl.load(LOGD + bh * n)
    for c in range(n):
        row = (bh * n + c) * M
        tl.store(STATES + row + offs, h.to(STATES.dtype.element_ty), mask=mask)
        more = c + 1 < n
        u_next = tl.load(U + row + M + offs, mask=mask & more, other=0.0).to(tl.float32)
        log_decay_next = tl.load(LOGD + bh * n + c + 1, mask=more, other=0.0)
        h = tl.exp(log_decay) * h + u
        u, log_decay = u_next, log_decay_next
    tl.store(FINAL + bh * M + offs, h, mask=mask)


@triton.jit
def _scan_bwd_kernel(STATES, LOGD, DSTATES, DFINAL, DU, DLOGD, DH0, n, M, NBLOCKS,
                     HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse pass: dU_c = dM_{c+1}; dL_c = e^{L_c} <dM_{c+1}, M_c> (one partial sum per block). Each step loads
    the previous chunk's rows before it uses the current ones (as the forward)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    dh = _load_or_zeros(DFINAL + bh * M, offs, mask, HAS_DFINAL, BLOCK)
    last = (bh * n + n - 1) * M
    h = tl.load(STATES + last + offs, mask=mask, other=0.0).to(tl.float32)
    dstate = tl.load(DSTATES + last + offs, mask=mask, other=0.0).to(tl.float32)
    log_decay = tl.load(LOGD + bh * n + n - 1)
    for i in range(n):
        c = n - 1 - i
        row = (bh * n + c) * M
        more = c > 0
        h_prev = tl.load(STATES + row - M + offs, mask=mask & more, other=0.0).to(tl.float32)
        dstate_prev = tl.load(DSTATES + row - M + offs, mask=mask & more, other=0.0).to(tl.float32)
        log_decay_prev = tl.load(LOGD + bh * n + c - 1, mask=more, other=0.0)
        tl.store(DU + row + offs, dh.to(DU.dtype.element_ty), mask=mask)
        decay = tl.exp(log_decay)
        tl.store(DLOGD + (bh * n + c) * NBLOCKS + blk, decay * tl.sum(dh * h, axis=0))
        dh = decay * dh + dstate
        h, dstate, log_decay = h_prev, dstate_prev, log_decay_prev
    tl.store(DH0 + bh * M + offs, dh, mask=mask)


def _scan_forward(u, log_decay, h0, states_dtype):
    """The Triton scan: (states [BH, n, M] in states_dtype, final [BH, M] float32) from contiguous u [BH, n, M],
    float32 log_decay [BH, n] and h0 [BH, M] float32 or None."""
    BH, n, M = u.shape
    states = torch.empty(BH, n, M, dtype=states_dtype, device=u.device)
    final = torch.empty(BH, M, dtype=torch.float32, device=u.device)
    _scan_fwd_kernel[(BH, triton.cdiv(M, SCAN["BLOCK"]))](u, log_decay, u if h0 is None else h0, states, final, n,
                                                          M, HAS_H0=h0 is not None, BLOCK=SCAN["BLOCK"],
                                                          num_warps=SCAN["NUM_WARPS"])
    return states, final


def _scan_backward(states, log_decay, dstates, dfinal, u_dtype):
    """(d u in u_dtype, d log_decay, d h0 float32) of _scan_forward; dstates and dfinal may be None (zero)."""
    BH, n, M = states.shape
    nblocks = triton.cdiv(M, SCAN["BLOCK"])
    dstates = torch.zeros_like(states) if dstates is None else dstates.contiguous()
    du = torch.empty(BH, n, M, dtype=u_dtype, device=states.device)
    dlog_parts = torch.empty(BH, n, nblocks, dtype=torch.float32, device=states.device)
    dh0 = torch.empty(BH, M, dtype=torch.float32, device=states.device)
    _scan_bwd_kernel[(BH, nblocks)](states, log_decay, dstates,
                                    dfinal.float().contiguous() if dfinal is not None else states, du, dlog_parts,
                                    dh0, n, M, nblocks, HAS_DFINAL=dfinal is not None, BLOCK=SCAN["BLOCK"],
                                    num_warps=SCAN["NUM_WARPS"])
    return du, dlog_parts.sum(-1), dh0


class _TritonStateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, log_decay, h0, states_dtype):
        states, final = _scan_forward(u, log_decay, h0, states_dtype)
        ctx.save_for_backward(states, log_decay)
        ctx.has_h0 = h0 is not None
        ctx.u_dtype = u.dtype
        return states, final

    @staticmethod
    def backward(ctx, dstates, dfinal):
        states, log_decay = ctx.saved_tensors
        du, dlog, dh0 = _scan_backward(states, log_decay, dstates, dfinal, ctx.u_dtype)
        return du, dlog, dh0 if ctx.has_h0 else None, None


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
def _combine_fwd_kernel(INTRA, INTRA_DEN, INTER, INTER_Z, QD, O, DEN, R, dv, NORMALIZE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """o = num / den (0 where den = 0) or num, with num = intra + inter * qd and den = intra_den + inter_z * qd,
    for BLOCK_R rows."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < dv)
    qd = tl.load(QD + rows, mask=rmask, other=0.0)
    num = tl.load(INTRA + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32) + \
        tl.load(INTER + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0) * qd[:, None]
    if NORMALIZE:
        den = tl.load(INTRA_DEN + rows, mask=rmask, other=0.0) + tl.load(INTER_Z + rows, mask=rmask, other=0.0) * qd
        num = tl.where(den[:, None] == 0.0, 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None])
        tl.store(DEN + rows, den, mask=rmask)
    tl.store(O + rows[:, None] * dv + cols[None, :], num.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(DO, O, DEN, INTER, INTER_Z, QD, DINTRA, DINTRA_DEN, DINTER, DINTER_Z, DQD, R, dv,
                        NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """d num and d den from d o, then d intra = d num, d inter = d num * qd (and the same for the dens),
    d qd = <d num, inter> + d den * inter_z."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < dv)
    do = tl.load(DO + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    qd = tl.load(QD + rows, mask=rmask, other=0.0)
    inter = tl.load(INTER + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0)
    dnum = do
    if NORMALIZE:  # o = num / den: d num = d o / den, d den = -<d o, o> / den (both 0 where den = 0)
        den = tl.load(DEN + rows, mask=rmask, other=0.0)
        o = tl.load(O + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        dnum = do * inv[:, None]
        dden = -tl.sum(do * o, axis=1) * inv
        tl.store(DINTRA_DEN + rows, dden, mask=rmask)
        tl.store(DINTER_Z + rows, dden * qd, mask=rmask)
    tl.store(DINTRA + rows[:, None] * dv + cols[None, :], dnum.to(DINTRA.dtype.element_ty), mask=mask)
    tl.store(DINTER + rows[:, None] * dv + cols[None, :], (dnum * qd[:, None]).to(DINTER.dtype.element_ty), mask=mask)
    dqd = tl.sum(dnum * inter, axis=1)
    if NORMALIZE:
        dqd += dden * tl.load(INTER_Z + rows, mask=rmask, other=0.0)
    tl.store(DQD + rows, dqd, mask=rmask)


def _combine_forward(intra, intra_den, inter, inter_z, qd, normalize, out_dtype):
    """The fused combine's kernel on contiguous [R, dv] / [R] tensors: (o in out_dtype, den float32, empty without
    normalisation)."""
    R, dv = intra.shape
    o = torch.empty(R, dv, dtype=out_dtype, device=intra.device)
    den = torch.empty(R if normalize else 0, dtype=torch.float32, device=intra.device)
    _combine_fwd_kernel[(triton.cdiv(R, COMBINE_ROWS),)](intra, intra_den if normalize else qd, inter,
                                                        inter_z if normalize else qd, qd, o, den, R, dv,
                                                        NORMALIZE=normalize, BLOCK_R=COMBINE_ROWS,
                                                        BLOCK_E=triton.next_power_of_2(dv))
    return o, den


def _combine_backward(do, o, den, inter, inter_z, qd, normalize, dintra_dtype, dinter_dtype):
    """(d intra, d intra_den, d inter, d inter_z, d qd) of _combine_forward, d intra and d inter rounded to the given
    dtypes (the dens None without normalisation)."""
    R, dv = o.shape
    dintra = torch.empty(R, dv, dtype=dintra_dtype, device=o.device)
    dinter = torch.empty(R, dv, dtype=dinter_dtype, device=o.device)
    dqd = torch.empty_like(qd)
    dintra_den, dinter_z = (torch.empty_like(qd), torch.empty_like(qd)) if normalize else (None, None)
    _combine_bwd_kernel[(triton.cdiv(R, COMBINE_ROWS),)](do.contiguous(), o, den, inter,
                                                        inter_z if normalize else qd, qd, dintra,
                                                        dqd if dintra_den is None else dintra_den, dinter,
                                                        dqd if dinter_z is None else dinter_z, dqd, R, dv,
                                                        NORMALIZE=normalize, BLOCK_R=COMBINE_ROWS,
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


def _form_states(k, v, w, L, h0, *, power, fused, states_dtype, backend):
    """The states S entering each chunk [BH, n, D dv] (states_dtype) and the final one [BH, D dv] (float32):
    chunk sums U = phi(k)^T (w v), then the scan. fused: the kernels, no autograd (w, L, h0 float32); otherwise
    differentiable (PyTorch products, and the scan of `backend`)."""
    BH, n = L.shape
    if fused:
        return _scan_forward(outer(k, v, w).view(BH, n, -1), L, h0, states_dtype)
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


def _fused_state_forward(q, k, v, w, L, h0, h0_z, need_z, read_z):
    """_state_part's forward for power 2 on the fused feature kernels (features.py), no autograd: (inter, inter_z,
    final S, final z, per-chunk states S in q's dtype, per-chunk z float32); w, L, h0, h0_z float32."""
    T = q.shape[0]
    dv = v.shape[-1]
    BH, n = L.shape
    states, final = _form_states(k, v, w, L, h0, power="2", fused=True, states_dtype=q.dtype, backend="triton")
    inter = apply(q, states.view(T, -1, dv), torch.float32)
    inter_z = final_z = states_z = None
    if need_z:
        states_z, final_z = _scan_forward(gram(k, w).view(BH, n, -1), L, h0_z, torch.float32)
        if read_z:
            inter_z = quad(q, states_z.view(T, -1))
    return inter, inter_z, final, final_z, states, states_z


def _fused_state_backward(q, k, v, w, L, h0, states, states_z, dinter, dinter_z, dfinal, dfinal_z, more_dq=None,
                          more_dk=None, more_dv=None):
    """(d q, d k, d v, d w, d L, d h0, d h0_z) of _fused_state_forward from d inter (in q's dtype: the products read
    it rounded, as the forward's operands), d inter_z, d final, d final_z (each None when it does not reach the loss;
    d inter None: q gets none). states None: formed again here. Each of d q, d k, d v is the float32 sum of its
    kernels' terms and of more_dq, more_dk, more_dv (the in-chunk term's, when given) rounded once."""
    T = q.shape[0]
    dv = v.shape[-1]
    BH, n = L.shape
    if states is None:
        states, _ = _form_states(k, v, w, L, h0, power="2", fused=True, states_dtype=q.dtype, backend="triton")
    dq = dstates = None
    if dinter is not None:
        dq_z = None if dinter_z is None else quad(q, states_z.view(T, -1), dinter_z)
        dq = grad(q, states.view(T, -1, dv), dinter, adds=(dq_z, more_dq))
        dstates = outer(q, dinter).view(BH, n, -1)
    du, dL, dh0 = _scan_backward(states, L, dstates, dfinal, q.dtype)
    du = du.view(T, -1, dv)
    dvalues, dw = apply(k, du, v.dtype, w, v, add=more_dv)
    dk_z = dh0_z = None
    if states_z is not None:
        dstates_z = None if dinter_z is None else gram(q, dinter_z).view(BH, n, -1)
        du_z, dL_z, dh0_z = _scan_backward(states_z, L, dstates_z, dfinal_z, torch.float32)
        du_z = du_z.view(T, -1)
        dk_z = quad(k, du_z, w)
        dw, dL = dw + quad(k, du_z), dL + dL_z
    dk = grad(k, du, v, w, adds=(dk_z, more_dk))
    return dq, dk, dvalues, dw, dL, dh0, dh0_z


class _FusedChunkCore(torch.autograd.Function):
    """The chunked form's core for power 2 on the GPU kernels as one autograd function, backward written out: the
    chunks' decays (_decay_fwd_kernel), the in-chunk quadratic kernel (unnormalised, every chunk a sequence; its
    sums in float32 when normalising), the state part (_fused_state_forward) and the combine kernel. In the
    backward pass the combine writes d intra and d inter rounded to q's dtype once, as the kernels read them; the
    in-chunk kernel's d q, d k, d v join the state part's inside its kernels (one rounding each); one kernel
    gathers every decay's gradient into d g. Separate autograd functions cast float32 gradients, added bf16 ones
    and ran some thirty small float64 ops on the decays in extra passes. recompute: keep no per-chunk states S
    (~8x the values' size in bf16) for the backward but form them again there (outer product and scan), what
    activation checkpointing needs. Blocks q, k [T, C, d], v [T, C, dv]; g [T, C] the chunks' log decays
    (contiguous) or None; n chunks per sequence; h0, h0_z float32."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, h0_z, n, scale, normalize, need_z, recompute):
        T, C, d = q.shape
        dv = v.shape[-1]
        sq_scale = scale * scale
        w, L, qd = _decays(torch.zeros(T, C, dtype=torch.float32, device=q.device) if g is None else g, sq_scale)
        L = L.view(T // n, n)
        blocks = q.view(T, 1, C, d), k.view(T, 1, C, d), v.view(T, 1, C, dv)
        intra, intra_den, att_saved, ctx.att_info = attention_forward(
            *blocks, None if g is None else g.view(T, 1, C), "2", False, scale, False,
            torch.float32 if normalize else q.dtype)
        inter, inter_z, final, final_z, states, states_z = _fused_state_forward(q, k, v, w, L, h0, h0_z, need_z,
                                                                                 normalize)
        o, den = _combine_forward(intra.view(-1, dv), intra_den.view(-1), inter.view(-1, dv), inter_z, qd.view(-1),
                                  normalize, q.dtype)
        ctx.save_for_backward(*att_saved, g, w, L, h0, None if recompute else states, states_z, o, den, inter,
                              inter_z, qd)
        ctx.normalize, ctx.sq_scale = normalize, sq_scale
        ctx.has_h0, ctx.has_h0_z = h0 is not None, h0_z is not None
        ctx.set_materialize_grads(False)
        return o, final, final_z

    @staticmethod
    def backward(ctx, do, dfinal, dfinal_z):
        saved = ctx.saved_tensors
        att_saved, (g, w, L, h0, states, states_z, o, den, inter, inter_z, qd) = saved[:8], saved[8:]
        q, k, v = (t.view(t.shape[0], t.shape[2], t.shape[3]) for t in att_saved[:3])
        T, C, dv = v.shape
        dinter = dinter_z = dqd = da = more = None
        if do is not None:  # None when only the final state reaches the loss: then q gets no gradient
            dintra, dintra_den, dinter, dinter_z, dqd = _combine_backward(do, o, den, inter, inter_z, qd.view(-1),
                                                                          ctx.normalize, q.dtype, q.dtype)
            *more, da = attention_backward(att_saved, ctx.att_info, dintra.view(T, 1, C, dv),
                                           None if dintra_den is None else dintra_den.view(T, 1, C))
            more = [x.view(T, C, -1) for x in more]
            dinter = dinter.view(T, C, dv)
            dinter_z = None if dinter_z is None else dinter_z.view(T, C)
        dq, dk, dvalues, dw, dL, dh0, dh0_z = _fused_state_backward(
            q, k, v, w, L, h0, states, states_z, dinter, dinter_z, dfinal, dfinal_z, *(more or ()))
        dg = None
        if g is not None:
            dg = torch.empty_like(g)
            _decay_bwd_kernel[(T,)](g, dw, dL, qd if dqd is None else dqd, *(da or (dw, dw)), dg, C, ctx.sq_scale,
                                    HAS_DQD=dqd is not None, HAS_DA=da is not None,
                                    BLOCK_C=triton.next_power_of_2(C))
        return (dq, dk, dvalues, dg, dh0 if ctx.has_h0 else None, dh0_z if ctx.has_h0_z else None, None, None, None,
                None, None)


def chunk_power_attention(q, k, v, g, *, power, scale, normalize, initial_state, output_final_state, chunk_size,
                          recompute_states=False, backend="auto"):
    """o ([B, H, N, dv], q's dtype) and the final state ([B, H, D, dv + 1], float32 or float64; None unless
    output_final_state).

    q, k: [B, H, N, d]; v: [B, H, N, dv]; g: [B, H, N] or None; initial_state: [B, H, D, dv + 1] or None.
    Without gradients (a prefill) a long input runs in segments of whole chunks with the state passed on
    (exact: a split anywhere gives the outputs of one call), so that the per-chunk states held at once stay
    within SEGMENT_TOKENS token-heads (32 prompts of 128K tokens would otherwise need 140 GB of them and their
    chunk sums, for d = dv = 64 in bf16). recompute_states: keep no per-chunk states for the backward pass but
    form them again there (_FusedChunkCore; torch.utils.checkpoint of the state part elsewhere).
    """
    B, H, N = q.shape[:3]
    C = max(1, min(chunk_size, N))
    segment = max(1, SEGMENT_TOKENS // (B * H * C)) * C
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, initial_state))
    if needs_grad or N <= segment:
        return _chunk_power_attention(q, k, v, g, power=power, scale=scale, normalize=normalize,
                                      initial_state=initial_state, output_final_state=output_final_state,
                                      chunk_size=C, recompute_states=recompute_states, backend=backend)
    outs, state = [], initial_state
    for s in range(0, N, segment):
        piece = [None if t is None else t[:, :, s:s + segment] for t in (q, k, v, g)]
        o, state = _chunk_power_attention(*piece, power=power, scale=scale, normalize=normalize, initial_state=state,
                                          output_final_state=True, chunk_size=C, recompute_states=False,
                                          backend=backend)
        outs.append(o)
    return torch.cat(outs, dim=2), state if output_final_state else None


def _chunk_power_attention(q, k, v, g, *, power, scale, normalize, initial_state, output_final_state, chunk_size,
                           recompute_states, backend):
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
                          backend=backend)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # once: views of the [B, N, H, d] layout would be
    # copied by each reshape below
    # padded keys are 0 (no weight, no state), padded decays 0 (no decay); padded queries are cut off
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    D = state_size(d, power)
    h0 = None if initial_state is None else initial_state[..., :dv].reshape(B * H, D * dv)
    h0_z = None if initial_state is None else initial_state[..., dv].reshape(B * H, D)
    blocks = q.reshape(T, C, d), k.reshape(T, C, d), v.reshape(T, C, dv)
    # z only where it is read: by the queries when normalising, in the final state when that is returned
    need_z = normalize or output_final_state
    if fused and power == "2":
        o, final, final_z = _FusedChunkCore.apply(
            *blocks, None if g is None else F.pad(g, (0, pad)).reshape(T, C).contiguous(),
            *(None if t is None else t.float().contiguous() for t in (h0, h0_z)), n, scale, normalize, need_z,
            recompute_states)
        return _finish(o, final, final_z, B, H, N, D, dv, output_final_state)
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
    return _finish(o, final, final_z, B, H, N, D, dv, output_final_state)


def _finish(o, final, final_z, B, H, N, D, dv, output_final_state):
    """o [B, H, N, dv] from the padded chunks' [T C, dv], and the final state [B, H, D, dv + 1] or None."""
    if output_final_state:
        final = torch.cat([final.reshape(B, H, D, dv), final_z.reshape(B, H, D, 1)], dim=-1)
    return o.reshape(B, H, -1, dv)[:, :, :N], final if output_final_state else None


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
