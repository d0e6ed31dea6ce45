"""Triton forward and backward kernels of the causal attention core (docs/math.md#kernels).

One kernel body per pass, specialised by constexpr flags instead of six near-copies:
POWER 1 (w = s), 2 (w = s^2), 3 (exp: w = e^s); NORMALIZE (divide by the row sum); HAS_DECAY
(w_ij *= e^{a_i - a_j}, a = cumsum g). s = scale * q.k. Causal, any N, fp32 accumulation.

Forward: one program per (query block, head) walks the key blocks left of the diagonal without a mask,
then the diagonal blocks with the causal mask (flash-attention style). It stores o and one number per
row for the backward: 1/den (powers 1, 2) or the log2-sum-exp (exp) (or 0: exp without normalisation).
Backward, flash-attention-2 style: one kernel per key block walks the query blocks (dk, dv, the a_j part
of da); one per query block walks the key blocks (dq, the a_i part of da). With P_ij the weight that
multiplies v_j in o_i (w_ij / den_i when normalising) and Delta_i = dO_i . o_i:
  dL/dw_ij * w_ij = G_ij = P_ij (dO_i . v_j - Delta_i)      (Delta = 0 without normalisation)
  da_i = sum_j G_ij,  da_j -= sum_i G_ij,  dg = reverse cumsum of da
  dL/ds_ij = G_ij (exp), dw_ij e^{a_i-a_j} (power 1), 2 s_ij dw_ij e^{a_i-a_j} (power 2).
G_ii enters da_i with + and - and is left out of both sums: with strong decay dg is tiny, and the
rounding difference between two separately computed copies of G_ii would swamp it.
The diagonal weight is also kept apart in the forward: with strong decay (or at i = 0) o_i ~ v_i, and
dO_i.v_i - Delta_i, the diagonal's factor in dL/ds_ii, would be a difference of two nearly equal numbers
(then amplified by 1/s_ii for power 2). When normalising the forward also stores o_i without its diagonal
term and 1 - P_ii, and the backward uses (1 - P_ii) dO_i.v_i - dO_i.(o_i - P_ii v_i) instead.

Layout: every kernel takes the four strides (batch, head, token, feature) of each of q, k, v, o, dO and of
the gradients, so [B, H, N, d] tensors and views of a block's [B, N, H, d] projections are read as they are
(no .contiguous()); o, dq, dk, dv are written contiguous in the caller's layout. Delta and dO.o_off are
formed by a small kernel from the strided dO, o and o_off (no fp32 temporaries of [B, H, N, dv]).
The tiles a loop walks (k, v in the forward and dq kernels; q, dO in dkdv) come through tensor descriptors, the
tensor memory accelerator of Hopper GPUs, wherever the views allow (contiguous features, 16-byte aligned rows and
heads, _tma): forward and backward 3-8 % faster on an H200 than through pointers (bench/NOTES.md, session 34).

Numerics: the cumulative decay a is summed in float64 and every tile subtracts a block-local reference
(a row of the program's own block) before going to float32, so a_i - a_j keeps full precision
for any sequence length and decay strength. exp keeps a running row maximum folded into the exponent.
Powers 1 and 2 split the decay of the tiles off the diagonal blocks, where query i and key j lie on either
side of a_ref (the forward's and dq's first query of the block, dkdv's last key of the block), into
e^{a_i - a_j} = e^{a_i - a_ref} e^{a_ref - a_j}: both factors <= 1 since g <= 0 (a factor underflows only
where the whole weight does), the loop's vector of factors multiplies the tile and the program's own the
sums after the loop, so those tiles need no exponential per element (the special-function units bound these
loops, see bench/NOTES.md). The diagonal blocks keep the per-element e^{a_i - a_j} under the causal mask.
exp needs its exponential per score anyway; there the queries' a_i, a constant of each row, stays out of the
scores (added to the row's maximum and stat after the loops), so a score's exponent costs a multiply-add and an
add (_exp_tile).
exp with decay (normalised, 2Mamba-E) skips the pairs its decay makes negligible: a pair whose weight is provably
below e^-44 times its row's diagonal weight (which is a term of the row's sum) changes nothing a float32 sum can
hold, so the loops start at the first key block some row of the block needs (forward, dq) and stop after the last
query block some key needs (dk/dv); _skip_bounds gives both from |q.k| <= |q| max|k| and the decay (the dq kernel
starts where the forward's loop started, kept by the forward). Strong decays leave a few hundred keys a row (kernel
time 6x less at 8K on an H200); with weak ones nothing is skipped and the bounds cost 0.5-3 % of forward+backward
(bench/NOTES.md, sessions 35 and 36).
The weights fed to the second matrix product are cast to bf16 for bf16 inputs (same range as fp32) and
kept in fp32 (tf32 product) otherwise, since un-normalised s^2 or s can overflow fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .reference import bhnd_views
from .triton_compat import INTERPRET

POWER_CODES = {"1": 1, "2": 2, "exp": 3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_GRID_HEADS = 65535  # CUDA's limit on a grid's second axis; larger batch x heads run in slices of the batch
LOG2E = tl.constexpr(1.4426950408889634)  # exponents run in log2 units (exp2 is the native instruction)
# exp with decay skips the blocks of pairs whose every weight is below e^-SKIP_NATS times the row's diagonal weight
# (the module docstring): up to 2^17 such terms change a row's sum by less than 1e-14 of it.
SKIP_NATS = tl.constexpr(44.0)
SKIP_SCAN = tl.constexpr(256)  # groups of rows a vector load of the skipping's bounds covers
SKIP_SLACK = tl.constexpr(1.0009765625)  # 1 + 2^-10: |q.k| <= |q| |k| with the products' and norms' roundings


def _configs(gpu, interpreter):
    """Autotuning candidates as (BLOCK_M, BLOCK_N, num_warps, num_stages); one small config in the interpreter."""
    shapes = [interpreter] if INTERPRET else gpu
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Forward and dq: BLOCK_M (queries) must be a multiple of BLOCK_N (keys); dkdv: the reverse. The GPU lists
# lead with the fastest 4-warp configs of the sweep at d = 64 (`bench/kernel_sweep.py --kernels quadratic`,
# bench/NOTES.md; they spill a few hundred bytes to the stack and still ran fastest), then configs of 8 warps
# that compile without spills (or nearly) for the autotuner to fall back on. The interpreter's blocks are
# small and unequal so that tests at N = 17 or 100 cross block edges in both loops.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
                        (32, 16, 4, 1))
_DQ_CONFIGS = _configs([(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
                       (32, 16, 4, 1))
_DKDV_CONFIGS = _configs([(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)], (16, 32, 4, 1))
# exp's skipping keeps its bounds by groups of rows that divide every block of every config
SKIP_GROUP = min(min(c.kwargs.values()) for c in _FWD_CONFIGS + _DQ_CONFIGS + _DKDV_CONFIGS)
# N_BUCKET and BH_BUCKET: powers of two above N and B * H, so that one tuning serves a range of shapes;
# the kernels never read them, and do_not_specialize keeps them from causing recompiles.
_KEY = ["N_BUCKET", "BH_BUCKET", "D", "DV", "POWER", "NORMALIZE", "HAS_DECAY", "TMA"]


def _timed_unskipped(bound, value):
    """An autotuner pre_hook (run before its timing runs only) for a kernel that skips negligible pairs: sets the
    skipping's bound `bound` to `value`, a valid bound that skips nothing (AMN -inf: a lower bound of any a;
    FIRST 0: the loop starts at the first key), so that a configuration is chosen where nothing is skipped, the
    slowest case and the one weak decays reach, and not by the decays of the first call. The launch after the
    tuning reads the same loose bound and is exact; later calls form their own (bench/NOTES.md, session 37)."""
    def hook(nargs, reset_only=False):
        if nargs["SKIP"]:
            nargs[bound].fill_(value)
    return hook


@triton.jit
def _tile(ptr, offs, offs_d, N, D: tl.constexpr, s_n, s_d):
    """Pointers to and mask of a [rows, BLOCK_D] tile of an [N, D] matrix with row stride s_n, column stride s_d.

    Row offsets in int64: a row of a [B, N, H, d] view strides over all heads, so N * s_n can pass 2^31.
    """
    ptrs = ptr + offs[:, None].to(tl.int64) * s_n + offs_d[None, :] * s_d
    return ptrs, (offs[:, None] < N) & (offs_d[None, :] < D)


@triton.jit
def _load_rows(ptr, offs, offs_d, N, D: tl.constexpr, s_n, s_d):
    """A tile as in _tile, zero outside the matrix."""
    ptrs, mask = _tile(ptr, offs, offs_d, N, D, s_n, s_d)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _rows(X, start, offs, offs_d, N, D: tl.constexpr, s_n, s_d, TMA: tl.constexpr):
    """The tile of rows start .. start + len(offs) of an [N, D] matrix, zero outside it: X a tensor descriptor
    (_descriptor) when TMA, else a pointer (_load_rows)."""
    if TMA:  # if / else: the compiler also builds what follows a constexpr branch's return
        tile = X.load([start, 0])
    else:
        tile = _load_rows(X, offs, offs_d, N, D, s_n, s_d)
    return tile


@triton.jit
def _descriptor(X, N, D: tl.constexpr, s_n, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """X's [N, D] matrix as a tensor descriptor read in [BLOCK_ROWS, BLOCK_D] tiles (the tensor memory accelerator
    on Hopper) when TMA, else X itself."""
    if TMA:
        desc = tl.make_tensor_descriptor(X, shape=[N, D], strides=[s_n, 1], block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        desc = X
    return desc


@triton.jit
def _head(ptr, bh, H, s_b, s_h):
    """ptr moved to head bh % H of batch element bh // H."""
    return ptr + (bh // H) * s_b + (bh % H) * s_h


@triton.jit
def _local_decay(A, offs, a_ref, N):
    """(a - a_ref) * log2(e) in fp32: a is fp64, a_ref a nearby row of it, so the result is small and exact.

    Rows past N repeat row N - 1: every decay they meet stays <= 1, so padding never overflows.
    """
    return (tl.load(A + tl.minimum(offs, N - 1)) - a_ref).to(tl.float32) * LOG2E


@triton.jit
def _uniform(x, UNIFORM: tl.constexpr):
    """An int32 that is the same in every thread (a loop bound read from memory), with UNIFORM as its minimum over
    the warp: redux.sync's result sits in a uniform register, so the loop it bounds keeps its control and addressing
    there. A bound that ptxas cannot prove uniform puts them in each thread's registers, with divergence barriers
    around the tensor-core products: exp's dq kernel ran 10-16 % slower so (bench/NOTES.md, session 36). UNIFORM
    needs sm_80 or later (redux.sync) and a compiler (the interpreter runs no inline PTX): _meta."""
    if UNIFORM:
        x = tl.inline_asm_elementwise("redux.sync.min.s32 $0, $1, 0xffffffff;", "=r,r", [x], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return x


@triton.jit
def _key_block_start(first, BLOCK_N: tl.constexpr, G: tl.constexpr, UNIFORM: tl.constexpr):
    """The start of a loop over key blocks of BLOCK_N from its first needed group of G keys: the block holding it."""
    return _uniform(first * G // BLOCK_N * BLOCK_N, UNIFORM)


@triton.jit
def _first_key(AMN, c, start_m, BLOCK_N: tl.constexpr, G: tl.constexpr, SKIP: tl.constexpr,
               UNIFORM: tl.constexpr):
    """Where the loop over the key blocks left of the diagonal block starts: 0, or with SKIP the block of the first
    group of G keys whose smallest a (AMN) is below c + SKIP_NATS, c the largest r of the query block's rows
    (_skip_bounds): every key before it has weight below e^-SKIP_NATS of its row's diagonal weight."""
    lo = 0
    if SKIP:
        groups = start_m // G
        first = groups
        base = tl.zeros([], tl.int32)  # a loop-carried int32
        while (base < groups) & (first == groups):  # vector loads until a needed group shows up
            idx = base + tl.arange(0, SKIP_SCAN)
            need = (tl.load(AMN + idx, mask=idx < groups, other=float("inf")) < c + SKIP_NATS) & (idx < groups)
            first = tl.minimum(first, tl.min(tl.where(need, idx, groups), 0))
            base += SKIP_SCAN
        lo = _key_block_start(first, BLOCK_N, G, UNIFORM)
    return lo


@triton.jit
def _last_query(CB, thr, diag_end, N, G: tl.constexpr, SKIP: tl.constexpr, UNIFORM: tl.constexpr):
    """Where the loop over the query blocks after the diagonal block stops: N, or with SKIP after the last group of
    G rows whose largest r (CB) reaches thr = the key block's smallest a - SKIP_NATS (_skip_bounds)."""
    hi = N
    if SKIP:
        groups = tl.cdiv(N, G)
        start = diag_end // G
        last = start
        for base in range(start, groups, SKIP_SCAN):
            idx = base + tl.arange(0, SKIP_SCAN)
            need = tl.load(CB + idx, mask=idx < groups, other=float("-inf")) >= thr
            last = tl.maximum(last, tl.max(tl.where(need, idx + 1, start), 0))
        hi = _uniform(tl.maximum(tl.minimum(last * G, N), diag_end), UNIFORM)
    return hi


@triton.jit
def _fwd_inner(acc, den, m_i, q, qa, offs_m, K, V, A, a_ref, N, scale, lo, hi, sk_n, sk_d, sv_n, sv_d,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, POWER: tl.constexpr, HAS_DECAY: tl.constexpr,
               MASKED: tl.constexpr, WDTYPE: tl.constexpr, TMA: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(K, start_n, offs_n, offs_d, N, D, sk_n, sk_d, TMA)
        v = _rows(V, start_n, offs_n, offs_dv, N, DV, sv_n, sv_d, TMA)
        s = tl.dot(q, tl.trans(k))
        if POWER == 3:  # without the queries' a_i: a constant of each row, added to its stat after the loops
            x = s * (scale * LOG2E)
            if HAS_DECAY:
                x -= _local_decay(A, offs_n, a_ref, N)[None, :]
            if MASKED:
                x = tl.where(offs_m[:, None] > offs_n[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = m_new
            if MASKED:  # a row with no key left of the diagonal yet keeps m = -inf: avoid -inf - -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            w = tl.exp2(x - m_use[:, None])
            acc = acc * alpha[:, None]
            den = den * alpha
            m_i = m_new
        else:
            if HAS_DECAY and not MASKED:  # the keys' factor only; the queries' one and the scale after the loop
                w = s * tl.exp2(-_local_decay(A, offs_n, a_ref, N))[None, :]
                if POWER == 2:
                    w *= s
            else:
                s *= scale
                w = s if POWER == 1 else s * s
                if HAS_DECAY:  # a diagonal block: masked before exp2 (above the diagonal a_i - a_j > 0 could overflow)
                    logdec = qa[:, None] - _local_decay(A, offs_n, a_ref, N)[None, :]
                    w *= tl.exp2(tl.where(offs_m[:, None] > offs_n[None, :], logdec, float("-inf")))
                elif MASKED:
                    w = tl.where(offs_m[:, None] > offs_n[None, :], w, 0.0)
        den += tl.sum(w, 1)
        acc = tl.dot(w.to(WDTYPE), v.to(WDTYPE), acc)
    return acc, den, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, pre_hook=_timed_unskipped("AMN", float("-inf")))
@triton.jit(do_not_specialize=_KEY[:2])
def _fwd_kernel(Q, K, V, A, O, STAT, O_OFF, FRAC, KMAX, AMN, CB, FIRST, N, H, N_BUCKET, BH_BUCKET, scale,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                POWER: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr, WDTYPE: tl.constexpr,
                TMA: tl.constexpr, SKIP: tl.constexpr, G: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    # Highest query blocks (most keys) first, so the short ones fill the tail of the grid.
    pid_m = tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q = _head(Q, bh, H, sq_b, sq_h)
    K = _head(K, bh, H, sk_b, sk_h)
    V = _head(V, bh, H, sv_b, sv_h)
    O = _head(O, bh, H, so_b, so_h)
    O_OFF = _head(O_OFF, bh, H, so_b, so_h)  # o_off is allocated like o
    A += bh * N
    STAT += bh * N
    FRAC += bh * N
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, N, D, sq_n, sq_d)
    # s_ii from the rows of q and k themselves (before the loop, while few registers are live)
    s_diag = tl.sum(q.to(tl.float32) * _load_rows(K, offs_m, offs_d, N, D, sk_n, sk_d).to(tl.float32), 1) * scale
    if HAS_DECAY:
        a_ref = tl.load(A + start_m)
        qa = _local_decay(A, offs_m, a_ref, N)
    else:
        a_ref = 0.0
        qa = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    KD = _descriptor(K, N, D, sk_n, BLOCK_N, BLOCK_D, TMA)
    VD = _descriptor(V, N, DV, sv_n, BLOCK_N, BLOCK_DV, TMA)
    c = 0.0
    if SKIP:  # r_i = a_i + scale (|q_i| max|k| (1 + 2^-10) - q_i.k_i); its maxima by groups of G rows for the backward
        qf = q.to(tl.float32)
        bound = scale * tl.sqrt(tl.sum(qf * qf, 1)) * tl.load(KMAX + bh) * SKIP_SLACK - s_diag
        r = tl.where(offs_m < N, tl.load(A + tl.minimum(offs_m, N - 1)) + bound.to(tl.float64), float("-inf"))
        groups = start_m // G + tl.arange(0, BLOCK_M // G)
        tl.store(CB + bh * tl.cdiv(N, G) + groups, tl.max(tl.reshape(r, [BLOCK_M // G, G]), 1),
                 mask=groups < tl.cdiv(N, G))
        c = tl.max(r, 0)
    lo = _first_key(AMN + bh * tl.cdiv(N, G), c, start_m, BLOCK_N, G, SKIP, UNIFORM)
    if SKIP:  # where the loop starts, in groups of keys, for each group of the block's rows: the dq kernel's start
        tl.store(FIRST + bh * tl.cdiv(N, G) + groups, tl.full([BLOCK_M // G], lo // G, tl.int32),
                 mask=groups < tl.cdiv(N, G))
    acc, den, m_i = _fwd_inner(acc, den, m_i, q, qa, offs_m, KD, VD, A, a_ref, N, scale, lo, start_m,
                               sk_n, sk_d, sv_n, sv_d, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, POWER, HAS_DECAY, False, WDTYPE,
                               TMA)
    if HAS_DECAY and POWER != 3:
        rq = tl.exp2(qa) * _factored_scales(scale, POWER)[0]
        acc *= rq[:, None]
        den *= rq
    acc, den, m_i = _fwd_inner(acc, den, m_i, q, qa, offs_m, KD, VD, A, a_ref, N, scale, start_m,
                               tl.minimum(start_m + BLOCK_M, N), sk_n, sk_d, sv_n, sv_d,
                               D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, POWER, HAS_DECAY, True, WDTYPE, TMA)
    # acc, den: sums strictly left of the diagonal; the diagonal term w_ii v_i (decay 1) joins here
    if POWER == 3:
        x_diag = s_diag * LOG2E - qa
        m_new = tl.maximum(m_i, x_diag)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        den = den * alpha
        wdiag = tl.exp2(x_diag - m_new)
        m_i = m_new
    else:
        wdiag = s_diag if POWER == 1 else s_diag * s_diag
    offs_dv = tl.arange(0, BLOCK_DV)
    total_den = den + wdiag
    total = acc + wdiag[:, None] * _load_rows(V, offs_m, offs_dv, N, DV, sv_n, sv_d).to(tl.float32)
    if POWER == 3:  # m_i + qa: the row maximum with the queries' a_i back in
        if NORMALIZE:
            inv = 1.0 / total_den
            stat = m_i + qa + tl.log2(total_den)
        else:
            inv = tl.exp2(m_i + qa)
            stat = tl.zeros([BLOCK_M], tl.float32)
    else:
        if NORMALIZE:
            inv = tl.where(total_den == 0.0, 0.0, 1.0 / tl.where(total_den == 0.0, 1.0, total_den))  # o = 0, not NaN
            stat = inv
        else:  # the backward reads no stat here: it keeps the row sums, return_den's den
            inv = tl.full([BLOCK_M], 1.0, tl.float32)
            stat = total_den
    o_ptrs, o_mask = _tile(O, offs_m, offs_dv, N, DV, so_n, so_d)
    tl.store(o_ptrs, (total * inv[:, None]).to(O.dtype.element_ty), mask=o_mask)
    tl.store(STAT + offs_m, stat, mask=offs_m < N)
    if NORMALIZE:
        o_ptrs, o_mask = _tile(O_OFF, offs_m, offs_dv, N, DV, so_n, so_d)
        tl.store(o_ptrs, (acc * inv[:, None]).to(O_OFF.dtype.element_ty), mask=o_mask)
        tl.store(FRAC + offs_m, den * inv, mask=offs_m < N)


@triton.jit
def _row_stats(DELTA, FRAC, ROFF, offs, N, NORMALIZE: tl.constexpr, ROW_DELTA: tl.constexpr):
    """delta, frac, roff of some query rows (zeros without normalisation, where they are not used; there
    ROW_DELTA loads delta = -dL/dden of return_den)."""
    if NORMALIZE:
        delta = tl.load(DELTA + offs, mask=offs < N, other=0.0)
        frac = tl.load(FRAC + offs, mask=offs < N, other=0.0)
        roff = tl.load(ROFF + offs, mask=offs < N, other=0.0)
    else:
        frac = tl.zeros_like(offs).to(tl.float32)
        roff = frac
        if ROW_DELTA:
            delta = tl.load(DELTA + offs, mask=offs < N, other=0.0)
        else:
            delta = frac
    return delta, frac, roff


@triton.jit
def _bwd_tile(s, logdec, stat, delta, frac, roff, dov, diff, POWER: tl.constexpr, NORMALIZE: tl.constexpr,
              ROW_DELTA: tl.constexpr, HAS_DECAY: tl.constexpr, MASKED: tl.constexpr):
    """Elementwise backward of one tile, in either orientation (all operands broadcast to the tile).

    s: scores (exp: the exponent of P, _exp_tile); logdec: log2 of the decay a_i - a_j; stat: the forward's
    per-row number (not read for exp); delta: dO_i . o_i;
    dov: dO_i . v_j; diff: i - j; frac, roff: 1 - P_ii and dO_i . (o_i - P_ii v_i) from the forward's
    off-diagonal sums; without normalisation, ROW_DELTA: delta = -dL/dden_i of return_den's row sums (each
    weight w_ij is also a term of den_i). Returns P (the weight of v_j in o_i), G = w dL/dw without the
    diagonal, and dL/ds.
    """
    if NORMALIZE:
        dp = dov - delta
        if MASKED:
            # dO_i.v_i - dO_i.o_i = (1 - P_ii) dO_i.v_i - dO_i.(o_i - P_ii v_i) without the cancellation
            dp = tl.where(diff == 0, frac * dov - roff, dp)
    elif ROW_DELTA:
        dp = dov - delta
    else:
        dp = dov
    if POWER == 3:  # s is the exponent of P in log2 units: stat and the decay are in it (_exp_tile)
        p = tl.exp2(tl.where(diff >= 0, s, float("-inf")) if MASKED else s)
        g = p * dp
        ds = g
    else:
        if HAS_DECAY:
            e = tl.exp2(tl.where(diff >= 0, logdec, float("-inf")) if MASKED else logdec)
        elif MASKED:
            e = tl.where(diff >= 0, 1.0, 0.0)
        else:
            e = 1.0
        if NORMALIZE:
            dw = dp * stat
            se = s * e * stat
        else:
            dw = dp
            se = s * e
        p = se if POWER == 1 else s * se
        g = p * dp
        ds = dw * e if POWER == 1 else 2.0 * s * dw * e
    if MASKED:
        g = tl.where(diff > 0, g, 0.0)
    return p, g, ds


@triton.jit
def _exp_tile(s, scale, key_decay, row):
    """The exponent of P_ij = 2^(x_ij - stat_i) for exp, in log2 units: scale s_ij log2(e) - key_decay_j - row_i,
    with key_decay_j = (a_j - a_ref) log2(e) and row_i = stat_i - (a_i - a_ref) log2(e) (broadcast to the
    tile): one fused multiply-add and one add per score, a_ref any row near the tile."""
    return s * (scale * LOG2E) - key_decay - row


@triton.jit
def _factored_scales(scale, POWER: tl.constexpr):
    """The factors that the tiles off the diagonal blocks leave out of their sums (they work on the unscaled
    q.k): of P and G (scale^power), and of dL/ds (power 2: 2 scale)."""
    if POWER == 1:
        return scale, 1.0
    return scale * scale, 2.0 * scale


@triton.jit
def _bwd_tile_factored(s, x, delta, dov, POWER: tl.constexpr, NORMALIZE: tl.constexpr, ROW_DELTA: tl.constexpr):
    """_bwd_tile of a tile off the diagonal blocks, powers 1 and 2 with decay, on the unscaled s = q.k:
    e^{a_i - a_j} stat_i (stat_i = 1 unnormalised) = x F with x the factor of the loop's rows or columns
    (broadcast to the tile) and F the program's own. Returns P, G and dL/ds divided by F and by
    _factored_scales, which the caller applies to its sums after the loop."""
    if NORMALIZE or ROW_DELTA:
        dp = dov - delta
    else:
        dp = dov
    sx = s * x
    if POWER == 1:
        p = sx
        ds = dp * x
    else:
        p = s * sx
        ds = sx * dp
    return p, p * dp, ds


@triton.jit
def _dq_inner(dq, da, q, do, qa, stat, delta, frac, roff, offs_m, K, V, A, a_ref, N, scale, lo, hi,
              sk_n, sk_d, sv_n, sv_d, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, POWER: tl.constexpr, NORMALIZE: tl.constexpr, ROW_DELTA: tl.constexpr,
              HAS_DECAY: tl.constexpr, MASKED: tl.constexpr, WDTYPE: tl.constexpr, TMA: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(K, start_n, offs_n, offs_d, N, D, sk_n, sk_d, TMA)
        v = _rows(V, start_n, offs_n, offs_dv, N, DV, sv_n, sv_d, TMA)
        s = tl.dot(q, tl.trans(k))
        dov = tl.dot(do, tl.trans(v))
        if POWER == 3:  # stat holds stat - (a_i - a_ref) log2(e) here (_bwd_dq_kernel)
            if HAS_DECAY:
                s = _exp_tile(s, scale, _local_decay(A, offs_n, a_ref, N)[None, :], stat[:, None])
            else:
                s = _exp_tile(s, scale, 0.0, stat[:, None])
            p, g, ds = _bwd_tile(s, 0.0, 0.0, delta[:, None], frac[:, None], roff[:, None], dov,
                                 offs_m[:, None] - offs_n[None, :], POWER, NORMALIZE, ROW_DELTA, HAS_DECAY, MASKED)
        elif HAS_DECAY and not MASKED:  # the keys' factor; the queries' and the scales after the loop
            p, g, ds = _bwd_tile_factored(s, tl.exp2(-_local_decay(A, offs_n, a_ref, N))[None, :], delta[:, None],
                                          dov, POWER, NORMALIZE, ROW_DELTA)
        else:
            s *= scale
            if HAS_DECAY:
                logdec = qa[:, None] - _local_decay(A, offs_n, a_ref, N)[None, :]
            else:
                logdec = 0.0
            p, g, ds = _bwd_tile(s, logdec, stat[:, None], delta[:, None], frac[:, None], roff[:, None], dov,
                                 offs_m[:, None] - offs_n[None, :], POWER, NORMALIZE, ROW_DELTA, HAS_DECAY, MASKED)
        dq = tl.dot(ds.to(WDTYPE), k.to(WDTYPE), dq)
        da += tl.sum(g, 1)
    return dq, da


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, pre_hook=_timed_unskipped("FIRST", 0))
@triton.jit(do_not_specialize=_KEY[:2])
def _bwd_dq_kernel(Q, K, V, A, DO, STAT, DELTA, FRAC, ROFF, DQ, DA, FIRST, N, H, N_BUCKET, BH_BUCKET, scale,
                   sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                   sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   POWER: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr, WDTYPE: tl.constexpr,
                   ROW_DELTA: tl.constexpr, TMA: tl.constexpr, SKIP: tl.constexpr, G: tl.constexpr,
                   UNIFORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q = _head(Q, bh, H, sq_b, sq_h)
    K = _head(K, bh, H, sk_b, sk_h)
    V = _head(V, bh, H, sv_b, sv_h)
    DO = _head(DO, bh, H, sdo_b, sdo_h)
    DQ = _head(DQ, bh, H, sdq_b, sdq_h)
    A += bh * N
    STAT += bh * N
    DELTA += bh * N
    FRAC += bh * N
    ROFF += bh * N
    DA += bh * N
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, N, D, sq_n, sq_d)
    do = _load_rows(DO, offs_m, tl.arange(0, BLOCK_DV), N, DV, sdo_n, sdo_d)
    stat = tl.load(STAT + offs_m, mask=offs_m < N, other=0.0)
    delta, frac, roff = _row_stats(DELTA, FRAC, ROFF, offs_m, N, NORMALIZE, ROW_DELTA)
    if HAS_DECAY:
        a_ref = tl.load(A + start_m)
        qa = _local_decay(A, offs_m, a_ref, N)
    else:
        a_ref = 0.0
        qa = tl.zeros([BLOCK_M], tl.float32)
    if POWER == 3:  # the rows' part of the exponent (_exp_tile)
        stat -= qa
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    da = tl.zeros([BLOCK_M], tl.float32)
    KD = _descriptor(K, N, D, sk_n, BLOCK_N, BLOCK_D, TMA)
    VD = _descriptor(V, N, DV, sv_n, BLOCK_N, BLOCK_DV, TMA)
    lo = 0
    if SKIP:  # the earliest start of the forward's loops over these rows
        groups = start_m // G + tl.arange(0, BLOCK_M // G)
        first = tl.min(tl.load(FIRST + bh * tl.cdiv(N, G) + groups, mask=groups < tl.cdiv(N, G), other=N), 0)
        lo = _key_block_start(first, BLOCK_N, G, UNIFORM)
    dq, da = _dq_inner(dq, da, q, do, qa, stat, delta, frac, roff, offs_m, KD, VD, A, a_ref, N, scale, lo, start_m,
                       sk_n, sk_d, sv_n, sv_d, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, POWER, NORMALIZE, ROW_DELTA, HAS_DECAY,
                       False, WDTYPE, TMA)
    if HAS_DECAY and POWER != 3:  # the queries' factor of the tiles left of the diagonal block (_dq_inner)
        f = tl.exp2(qa)
        if NORMALIZE:
            f *= stat
        p_scale, ds_scale = _factored_scales(scale, POWER)
        dq *= (f * ds_scale)[:, None]
        da *= f * p_scale
    dq, da = _dq_inner(dq, da, q, do, qa, stat, delta, frac, roff, offs_m, KD, VD, A, a_ref, N, scale, start_m,
                       tl.minimum(start_m + BLOCK_M, N), sk_n, sk_d, sv_n, sv_d,
                       D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, POWER, NORMALIZE, ROW_DELTA, HAS_DECAY, True, WDTYPE, TMA)
    dq_ptrs, dq_mask = _tile(DQ, offs_m, offs_d, N, D, sdq_n, sdq_d)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)
    tl.store(DA + offs_m, da, mask=offs_m < N)


@triton.jit
def _dkdv_inner(dk, dv, da, k, v, ka, offs_n, Q, DO, A, STAT, DELTA, FRAC, ROFF, a_ref, N, scale, lo, hi,
                sq_n, sq_d, sdo_n, sdo_d, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, POWER: tl.constexpr, NORMALIZE: tl.constexpr, ROW_DELTA: tl.constexpr,
                HAS_DECAY: tl.constexpr, MASKED: tl.constexpr, WDTYPE: tl.constexpr, TMA: tl.constexpr):
    # Tiles are [keys, queries]. Query rows past N load q = dO = 0 and stat = delta = 0, which makes their
    # G, dL/ds and contribution to dv exactly 0, so the last partial block needs no extra mask.
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows(Q, start_m, offs_m, offs_d, N, D, sq_n, sq_d, TMA)
        do = _rows(DO, start_m, offs_m, offs_dv, N, DV, sdo_n, sdo_d, TMA)
        stat = tl.load(STAT + offs_m, mask=offs_m < N, other=0.0)
        delta, frac, roff = _row_stats(DELTA, FRAC, ROFF, offs_m, N, NORMALIZE, ROW_DELTA)
        s = tl.dot(k, tl.trans(q))
        dov = tl.dot(v, tl.trans(do))
        if POWER == 3:
            if HAS_DECAY:
                s = _exp_tile(s, scale, ka[:, None], (stat - _local_decay(A, offs_m, a_ref, N))[None, :])
            else:
                s = _exp_tile(s, scale, 0.0, stat[None, :])
            p, g, ds = _bwd_tile(s, 0.0, 0.0, delta[None, :], frac[None, :], roff[None, :], dov,
                                 offs_m[None, :] - offs_n[:, None], POWER, NORMALIZE, ROW_DELTA, HAS_DECAY, MASKED)
        elif HAS_DECAY and not MASKED:  # the queries' factor (with stat); the keys' and the scales after the loop
            x = tl.exp2(_local_decay(A, offs_m, a_ref, N))
            if NORMALIZE:
                x *= stat
            p, g, ds = _bwd_tile_factored(s, x[None, :], delta[None, :], dov, POWER, NORMALIZE, ROW_DELTA)
        else:
            s *= scale
            if HAS_DECAY:
                logdec = _local_decay(A, offs_m, a_ref, N)[None, :] - ka[:, None]
            else:
                logdec = 0.0
            p, g, ds = _bwd_tile(s, logdec, stat[None, :], delta[None, :], frac[None, :], roff[None, :], dov,
                                 offs_m[None, :] - offs_n[:, None], POWER, NORMALIZE, ROW_DELTA, HAS_DECAY, MASKED)
        dv = tl.dot(p.to(WDTYPE), do.to(WDTYPE), dv)
        dk = tl.dot(ds.to(WDTYPE), q.to(WDTYPE), dk)
        da -= tl.sum(g, 1)
    return dk, dv, da


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, pre_hook=_timed_unskipped("AMN", float("-inf")))
@triton.jit(do_not_specialize=_KEY[:2])
def _bwd_dkdv_kernel(Q, K, V, A, DO, STAT, DELTA, FRAC, ROFF, DK, DV_OUT, DA, AMN, CB, N, H, N_BUCKET, BH_BUCKET,
                     scale,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     POWER: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr,
                     WDTYPE: tl.constexpr, ROW_DELTA: tl.constexpr, TMA: tl.constexpr, SKIP: tl.constexpr,
                     G: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Lowest key blocks (most queries) first.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q = _head(Q, bh, H, sq_b, sq_h)
    K = _head(K, bh, H, sk_b, sk_h)
    V = _head(V, bh, H, sv_b, sv_h)
    DO = _head(DO, bh, H, sdo_b, sdo_h)
    DK = _head(DK, bh, H, sdk_b, sdk_h)
    DV_OUT = _head(DV_OUT, bh, H, sdv_b, sdv_h)
    A += bh * N
    STAT += bh * N
    DELTA += bh * N
    FRAC += bh * N
    ROFF += bh * N
    DA += bh * N
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K, offs_n, offs_d, N, D, sk_n, sk_d)
    v = _load_rows(V, offs_n, offs_dv, N, DV, sv_n, sv_d)
    diag_end = tl.minimum(start_n + BLOCK_N, N)
    if HAS_DECAY:  # the block's last key: a_j >= a_ref for its keys, a_i <= a_ref for the queries after it
        a_ref = tl.load(A + diag_end - 1)
        ka = _local_decay(A, offs_n, a_ref, N)
    else:
        a_ref = 0.0
        ka = tl.zeros([BLOCK_N], tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    da = tl.zeros([BLOCK_N], tl.float32)
    QD = _descriptor(Q, N, D, sq_n, BLOCK_M, BLOCK_D, TMA)
    DOD = _descriptor(DO, N, DV, sdo_n, BLOCK_M, BLOCK_DV, TMA)
    thr = 0.0
    if SKIP:  # the smallest a of the block's keys
        groups = start_n // G + tl.arange(0, BLOCK_N // G)
        thr = tl.min(tl.load(AMN + bh * tl.cdiv(N, G) + groups, mask=groups < tl.cdiv(N, G), other=float("inf")), 0)
        thr -= SKIP_NATS
    hi = _last_query(CB + bh * tl.cdiv(N, G), thr, diag_end, N, G, SKIP, UNIFORM)
    # the query blocks after the diagonal block first, so that the keys' factor scales their sums alone
    dk, dv, da = _dkdv_inner(dk, dv, da, k, v, ka, offs_n, QD, DOD, A, STAT, DELTA, FRAC, ROFF, a_ref, N, scale,
                             diag_end, hi, sq_n, sq_d, sdo_n, sdo_d, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, POWER, NORMALIZE,
                             ROW_DELTA, HAS_DECAY, False, WDTYPE, TMA)
    if HAS_DECAY and POWER != 3:
        kc = tl.exp2(-ka)
        p_scale, ds_scale = _factored_scales(scale, POWER)
        dk *= (kc * ds_scale)[:, None]
        dv *= (kc * p_scale)[:, None]
        da *= kc * p_scale
    dk, dv, da = _dkdv_inner(dk, dv, da, k, v, ka, offs_n, QD, DOD, A, STAT, DELTA, FRAC, ROFF, a_ref, N, scale,
                             start_n, diag_end, sq_n, sq_d, sdo_n, sdo_d, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, POWER, NORMALIZE,
                             ROW_DELTA, HAS_DECAY, True, WDTYPE, TMA)
    dk_ptrs, dk_mask = _tile(DK, offs_n, offs_d, N, D, sdk_n, sdk_d)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=dk_mask)
    dv_ptrs, dv_mask = _tile(DV_OUT, offs_n, offs_dv, N, DV, sdv_n, sdv_d)
    tl.store(dv_ptrs, dv.to(DV_OUT.dtype.element_ty), mask=dv_mask)
    tl.store(DA + offs_n, da, mask=offs_n < N)


@triton.jit
def _delta_kernel(DO, O, O_OFF, DELTA, ROFF, N, H, sdo_b, sdo_h, sdo_n, sdo_d, so_b, so_h, so_n, so_d,
                  DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """The backward's row vectors when normalising: Delta_i = dO_i . o_i and dO_i . o_off_i (fp32, contiguous
    [B, H, N]), read once from the strided dO, o and o_off without fp32 copies of them."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = _load_rows(_head(DO, bh, H, sdo_b, sdo_h), offs_m, offs_dv, N, DV, sdo_n, sdo_d).to(tl.float32)
    o = _load_rows(_head(O, bh, H, so_b, so_h), offs_m, offs_dv, N, DV, so_n, so_d).to(tl.float32)
    o_off = _load_rows(_head(O_OFF, bh, H, so_b, so_h), offs_m, offs_dv, N, DV, so_n, so_d).to(tl.float32)
    tl.store(DELTA + bh * N + offs_m, tl.sum(do * o, 1), mask=offs_m < N)
    tl.store(ROFF + bh * N + offs_m, tl.sum(do * o_off, 1), mask=offs_m < N)


@triton.jit
def _decay_grad_kernel(DA_Q, DA_K, DG, N, H, sg_b, sg_h, sg_n, BLOCK: tl.constexpr):
    """d g of one sequence from the kernels' two terms of d a (float32, contiguous [B, H, N]): a = cumsum g, so d g
    is the reverse cumulative sum of d a_q + d a_k, in float64 block by block from the end, stored in DG's dtype
    with its strides (g's layout)."""
    bh = tl.program_id(0).to(tl.int64)
    DG = _head(DG, bh, H, sg_b, sg_h)
    carry = tl.zeros([], tl.float64)  # the sum of d a after the current block
    blocks = tl.cdiv(N, BLOCK)
    for i in range(blocks):
        offs = (blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        da = tl.load(DA_Q + bh * N + offs, mask=mask, other=0.0).to(tl.float64) + \
            tl.load(DA_K + bh * N + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(DG + offs * sg_n, (tl.cumsum(da, 0, reverse=True) + carry).to(DG.dtype.element_ty), mask=mask)
        carry += tl.sum(da, 0)


@triton.jit
def _skip_prep_kernel(K, A, KMAX, AMN, N, H, sk_b, sk_h, sk_n, sk_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The keys' largest norm a head (KMAX, zeroed by the caller, atomic maxima) and the smallest a of each group of
    G rows (AMN [B, H, cdiv(N, G)], float64)."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _load_rows(_head(K, bh, H, sk_b, sk_h), offs_m, tl.arange(0, BLOCK_D), N, D, sk_n, sk_d).to(tl.float32)
    tl.atomic_max(KMAX + bh, tl.max(tl.sqrt(tl.sum(k * k, 1)), 0), sem="relaxed")
    a = tl.load(A + bh * N + offs_m, mask=offs_m < N, other=float("inf"))
    groups = tl.program_id(0) * (BLOCK_M // G) + tl.arange(0, BLOCK_M // G)
    tl.store(AMN + bh * tl.cdiv(N, G) + groups, tl.min(tl.reshape(a, [BLOCK_M // G, G]), 1),
             mask=groups < tl.cdiv(N, G))


def _skip_bounds(k, a):
    """For exp with decay (normalised): what the kernels need to skip the pairs whose weight is below e^-SKIP_NATS
    times their row's diagonal weight w_ii (a term of the row's sum): (kmax [B, H], amn, cb, first
    [B, H, cdiv(N, G)]).

    By |q_i.k_j| <= |q_i| max|k|, log(w_ij / w_ii) <= r_i - a_j with r_i = a_i + scale (|q_i| max|k| - q_i.k_i)
    (times 1 + 2^-10 for the roundings). The forward forms r from its rows and keeps its maxima over groups of G
    rows in cb; amn holds the smallest a of each group of G keys. A query block skips the key groups before the
    first whose amn is below its largest r + SKIP_NATS (_first_key), and keeps that group's index for each of its
    groups of rows in first, where the dq kernel starts; a key block skips the query groups after the last whose
    cb reaches its smallest amn - SKIP_NATS (_last_query). No assumption on the sign of g is made.
    Strong decays skip most of a long sequence; weak ones nothing, for the cost of this kernel, r and the vector
    loads (0.5-3 % of forward+backward on an H200, bench/NOTES.md).
    """
    B, H, N, d = k.shape
    groups = triton.cdiv(N, SKIP_GROUP)
    kmax = k.new_zeros(B, H, dtype=torch.float32)
    amn, cb = a.new_empty(B, H, groups), a.new_empty(B, H, groups)
    first = a.new_empty(B, H, groups, dtype=torch.int32)
    rows = max(SKIP_GROUP, 16 if INTERPRET else 8192 // max(16, triton.next_power_of_2(d)))
    _skip_prep_kernel[(triton.cdiv(N, rows), B * H)](k, a, kmax, amn, N, H, *k.stride(), D=d,
                                                     BLOCK_D=max(16, triton.next_power_of_2(d)), G=SKIP_GROUP,
                                                     BLOCK_M=rows)
    return kmax, amn, cb, first


def _meta(q, v, power, normalize, g):
    """Compile-time arguments shared by the three kernels."""
    d, dv = q.shape[-1], v.shape[-1]
    return dict(
        D=d, DV=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        POWER=POWER_CODES[power], NORMALIZE=bool(normalize), HAS_DECAY=g is not None,
        SKIP=power == "exp" and bool(normalize) and g is not None, G=SKIP_GROUP,
        UNIFORM=q.is_cuda and not INTERPRET and torch.cuda.get_device_capability(q.device)[0] >= 8,
        WDTYPE=tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float32,
    )


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _tma(*tensors):
    """Whether the kernels read these [B, H, N, x] views through tensor descriptors (TMA; bench/NOTES.md, session
    34): on Hopper or later (and in the interpreter, which runs them too), for contiguous features and 16-byte
    aligned heads and rows; other views go through pointers. Descriptors made on the device need scratch memory
    from Triton's allocator, a context variable (autograd runs the backward pass in a thread of its own): ours,
    unless the caller set one."""
    if not INTERPRET and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(t.stride(i) * size % 16 for i in range(3)):
            return False
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


def _grid(n, bh, block):
    return lambda meta: (triton.cdiv(n, meta[block]), bh)


def _empty(like, shape, bnhd, dtype=None):
    """An uninitialised [B, H, N, x] tensor of like's dtype (or dtype), stored as [B, N, H, x] when bnhd (so
    that its transpose(1, 2), what the caller of layout "bnhd" gets, is contiguous)."""
    B, H, N, x = shape
    return like.new_empty(B, N, H, x, dtype=dtype).transpose(1, 2) if bnhd else like.new_empty(B, H, N, x, dtype=dtype)


def attention_forward(q, k, v, g, power, normalize, scale, bnhd, out_dtype):
    """The forward kernel on [B, H, N, .] views with any strides: (o, stat, saved, info), saved and info what
    attention_backward takes. stat [B, H, N] float32: the row sums den of an unnormalised power 1 or 2."""
    B, H, N, _ = q.shape
    # a = cumsum g in float64: long sequences with strong decay reach |a| ~ 1e5 and more. The kernels index
    # a and the per-row vectors below as contiguous [B, H, N].
    if g is None:
        a = q.new_empty(1, dtype=torch.float64)
    else:
        a = torch.cumsum(g, dim=-1, dtype=torch.float64, out=q.new_empty(B, H, N, dtype=torch.float64))
    o = _empty(q, v.shape, bnhd, out_dtype)
    stat = q.new_empty(B, H, N, dtype=torch.float32)
    # o without its diagonal term and 1 - P_ii, for the backward (see _bwd_tile); only when normalising
    o_off = _empty(q, v.shape, bnhd) if normalize else o
    frac = torch.empty_like(stat) if normalize else stat
    meta = _meta(q, v, power, normalize, g)
    buckets = (triton.next_power_of_2(N), triton.next_power_of_2(B * H))
    kmax, amn, cb, first = _skip_bounds(k, a) if meta["SKIP"] else (stat, stat, stat, stat)
    _fwd_kernel[_grid(N, B * H, "BLOCK_M")](q, k, v, a, o, stat, o_off, frac, kmax, amn, cb, first, N, H, *buckets,
                                            scale, *q.stride(), *k.stride(), *v.stride(), *o.stride(), TMA=_tma(k, v),
                                            **meta)
    # o and o_off serve only the normalised backward (its Delta): an unnormalised call keeps neither
    saved = (q, k, v, a, o if normalize else None, stat, o_off if normalize else None, frac, amn, cb, first)
    return o, stat, saved, (meta, scale, buckets, bnhd, None if g is None else g.dtype)


def attention_backward(saved, info, do, dden=None):
    """(dq, dk, dv, da) of attention_forward's call from its saved tensors and info, d o (any strides and float
    dtype: read rounded to q's) and, for an unnormalised call, d den or None. da: the gradient of the cumulative
    log decay a = cumsum g as the two kernels' float32 terms (da_q, da_k) [B, H, N], None without decay."""
    q, k, v, a, o, stat, o_off, frac, amn, cb, first = saved
    meta, scale, buckets, bnhd, _ = info
    B, H, N, _ = q.shape
    do = do.to(q.dtype)  # read with its strides (a float32 o's gradient rounded like the inputs)
    if meta["NORMALIZE"]:
        delta, roff = torch.empty_like(stat), torch.empty_like(stat)
        rows = 16 if INTERPRET else 4096 // meta["BLOCK_DV"]  # three fp32 tiles of 4096: no register spills
        _delta_kernel[(triton.cdiv(N, rows), B * H)](do, o, o_off, delta, roff, N, H, *do.stride(), *o.stride(),
                                                    DV=meta["DV"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=rows)
    elif dden is not None:  # each weight is also a term of its row's den: dL/dw_ij gains dL/dden_i
        delta = roff = (-dden).float().contiguous()
    else:
        delta = roff = stat
    row_delta = not meta["NORMALIZE"] and dden is not None
    dq, dk = _empty(q, q.shape, bnhd), _empty(q, k.shape, bnhd)
    dv = _empty(q, v.shape, bnhd)
    da_q = torch.empty_like(stat)
    da_k = torch.empty_like(stat)
    rows = (stat, delta, frac, roff)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _bwd_dq_kernel[_grid(N, B * H, "BLOCK_M")](q, k, v, a, do, *rows, dq, da_q, first, N, H, *buckets, scale,
                                                *strides, *dq.stride(), ROW_DELTA=row_delta, TMA=_tma(k, v), **meta)
    _bwd_dkdv_kernel[_grid(N, B * H, "BLOCK_N")](q, k, v, a, do, *rows, dk, dv, da_k, amn, cb, N, H, *buckets, scale,
                                                  *strides, *dk.stride(), *dv.stride(), ROW_DELTA=row_delta,
                                                  TMA=_tma(q, do), **meta)
    return dq, dk, dv, (da_q, da_k) if meta["HAS_DECAY"] else None


def _decay_grad(da_q, da_k, bnhd, dtype):
    """d g [B, H, N] in dtype (stored as [B, N, H] when bnhd: g's layout then) from attention_backward's d a terms."""
    B, H, N = da_q.shape
    dg = da_q.new_empty(B, N, H, dtype=dtype).transpose(1, 2) if bnhd else da_q.new_empty(B, H, N, dtype=dtype)
    _decay_grad_kernel[(B * H,)](da_q, da_k, dg, N, H, *dg.stride(), BLOCK=16 if INTERPRET else 1024)
    return dg


class _TritonAttention(torch.autograd.Function):
    """q, k, v: [B, H, N, .] views with any strides; o, dq, dk, dv are allocated in the caller's layout (bnhd).
    return_den: o and the row sums den [B, H, N] (float32), the forward's stat of an unnormalised power 1 or 2."""

    @staticmethod
    def forward(ctx, q, k, v, g, power, normalize, scale, bnhd, out_dtype, return_den):
        o, stat, saved, ctx.info = attention_forward(q, k, v, g, power, normalize, scale, bnhd, out_dtype)
        ctx.save_for_backward(*saved)
        return (o, stat) if return_den else o

    @staticmethod
    def backward(ctx, do, dden=None):
        dq, dk, dv, da = attention_backward(ctx.saved_tensors, ctx.info, do, dden)
        dg = None if da is None else _decay_grad(*da, ctx.info[3], ctx.info[-1])
        return dq, dk, dv, dg, None, None, None, None, None, None


def triton_attention(q, k, v, g=None, *, power="2", normalize=True, scale=None, layout="bhnd", out_dtype=None,
                     return_den=False):
    """Causal attention core on the GPU (or under TRITON_INTERPRET=1); same contract as attention_reference.

    layout "bhnd": q, k: [B, H, N, d]; v: [B, H, N, dv]; g: per-token log decay [B, H, N] or None; o [B, H, N, dv].
    layout "bnhd": the same with dims 1 and 2 swapped (q [B, N, H, d], g [B, N, H], o [B, N, H, dv]), the
    layout a projection's output has before any transpose. Inputs may have any strides (no copies are made);
    o and the gradients of q, k, v are contiguous in the given layout. d, dv <= 256; fp32, fp16 or bf16 (k,
    v are cast to q's dtype). Differentiable in q, k, v and g. o in out_dtype, q's dtype by default.
    return_den (unnormalised powers 1 and 2): (o, den), den [B, H, N] float32 in g's layout (kernel.attention).
    """
    q, k, v, g = bhnd_views(layout, q, k, v, g)
    out_dtype = out_dtype or q.dtype
    if q.dtype not in DTYPES:
        raise TypeError(f"triton_attention supports {DTYPES}, got {q.dtype}; use backend='torch' for others")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got d={q.shape[-1]}, dv={v.shape[-1]}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[2] == 0:
        o = q.new_zeros(v.shape, dtype=out_dtype)
        return bhnd_views(layout, o, o.new_zeros(o.shape[:3], dtype=torch.float32)) if return_den else \
            bhnd_views(layout, o)[0]
    B, H = q.shape[:2]
    if B * H > MAX_GRID_HEADS:  # the kernels put batch x heads on the grid's second axis
        if H > MAX_GRID_HEADS:
            raise ValueError(f"at most {MAX_GRID_HEADS} heads per call, got {H}; fold them into the batch")
        step = MAX_GRID_HEADS // H
        # batch slices of the [B, H, N, .] views, put back into the caller's layout (the batch is dim 0 in both)
        parts = [triton_attention(*bhnd_views(layout, q[i:i + step], k[i:i + step], v[i:i + step],
                                              None if g is None else g[i:i + step]),
                                  power=power, normalize=normalize, scale=scale, layout=layout, out_dtype=out_dtype,
                                  return_den=return_den)
                 for i in range(0, B, step)]
        return tuple(torch.cat(p) for p in zip(*parts)) if return_den else torch.cat(parts)
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = _TritonAttention.apply(q, k, v, g, power, bool(normalize), float(scale), layout == "bnhd", out_dtype,
                                 bool(return_den))
    return bhnd_views(layout, *out) if return_den else bhnd_views(layout, out)[0]
