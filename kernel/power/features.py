"""The two products of the chunked form with the symmetric feature map phi, fused so phi never hits HBM.

For blocks of tokens a [T, C, d] (T blocks of C tokens) and phi = kron (D = d (d + 1) / 2 features):
    outer(a, b, w) = phi(a)^T (w b)  [T, D, E]  (chunk states from keys, w the keys' decays; d state from
                                                queries, w = 1)
    apply(a, M)    = phi(a) M        [T, C, E]  (queries read a state, d values from d state)
Blocks of tokens may also be given as [U, C, H, .] with any strides but the columns' (block t = u H + h): views
of a [B, N, H, .] layout (U = B N / C), which the kernels read and write in place; states, weights and the
outputs they allocate are in block order.
The two are adjoint, so their gradients are each other plus one kernel for d a (grad, _grad_kernel), the
kron backward of d loss / d phi(a_t) = M dy_t, never materialised either; d w comes out of the apply of the
outer product's backward. chunk.py's _fused_state_forward and _backward string them together.
On Hopper (sm_90) at d = dv = 64 the outer product and apply run hopper.py's kernels, written in Gluon,
instead: the outer product's the same sums bit for bit in half the steps (a round robin of row pairs, none
discarded), apply's the triangle's steps chained in one accumulator (its rows of the state contiguous, not
gathered); both faster on an H200.
The entries of phi with first index i are c_ij a_i a_j for j >= i (c = 1 on the diagonal, sqrt 2 off it), a
contiguous segment of D starting at e(i) = i d - i (i - 1) / 2. The products walk i = 0..d-1, one tensor-core
product per step:
    outer  step i: rows e(i) + j of the result = (c_ij a_j a_i w)^T b, the transposed factor formed in
           registers from a transposed once per program, for both column tiles of b at once (all j, the
           rows j < i not stored);
    apply and grad read the state as the unpacked symmetric matrix, row (m, j) = packed row (min, max), so
           that one operand of every step is fixed and the step's scalar a_m multiplies its result:
    apply  phi(a) M = sum_m a_m (w a) M[(m, j)] + (1 - 1 / sqrt 2) (a * a) M[(j, j)], w = 1 / sqrt 2 (a pair
           met twice) except across the halves of the head dimension: the steps m >= d / 2 take only
           j >= d / 2 (half-width), so those pairs are met once, with w = sqrt 2;
    grad   d a = sum_m (dy M[(m, j)]^T) * c'_mj a[:, m], c' = 2 on the diagonal, sqrt 2 off it (sqrt 2 in the
           loop, the diagonal's remainder from one product before it).
Scaling each step's operand by a_m instead, so that all steps accumulate in the tensor cores' accumulator, ran
apply and grad 10-20 % faster on an H200 but raced in Triton 3.6's software pipeline: NaN or wrong rows in some
programs, at some warps and stages; with a_m read from a contiguous transposed copy apply no longer raced but ran
1.7x slower, and grad still raced (bench/NOTES.md). tests/test_power_attention.py compares the pipelined kernels
with one-stage runs bit for bit.
Full-width products per m are more tensor-core work than the triangle, but with no per-step row sums they
ran 1.3x (apply) and 3.4x (grad) faster on an H200 (bench/NOTES.md).
For one column of weights (the normaliser z of the state) a column of D is a d x d symmetric matrix:
    gram(a, w) = phi(a)^T w = packed c_ij (a^T diag(w) a)_ij      [T, D]
    quad(a, z) = phi(a) z   = a_c^T Z a_c, Z the unpacked z        [T, C]
one d x d product each (_gram_kernel, _quad_kernel), again adjoint to each other (quad also gives the gradient
in a, 2 Z a_c, from the same product, alone or with the value).
CPU tensors and the "torch" backend take the differentiable PyTorch products at the end of this file
instead (feature_outer, feature_apply: phi materialised with kron_reference; feature_weighted_sum,
feature_dot: the same d x d form as the kernels).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import triton_compat  # noqa: F401  (patches the CPU interpreter when it is on)
from ..kron import kron_indices, kron_reference

try:  # the outer product and apply for Hopper GPUs in Gluon (Triton's lower-level language), Triton 3.6's only
    from . import hopper
except ImportError:
    hopper = None

SQRT2 = tl.constexpr(1.4142135623730951)
INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _segment(i, D: tl.constexpr):
    """Offset such that feature (i, j), j >= i, is row start + j of the state."""
    return i * D - i * (i - 1) // 2 - i


@triton.jit
def _dot(x, y, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: a true float32 product, not tf32
        return tl.dot(x, y, input_precision="ieee")
    return tl.dot(x, y)


@triton.jit
def _dot_add(x, y, acc, IEEE: tl.constexpr):
    """acc + x y, accumulated in the product."""
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee")
    return tl.dot(x, y, acc)


@triton.jit
def _block_start(PTR, t_, H2, S1, S2):
    """Block t_ = u H2 + h of a blocks tensor [U, C, H2, .] with strides S1 (u) and S2 (h): its first token."""
    return PTR + (t_ // H2) * S1 + (t_ % H2) * S2


@triton.jit
def _load_rows(BASE, c, cmask, ST, cols, W1):
    """Rows c (token stride ST), columns cols (< W1) of the block starting at BASE."""
    return tl.load(BASE + c[:, None] * ST + cols[None, :], mask=cmask[:, None] & (cols[None, :] < W1), other=0.0)


@triton.jit
def _store_rows(OUT, out, t_, rows, ok, cols, E, E1, NF):
    """Rows `rows` (where ok), columns cols (< E1) of block t_ of a [T, NF, E] tensor."""
    tl.store(OUT + t_ * NF * E + rows[:, None] * E + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < E1))


@triton.jit
def _outer_kernel(A, SA1, SA2, SA, B, SB1, SB2, SB, W, OUT, H2, C, E, E_MAIN, D: tl.constexpr, NF,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_MAIN: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                  BLOCK_I: tl.constexpr, ONE_BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """phi(a)^T (w b) with token weights w, for BLOCK_I values of i, the state's columns in two tiles, [0, E_MAIN)
    and [E_MAIN, E). Every step takes all d rows j, the j < i among them computed and not stored: for i past d / 2
    only half of them are needed, but a half-width step of 32 rows is too short for Hopper's warp-group product
    (it took the older mma.sync, its fixed operand loaded into registers at every step), and at d = 64 the
    full-width steps ran 12 % faster on an H200 (1 % with token weights; bench/NOTES.md)."""
    t_ = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BLOCK_I
    A = _block_start(A, t_, H2, SA1, SA2)
    B = _block_start(B, t_, H2, SB1, SB2)
    j = tl.arange(0, BLOCK_D)
    c = tl.arange(0, BLOCK_C)
    em = tl.arange(0, BLOCK_MAIN)
    if BLOCK_TAIL > 0:
        et = E_MAIN + tl.arange(0, BLOCK_TAIL)
    # The factor a_j a_i is formed in a's dtype: in bf16 one rounding of the exact product, as a float32
    # product rounded to bf16 would give, at half the registers and no conversions; c_ij scales the float32
    # result. The token weights w are rounded into one operand: w b, once, for a chunk in one block (the weighted
    # values as they were before the weights moved in here; b goes to shared memory and w leaves the registers,
    # which it held through every step when it scaled a_i), a_i w per step for a longer chunk (b is loaded per
    # step there).
    if ONE_BLOCK:  # the chunk is one block of tokens: a (read coalesced, transposed once), b (weighted) loaded once
        a_t = tl.trans(_load_rows(A, c, c < C, SA, j, D))
        b = _load_rows(B, c, c < C, SB, em, E_MAIN)
        if BLOCK_TAIL > 0:
            b_tail = _load_rows(B, c, c < C, SB, et, E)
        w = tl.load(W + t_ * C + c, mask=c < C, other=0.0)[:, None]
        b = (b.to(tl.float32) * w).to(B.dtype.element_ty)
        if BLOCK_TAIL > 0:
            b_tail = (b_tail.to(tl.float32) * w).to(B.dtype.element_ty)
        ai = tl.load(A + c * SA + i0, mask=(c < C) & (i0 < D), other=0.0)
    for ii in range(BLOCK_I):
        i = i0 + ii
        coef = tl.where(j == i, 1.0, SQRT2)[:, None]
        if ONE_BLOCK:
            # the next step's column, loaded a step ahead: it feeds the product's register operand, which Triton's
            # pipeline does not prefetch, so its load stood before every product (bench/NOTES.md, session 30)
            ai_next = tl.load(A + c * SA + i + 1, mask=(c < C) & (i + 1 < D) & (ii + 1 < BLOCK_I), other=0.0)
            p_t = (a_t * ai[None, :]).to(b.dtype)  # formed once for both column tiles
            out = _dot(p_t, b, IEEE)
            if BLOCK_TAIL > 0:
                out_tail = _dot(p_t, b_tail, IEEE)
            ai = ai_next
        else:  # a longer chunk (a stateful prefill) in blocks of tokens, so that it fits in shared memory
            out = tl.zeros([BLOCK_D, BLOCK_MAIN], tl.float32)
            if BLOCK_TAIL > 0:
                out_tail = tl.zeros([BLOCK_D, BLOCK_TAIL], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cb = c0 + c
                ai = tl.load(A + cb * SA + i, mask=(cb < C) & (i < D), other=0.0)
                ai = (ai.to(tl.float32) * tl.load(W + t_ * C + cb, mask=cb < C, other=0.0)).to(ai.dtype)
                a_t = tl.trans(_load_rows(A, cb, cb < C, SA, j, D))
                p_t = (a_t * ai[None, :]).to(B.dtype.element_ty)
                out += _dot(p_t, _load_rows(B, cb, cb < C, SB, em, E_MAIN), IEEE)
                if BLOCK_TAIL > 0:
                    out_tail += _dot(p_t, _load_rows(B, cb, cb < C, SB, et, E), IEEE)
        rows = _segment(i, D) + j
        ok = (j >= i) & (j < D) & (i < D)
        _store_rows(OUT, out * coef, t_, rows, ok, em, E, E_MAIN, NF)
        if BLOCK_TAIL > 0:
            _store_rows(OUT, out_tail * coef, t_, rows, ok, et, E, E, NF)


@triton.jit
def _sym_rows(j, m, D: tl.constexpr):
    """Packed rows of the features (m, j) for every j: (m, j) or (j, m), whichever has the smaller index first."""
    return _segment(tl.minimum(j, m), D) + tl.maximum(j, m)


@triton.jit
def _sym_block(M, t_, NF, E, j, m, D: tl.constexpr, e, emask):
    """Rows (m, j) of block t_'s state M [T, NF, E] for the given j (m a step's index, or a vector as j), columns
    e (where emask)."""
    return tl.load(M + t_ * NF * E + _sym_rows(j, m, D)[:, None] * E + e[None, :], mask=(j < D)[:, None] & emask,
                   other=0.0)


@triton.jit
def _apply_kernel(A, SA1, SA2, SA, M, OUT, SO1, SO2, SO, W, B, SB1, SB2, SB, DW, ADD, SD1, SD2, SD, TILE0, H2, C, E,
                  E0, E1, D: tl.constexpr, NF, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                  LOW: tl.constexpr, BLOCK_E: tl.constexpr, HAS_W: tl.constexpr, HAS_ADD: tl.constexpr,
                  IEEE: tl.constexpr):
    """Columns [E0, E1) of phi(a) M for a block of tokens, as sum_m a_m (w a) M[(m, j) or (j, m)] plus
    (1 - 1 / sqrt 2) (a * a) M[(j, j)] for the diagonal. A pair j != m inside one half of the head dimension
    ([0, SPLIT) or [SPLIT, d)) is met twice, at m and at j, each with w = 1 / sqrt 2; the steps m >= SPLIT run
    on the upper half only (half-width products, a quarter of the work saved), so a pair across the halves is
    met once, at its lower index, with w = sqrt 2. HAS_W (the backward of the outer product with token weights
    W): each token's row times its weight, and the row's partial sum <phi(a) M, b> over these columns (its
    d W) in DW[TILE0 + its column program]. HAS_ADD: plus ADD [T, C, E] (another term of the same gradient)
    before the one rounding."""
    tiles = tl.cdiv(C, BLOCK_C)  # a block's token tiles run side by side, so that its state is read once from HBM
    t_ = (tl.program_id(0) // tiles).to(tl.int64)
    A = _block_start(A, t_, H2, SA1, SA2)
    c = (tl.program_id(0) % tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    e = E0 + tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = c < C
    emask = e[None, :] < E1
    j = tl.arange(0, BLOCK_D)
    # Fixed operands, each scaled by one constant so that Triton keeps them in registers (a per-column scale
    # left the operand in shared memory, read again at every step): the lower half's columns, and the upper
    # half's twice, with the weights of the steps below and above SPLIT
    jl = tl.arange(0, SPLIT)
    a_lo = (_load_rows(A, c, cmask, SA, jl, D).to(tl.float32) * INV_SQRT2).to(M.dtype.element_ty)
    acc = tl.zeros([BLOCK_C, BLOCK_E], tl.float32)
    if SPLIT < BLOCK_D:
        jh = SPLIT + tl.arange(0, BLOCK_D - SPLIT)
        a_h = _load_rows(A, c, cmask, SA, jh, D).to(tl.float32)
        a_across, a_high = (a_h * SQRT2).to(M.dtype.element_ty), (a_h * INV_SQRT2).to(M.dtype.element_ty)
    for m in range(LOW):  # min(SPLIT, d)
        y = _dot(a_lo, _sym_block(M, t_, NF, E, jl, m, D, e, emask), IEEE)
        if SPLIT < BLOCK_D:
            y = _dot_add(a_across, _sym_block(M, t_, NF, E, jh, m, D, e, emask), y, IEEE)
        am = tl.load(A + c * SA + m, mask=cmask, other=0.0).to(tl.float32)
        acc += am[:, None] * y
    if SPLIT < BLOCK_D:
        for m in range(SPLIT, D):
            am = tl.load(A + c * SA + m, mask=cmask, other=0.0).to(tl.float32)
            acc += am[:, None] * _dot(a_high, _sym_block(M, t_, NF, E, jh, m, D, e, emask), IEEE)
    diag = _sym_block(M, t_, NF, E, j, j, D, e, emask)  # rows (j, j)
    a = _load_rows(A, c, cmask, SA, j, D).to(tl.float32)  # loaded again: not held in registers through the loops
    acc += _dot((a * a * (1.0 - INV_SQRT2)).to(diag.dtype), diag, IEEE)
    if HAS_W:
        b = tl.load(_block_start(B, t_, H2, SB1, SB2) + c[:, None] * SB + e[None, :], mask=cmask[:, None] & emask,
                    other=0.0)
        tile = TILE0 + tl.program_id(1)
        tl.store(DW + (tile * (tl.num_programs(0) // tiles) + t_) * C + c, tl.sum(acc * b.to(tl.float32), axis=1),
                 mask=cmask)
        acc *= tl.load(W + t_ * C + c, mask=cmask, other=0.0)[:, None]
    if HAS_ADD:
        add = _block_start(ADD, t_, H2, SD1, SD2)
        acc += tl.load(add + c[:, None] * SD + e[None, :], mask=cmask[:, None] & emask, other=0.0).to(tl.float32)
    tl.store(_block_start(OUT, t_, H2, SO1, SO2) + c[:, None] * SO + e[None, :], acc.to(OUT.dtype.element_ty),
             mask=cmask[:, None] & emask)


@triton.jit
def _grad_rows(M, dy, t_, rows, rmask, E, NF, E0, E1, BLOCK_E: tl.constexpr, IEEE: tl.constexpr):
    """[C, j] block of dy m[rows, E0:E1]^T, dy the [C, BLOCK_E] columns E0:E1 of d y."""
    e = E0 + tl.arange(0, BLOCK_E)
    m = tl.load(M + t_ * NF * E + rows[:, None] * E + e[None, :], mask=rmask[:, None] & (e[None, :] < E1), other=0.0)
    return _dot(dy, tl.trans(m), IEEE)


@triton.jit
def _grad_kernel(A, SA1, SA2, SA, M, DY, SY1, SY2, SY, W, ADD, SD1, SD2, SD, ADD2, SE1, SE2, SE, DA, SG1, SG2, SG,
                 H2, C, E, E_MAIN, D: tl.constexpr, NF, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_MAIN: tl.constexpr, BLOCK_TAIL: tl.constexpr, HAS_W: tl.constexpr, N_ADD: tl.constexpr,
                 IEEE: tl.constexpr):
    """d a for a block of tokens, plus ADD and ADD2 (other terms of the same gradient: the first N_ADD of them),
    rounded once to a's dtype; the state's columns in two tiles, [0, E_MAIN) and [E_MAIN, E). HAS_W: the product
    had token weights W, so each token's d y, hence its row of d a, is W times."""
    tiles = tl.cdiv(C, BLOCK_C)  # a block's token tiles side by side (as _apply_kernel's)
    t_ = (tl.program_id(0) // tiles).to(tl.int64)
    A = _block_start(A, t_, H2, SA1, SA2)
    DY = _block_start(DY, t_, H2, SY1, SY2)
    c = (tl.program_id(0) % tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    j = tl.arange(0, BLOCK_D)
    jmask = j < D
    # 2 dy, the same for every m: scaled (exactly) so that Triton keeps it in registers, where a plain load stays
    # in shared memory and is read again by every step's product
    dy = (_load_rows(DY, c, cmask, SY, tl.arange(0, BLOCK_MAIN), E_MAIN).to(tl.float32) * 2.0).to(DY.dtype.element_ty)
    if BLOCK_TAIL > 0:
        dy_tail = (_load_rows(DY, c, cmask, SY, E_MAIN + tl.arange(0, BLOCK_TAIL), E).to(tl.float32) *
                   2.0).to(DY.dtype.element_ty)
    # c' = sqrt 2 for every m in the loop, and the diagonal's remainder (2 - sqrt 2) a_j dy M[(j, j)] from one
    # product before it: a per-step weight of column m (a compare, a select and a multiply per element) made this
    # kernel bound by its integer and logic instructions on an H200 (ncu, bench/NOTES.md). With 2 dy, the sum is
    # scaled by sqrt 2 / 2 once after the loop.
    diag = _segment(j, D) + j
    g = _grad_rows(M, dy, t_, diag, jmask, E, NF, 0, E_MAIN, BLOCK_MAIN, IEEE)
    if BLOCK_TAIL > 0:
        g += _grad_rows(M, dy_tail, t_, diag, jmask, E, NF, E_MAIN, E, BLOCK_TAIL, IEEE)
    da = (SQRT2 - 1.0) * _load_rows(A, c, cmask, SA, j, D).to(tl.float32) * g  # (2 - sqrt 2) / sqrt 2
    for m in range(D):
        rows = _sym_rows(j, m, D)
        g = _grad_rows(M, dy, t_, rows, jmask, E, NF, 0, E_MAIN, BLOCK_MAIN, IEEE)
        if BLOCK_TAIL > 0:
            g += _grad_rows(M, dy_tail, t_, rows, jmask, E, NF, E_MAIN, E, BLOCK_TAIL, IEEE)
        am = tl.load(A + c * SA + m, mask=cmask, other=0.0).to(tl.float32)
        da += am[:, None] * g
    da *= INV_SQRT2
    if HAS_W:
        da *= tl.load(W + t_ * C + c, mask=cmask, other=0.0)[:, None]
    if N_ADD > 0:
        da += _load_rows(_block_start(ADD, t_, H2, SD1, SD2), c, cmask, SD, j, D).to(tl.float32)
    if N_ADD > 1:
        da += _load_rows(_block_start(ADD2, t_, H2, SE1, SE2), c, cmask, SE, j, D).to(tl.float32)
    tl.store(_block_start(DA, t_, H2, SG1, SG2) + c[:, None] * SG + j[None, :], da.to(DA.dtype.element_ty),
             mask=cmask[:, None] & jmask[None, :])


@triton.jit
def _gram_kernel(A, SA1, SA2, SA, W, OUT, H2, C, D: tl.constexpr, NF, BLOCK_C: tl.constexpr,
                 BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """OUT[t] = phi(a)^T w, packed: c_ij (a^T diag(w) a)_ij for i <= j, one d x d product per block of tokens."""
    t_ = tl.program_id(0).to(tl.int64)
    A = _block_start(A, t_, H2, SA1, SA2)
    j = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        a = _load_rows(A, c, c < C, SA, j, D)
        w = tl.load(W + t_ * C + c, mask=c < C, other=0.0)
        acc += _dot(tl.trans(a), (a.to(tl.float32) * w[:, None]).to(a.dtype), IEEE)
    i2, j2 = j[:, None], j[None, :]
    tl.store(OUT + t_ * NF + _segment(i2, D) + j2, acc * tl.where(i2 == j2, 1.0, SQRT2), mask=(j2 >= i2) & (j2 < D))


@triton.jit
def _quad_kernel(A, SA1, SA2, SA, Z, S, OUT, VALUE, H2, C, D: tl.constexpr, NF, BLOCK_C: tl.constexpr,
                 BLOCK_D: tl.constexpr, GRAD: tl.constexpr, HAS_VALUE: tl.constexpr, IEEE: tl.constexpr):
    """With Z the symmetric d x d matrix of a packed z (phi(a) . z = a^T Z a: Z_jj = z_jj, Z_jm = z_jm / sqrt 2),
    for a block of tokens: VALUE[t, c] = a_c^T Z a_c (HAS_VALUE), and with GRAD its gradient times s_c,
    OUT[t, c] = 2 s_c Z a_c: one product Z a_c for both."""
    t_ = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    j = tl.arange(0, BLOCK_D)
    i2, j2 = j[:, None], j[None, :]
    z = tl.load(Z + t_ * NF + _sym_rows(i2, j2, D), mask=(i2 < D) & (j2 < D), other=0.0)
    a = _load_rows(_block_start(A, t_, H2, SA1, SA2), c, cmask, SA, j, D)
    y = _dot(a, (z * tl.where(i2 == j2, 1.0, INV_SQRT2)).to(a.dtype), IEEE)
    if GRAD:
        s = tl.load(S + t_ * C + c, mask=cmask, other=0.0)
        tl.store(OUT + t_ * C * D + c[:, None] * D + j[None, :], (2.0 * s[:, None] * y).to(OUT.dtype.element_ty),
                 mask=cmask[:, None] & (j[None, :] < D))
    if HAS_VALUE:
        tl.store(VALUE + t_ * C + c, tl.sum(y * a.to(tl.float32), axis=1), mask=cmask)


def _column_tiles(E):
    """[E0, E1) windows of the state's columns: the largest power of two (at least 16) first, then the rest,
    so that E = dv + 1 = 80 costs 64 + 16 columns instead of 128."""
    main = max(16, 1 << (E.bit_length() - 1))
    return [(0, min(main, E))] + ([(main, E)] if E > main else [])


def _main_and_tail(E):
    """(E_MAIN, BLOCK_MAIN, BLOCK_TAIL) of kernels that take both column tiles in one program (BLOCK_TAIL 0: one
    tile)."""
    tiles = _column_tiles(E)
    tail = _block(tiles[1][1] - tiles[1][0], 1 << 30) if len(tiles) > 1 else 0
    return tiles[0][1], _block(tiles[0][1], 1 << 30), tail


def _block(width, cap=64):
    return min(cap, max(16, triton.next_power_of_2(width)))


def _split(block_d):
    """First m of apply's half-width steps: half of the head block, when that still makes a 16-wide tile."""
    return block_d // 2 if block_d >= 32 else block_d


# Launch constants of the three products: steps of i per outer program (BLOCK_I) or tokens per apply and grad
# program (BLOCK_C, at most C), warps and pipeline stages; the fastest of the sweeps in bench/NOTES.md (H200,
# C = 256, d = dv = 64, bf16) among those equal bit for bit to their one-stage runs (no pipeline race). The
# normaliser kernels are small: NORMALISER_WARPS.
OUTER = dict(BLOCK_I=64, NUM_WARPS=4, NUM_STAGES=3)
APPLY = dict(BLOCK_C=128, NUM_WARPS=8, NUM_STAGES=4)
GRAD = dict(BLOCK_C=128, NUM_WARPS=8, NUM_STAGES=4)
NORMALISER_WARPS = 4


def _blocks(x, heads):
    """x as a blocks tensor [U, C, heads, E] (block t = u heads + h): a 4-d one as it is (any strides but the
    columns'), a [T, C, E] one as T contiguous blocks in that order."""
    if x.dim() == 4:
        if x.shape[2] != heads or x.stride(3) != 1:
            raise ValueError(f"blocks of {heads} heads with contiguous columns expected, got shape {tuple(x.shape)} "
                             f"strides {x.stride()}")
        return x
    T, C, E = x.shape
    return x.view(T // heads, heads, C, E).transpose(1, 2)


def _strides(x):
    """(u, h, token) strides of a blocks tensor: what the kernels' _block_start and _load_rows take."""
    return x.stride(0), x.stride(2), x.stride(1)


def _shape(a):
    """(T, C, d, heads) of the blocks a: [T, C, d] or [U, C, heads, d]."""
    if a.dim() == 4:
        U, C, heads, d = a.shape
        return U * heads, C, d, heads
    T, C, d = a.shape
    return T, C, d, 1


def outer(a, b, w=None):
    """phi(a)^T b, or phi(a)^T (w b) with token weights w [T, C] (float32): a [T, C, d], b [T, C, E] in a's
    dtype, either also as blocks [U, C, heads, .] (views of a [B, N, H, .] layout; block t = u heads + h, the
    order of w and of the result)."""
    T, C, d, heads = _shape(a)
    a, b = _blocks(a, heads), _blocks(b, heads)
    E = b.shape[-1]
    nf = d * (d + 1) // 2
    out = torch.empty(T, nf, E, dtype=b.dtype, device=a.device)
    if w is None:  # unit weights, exact: Triton lays the weighted kernel's loop out faster (bench/NOTES.md)
        w = torch.ones(T, C, dtype=torch.float32, device=a.device)
    if hopper is not None and C <= hopper.OUTER_MAX_C and hopper.applies(a, b):
        hopper.launch_outer(a, _strides(a), b, _strides(b), w, out, heads, C)
        return out
    e_main, block_main, block_tail = _main_and_tail(E)
    block_c, block_d = _block(C, 256), _block(d, 1 << 30)
    block_i = min(OUTER["BLOCK_I"], block_d)
    _outer_kernel[(T, triton.cdiv(d, block_i))](a, *_strides(a), b, *_strides(b), w, out, heads,
                                                C, E, e_main, D=d, NF=nf, BLOCK_C=block_c, BLOCK_D=block_d,
                                                BLOCK_MAIN=block_main, BLOCK_TAIL=block_tail,
                                                BLOCK_I=block_i, ONE_BLOCK=C <= block_c,
                                                IEEE=a.dtype == torch.float32, num_warps=OUTER["NUM_WARPS"],
                                                num_stages=OUTER["NUM_STAGES"])
    return out


def apply(a, m, out_dtype, w=None, b=None, add=None, out=None):
    """phi(a) m in out_dtype (a [T, C, d], m [T, D, E] in a's dtype); with token weights w and b (the backward of
    the weighted outer product: m its d out) the pair (w phi(a) m, <phi(a) m, b> per token in float32); plus add
    ([T, C, E], another term of the same gradient) before the one rounding when given. a, b, add may be blocks
    [U, C, heads, .] (outer); out: where to write the result (blocks or [T, C, E], out_dtype), a new [T, C, E]
    by default."""
    T, C, d, heads = _shape(a)
    E = m.shape[-1]
    result = torch.empty(T, C, E, dtype=out_dtype, device=a.device) if out is None else out
    a, dst = _blocks(a, heads), _blocks(result, heads)
    b = a if b is None else _blocks(b, heads)
    add_ = a if add is None else _blocks(add, heads)
    if hopper is not None and hopper.applies(a, m):
        dw = a if w is None else torch.empty(T, C, dtype=torch.float32, device=a.device)
        hopper.launch_apply(a, _strides(a), m, dst, _strides(dst), a if w is None else w, b, _strides(b), dw, add_,
                            _strides(add_), heads, C, w is not None, add is not None)
        return result if w is None else (result, dw)
    block_c, block_d = _block(C, APPLY["BLOCK_C"]), _block(d, 1 << 30)
    split = _split(block_d)
    windows = [(e0, e1, _block(e1 - e0)) for e0, e1 in _column_tiles(E)]
    counts = [triton.cdiv(e1 - e0, block_e) for e0, e1, block_e in windows]
    dw = torch.empty(sum(counts) if w is not None else 0, T, C, dtype=torch.float32, device=a.device)  # per tile
    for (e0, e1, block_e), tile0 in zip(windows, [sum(counts[:i]) for i in range(len(counts))]):
        grid = (T * triton.cdiv(C, block_c), triton.cdiv(e1 - e0, block_e))
        _apply_kernel[grid](a, *_strides(a), m, dst, *_strides(dst), a if w is None else w, b, *_strides(b), dw, add_,
                            *_strides(add_), tile0, heads, C, E, e0, e1, D=d, NF=m.shape[1], BLOCK_C=block_c,
                            BLOCK_D=block_d, SPLIT=split, LOW=min(split, d), BLOCK_E=block_e, HAS_W=w is not None,
                            HAS_ADD=add is not None, IEEE=a.dtype == torch.float32,
                            num_warps=APPLY["NUM_WARPS"], num_stages=APPLY["NUM_STAGES"])
    if w is None:
        return result
    return result, dw[0] if dw.shape[0] == 1 else dw.sum(0)


def grad(a, m, dy, w=None, adds=(), out=None):
    """d a of <phi(a) m, dy> (times w per token with token weights w), plus adds (at most two [T, C, d] tensors,
    other terms of the same gradient; None entries skipped), rounded once to a's dtype: a [T, C, d]; m [T, D, E]
    and dy [T, C, E] in a's dtype. a, dy, adds may be blocks [U, C, heads, .] (outer); out: where to write d a
    (blocks or [T, C, d]), a new [T, C, d] by default."""
    T, C, d, heads = _shape(a)
    E = m.shape[-1]
    adds = [_blocks(x, heads) for x in adds if x is not None]
    if len(adds) > 2:
        raise ValueError(f"grad adds at most two terms, got {len(adds)}")
    da = torch.empty(T, C, d, dtype=a.dtype, device=a.device) if out is None else out
    a, dy, dst = _blocks(a, heads), _blocks(dy, heads), _blocks(da, heads)
    e_main, block_main, block_tail = _main_and_tail(E)
    block_c = _block(C, GRAD["BLOCK_C"])
    add, add2 = (adds + [a, a])[:2]
    _grad_kernel[(T * triton.cdiv(C, block_c),)](a, *_strides(a), m, dy, *_strides(dy), a if w is None else w,
                                                  add, *_strides(add), add2, *_strides(add2), dst, *_strides(dst),
                                                  heads, C, E, e_main, D=d, NF=m.shape[1], BLOCK_C=block_c,
                                                  BLOCK_D=_block(d, 1 << 30), BLOCK_MAIN=block_main,
                                                  BLOCK_TAIL=block_tail, HAS_W=w is not None, N_ADD=len(adds),
                                                  IEEE=a.dtype == torch.float32, num_warps=GRAD["NUM_WARPS"],
                                                  num_stages=GRAD["NUM_STAGES"])
    return da


def gram(a, w):
    """phi(a)^T w per block (float32): a [T, C, d] (or blocks, as outer's), w [T, C] float32."""
    T, C, d, heads = _shape(a)
    a = _blocks(a, heads)
    out = torch.empty(T, d * (d + 1) // 2, dtype=torch.float32, device=a.device)
    _gram_kernel[(T,)](a, *_strides(a), w, out, heads, C, D=d, NF=out.shape[1], BLOCK_C=_block(C),
                       BLOCK_D=_block(d, 1 << 30), IEEE=a.dtype == torch.float32, num_warps=NORMALISER_WARPS)
    return out


def quad(a, z, s=None, value=False):
    """phi(a) . z per token (float32, [T, C]), or with s [T, C] its gradient times s, 2 s Z a (in a's dtype, rounded
    once, [T, C, d]), or with s and value=True the pair (gradient times s, phi(a) . z) from one launch: a [T, C, d]
    (or blocks, as outer's), z [T, D] float32."""
    T, C, d, heads = _shape(a)
    a = _blocks(a, heads)
    grad_out = torch.empty(T, C, d, dtype=a.dtype, device=a.device) if s is not None else None
    dot = torch.empty(T, C, dtype=torch.float32, device=a.device) if s is None or value else None
    block_c = _block(C, 128)
    # z stands in for the pointers a launch does not use (s, the gradient, the value)
    _quad_kernel[(T, triton.cdiv(C, block_c))](a, *_strides(a), z, *(z if x is None else x for x in (s, grad_out, dot)),
                                               heads, C, D=d, NF=z.shape[1], BLOCK_C=block_c,
                                               BLOCK_D=_block(d, 1 << 30), GRAD=s is not None,
                                               HAS_VALUE=dot is not None, IEEE=a.dtype == torch.float32,
                                               num_warps=NORMALISER_WARPS)
    if s is None:
        return dot
    return (grad_out, dot) if value else grad_out


@functools.lru_cache(maxsize=None)
def _symmetric_tables(d: int, device: torch.device):
    """(packed, c, unpacked, weight) for the PyTorch normaliser products: the flat [d, d] positions i d + j of
    kron's pairs (i <= j) and their scales c_ij; the packed row of every [d, d] entry (min(i, j), max(i, j)) and
    the [d, d] weights such that phi(a) . z == a^T Z a with Z = z[unpacked] * weight for any packed z [D]: 1 on
    the diagonal, c_ij / 2 off it (the two entries of a pair share its c_ij z). All float64; flat indices, so
    the products index with index_select, whose backward is an index_add, not the sort of advanced indexing's."""
    i, j, c = kron_indices(d, device, torch.float64)
    unpacked = torch.empty(d, d, dtype=torch.long, device=device)
    unpacked[i, j] = unpacked[j, i] = torch.arange(i.numel(), device=device)
    weight = torch.empty(d, d, dtype=torch.float64, device=device)
    weight[i, j] = weight[j, i] = torch.where(i == j, 1.0, c / 2)
    return i * d + j, c, unpacked.flatten(), weight


# The PyTorch products (differentiable by autograd) run in a's dtype, as the kernels do (bf16 operands, float32
# sums); the normaliser's return float32 (float64 for float64 a).


def feature_weighted_sum(a, w, *, power: str):
    """phi(a)^T w per block: a [T, C, d], w [T, C] -> [T, D] (the normaliser column of the chunk states), from
    the d x d product a^T (w a) packed by kron's index pairs: one small product, not D columns."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    aw = a * w.to(a.dtype)[..., None]
    if power == "1":
        return aw.sum(1, dtype=compute)
    packed, c, _, _ = _symmetric_tables(a.shape[-1], a.device)
    return (a.transpose(1, 2) @ aw).flatten(1).index_select(1, packed).to(compute) * c.to(compute)


def feature_dot(a, z, *, power: str):
    """phi(a) z per block: a [T, C, d], z [T, D] -> [T, C] (the normaliser of the state's share), as the
    quadratic form a^T Z a of z unpacked to a symmetric d x d matrix."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    if power == "1":
        return (a @ z.to(a.dtype)[..., None]).squeeze(-1).to(compute)
    d = a.shape[-1]
    _, _, unpacked, weight = _symmetric_tables(d, a.device)
    Z = (z.index_select(1, unpacked).view(-1, d, d) * weight.to(z.dtype)).to(a.dtype)
    return ((a @ Z).to(compute) * a.to(compute)).sum(-1)


def feature_outer(a, b, w=None, *, power: str):
    """phi(a)^T (w b) per block: a [T, C, d], b [T, C, E], token weights w [T, C] or None -> [T, D, E];
    phi(a) = a for power "1"; w b formed in b's dtype."""
    if w is not None:
        b = b * w.to(b.dtype)[..., None]
    return (a if power == "1" else kron_reference(a)).transpose(1, 2) @ b


def feature_apply(a, m, *, power: str):
    """phi(a) m per block: a [T, C, d], m [T, D, E] -> [T, C, E]; phi(a) = a for power "1"."""
    return (a if power == "1" else kron_reference(a)) @ m
