"""Two of features.py's products for Hopper (sm_90), in Gluon: the outer product phi(a)^T (w b) for chunks of 256
tokens or fewer, and the apply phi(a) M (with its token weights and added term) for any number of tokens.

Gluon (Triton's lower-level language) states what Triton chooses for itself: where each operand lives, how a
result is laid out for its store, when a product waits. Both kernels are for d = dv = 64 and faster on an H200
than features.py's Triton kernels (bench/NOTES.md); features.outer and features.apply take them where they
apply (`applies`) and the Triton kernels everywhere else. The interpreter cannot run Gluon: the CPU tests check
the Triton kernels, the GPU tests check these against them and float64 (tests/test_power_attention.py), and
tests/test_compile.py compiles them for sm_90 on any machine.

The outer product computes what features._outer_kernel computes, bit for bit (the same products a_i a_j rounded
once, the same tensor-core sums), in d / 2 + 1 steps of 64 rows, none discarded: step s pairs row r of a^T with row
(r + s) mod d (a round robin: the pairs at distance s; at s = d / 2 each pair comes twice and the second 32 rows
are not stored), so its register operand is a^T times a^T turned by s rows, read from a copy of a^T stacked twice in
shared memory, its rows padded so that reads at any row offset meet no bank conflicts. The product's result rows
are the state's rows e(min) + max, rounded in the product's layout, passed through shared memory once and stored
in 16-byte rows. (Triangle steps of 64 - i rows each needed 48 products a chunk with a third of their rows
discarded, and ran ~7 % slower on an H200, bench/NOTES.md.)

The apply is the outer product's adjoint by triangle steps: sqrt 2 sum_{i <= j} a_i a_j M[e(i) + j] +
(1 - sqrt 2) (a * a) M[(j, j)], step i's register operand a scaled per token by a_i (a_i a_j rounded once, to
bf16), its rows of M contiguous (e(i) .. e(i) + 63, the rows j < i read as zeros), every step chained in one
float32 accumulator; the steps past d / 2, which need only the upper half of a, two to a product (a's upper half
twice, scaled by a_i and a_(i+1)): 48 products. (The round robin here, its operand's window turned along the
product's inner dimension, odd turns from a second copy, ran slower: 0.53-0.59 ms against 0.42-0.44,
bench/NOTES.md.) Its rows stream into a ring in shared memory (cp.async) several steps ahead, GROUP steps to a
barrier. features._apply_kernel instead gathers the rows (m, j) of the unpacked symmetric state and scales each
step's float32 result: the sums differ in their roundings (both within 3e-3 of float64 at the bench shape).
"""
from __future__ import annotations

import torch
import triton

if not triton.__version__.startswith("3.6."):  # Gluon is experimental; features.py then keeps its Triton kernels
    raise ImportError(f"kernel/power/hopper.py is written for Gluon as Triton 3.6 ships it, not {triton.__version__}")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,  # noqa: E402
                                                            warpgroup_mma_wait)

SQRT2 = gl.constexpr(1.4142135623730951)
HEAD = 64  # d and dv these kernels are written for
OUTER_MAX_C = 256  # the outer product holds a chunk in one program
NUM_WARPS = 4  # the outer product: one warp group, the product's 64 rows
WINDOW_PAD = gl.constexpr(8)  # elements after each row of the outer product's stacked a^T: conflict-free windows
# the apply: tokens a program, warps, ring slots, steps a barrier; the fastest at C = 256 on an H200 (bench/NOTES.md)
APPLY = dict(BLOCK_C=128, NUM_WARPS=8, STAGES=8, GROUP=2)


def applies(a, b):
    """Whether these kernels may run on a and b (a feature product's two operands): bf16 or fp16 on an sm_90 GPU,
    d = dv = 64 (the outer product also needs chunks of at most OUTER_MAX_C tokens)."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)
            and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
            and a.shape[-1] == HEAD and b.shape[-1] == HEAD)


@gluon.jit
def _segment(i, D: gl.constexpr):
    """Offset such that feature (i, j), j >= i, is row start + j of the state (features._segment)."""
    return i * D - i * (i - 1) // 2 - i


@gluon.jit
def _pair_rows(s, r, D: gl.constexpr):
    """Packed row of the state's feature (min, max) of r and (r + s) mod d: the outer product's step s, row r."""
    o = (r + s) % D
    return _segment(gl.minimum(r, o), D) + gl.maximum(r, o)


@gluon.jit
def _outer_kernel(A, SA1, SA2, SA, B, SB1, SB2, SB, W, OUT, H2, C, NF, D: gl.constexpr, E: gl.constexpr,
                  BLOCK_C: gl.constexpr):
    """phi(a)^T (w b) for block t_ = u H2 + h of the blocks [U, C, H2, .] (strides as features._outer_kernel)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, E, 16])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    TILE: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 8 columns a thread
    ROWS: gl.constexpr = gl.BlockedLayout([4, 8], [4, 8], [4, 1], [1, 0])  # a warp's 16 rows of the product
    HALF: gl.constexpr = D // 2
    # a^T twice, WINDOW_PAD elements after each row of tokens; one row of it, and 64 rows from any row on
    STACKED: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[BLOCK_C, WINDOW_PAD]], [2 * D, BLOCK_C], [1, 0])
    ROW: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[BLOCK_C, WINDOW_PAD]], [BLOCK_C], [0])
    WINDOW: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[BLOCK_C, WINDOW_PAD]], [D, BLOCK_C], [1, 0])
    gl.static_assert(D == E)  # a and b share their column layout and its 64 columns
    t_ = gl.program_id(0).to(gl.int64)
    A = A + (t_ // H2) * SA1 + (t_ % H2) * SA2
    B = B + (t_ // H2) * SB1 + (t_ % H2) * SB2
    c = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, TILE))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, TILE))
    a_t = gl.permute(gl.load(A + c[:, None] * SA + cols[None, :], mask=(c < C)[:, None], other=0.0), [1, 0])
    stacked = gl.allocate_shared_memory(a_t.dtype, [2 * D, BLOCK_C], STACKED)
    stacked.slice(0, D, dim=0).store(a_t)
    stacked.slice(D, D, dim=0).store(a_t)
    # Gluon 3.6 slices shared memory only at multiples of the slice's length: a window starts at a row of a view
    # with one row a row of the stack, reinterpreted from there as 64 rows
    rows = stacked._reinterpret(a_t.dtype, [2 * D, BLOCK_C], ROW)
    b = gl.load(B + c[:, None] * SB + cols[None, :], mask=(c < C)[:, None], other=0.0)
    w = gl.load(W + t_ * C + c, mask=c < C, other=0.0)
    b_s = gl.allocate_shared_memory(b.dtype, [BLOCK_C, E],
                                    gl.NVMMASharedLayout.get_default_for([BLOCK_C, E], b.dtype),
                                    (b.to(gl.float32) * w[:, None]).to(b.dtype))  # w b rounded once, as _outer_kernel
    fence_async_shared()  # b_s is read by the tensor cores' asynchronous proxy
    gl.thread_barrier()  # and the stack by every warp
    operand = stacked.slice(0, D, dim=0).load(A_OP)
    zero = gl.zeros([D, E], gl.float32, MMA)
    r = gl.arange(0, D, layout=gl.SliceLayout(1, ROWS))
    e = gl.arange(0, E, layout=gl.SliceLayout(0, ROWS))
    for s in range(HALF + 1):
        p = operand * rows.index(s)._reinterpret(a_t.dtype, [D, BLOCK_C], WINDOW).load(A_OP)
        res, p = warpgroup_mma_wait(num_outstanding=0, deps=(warpgroup_mma(p, b_s, zero, use_acc=False,
                                                                           is_async=True), p))
        coef = gl.where(s == 0, 1.0, SQRT2)  # c_ij: 1 on the diagonal (s = 0), sqrt 2 off it
        val = gl.convert_layout((res * coef).to(OUT.dtype.element_ty), ROWS)
        gl.store(OUT + t_ * NF * E + _pair_rows(s, r, D)[:, None] * E + e[None, :], val,
                 mask=((r < HALF) | (s < HALF))[:, None])


@gluon.jit
def _state_rows(M, s, r, e, D: gl.constexpr, E: gl.constexpr):
    """Pointers to step s's 64 rows of a state [D, E] and which of them the step needs: rows e(s) + r for s < d / 2,
    else (i = 2 s - d / 2) rows e(i) + d / 2 + r for r < d / 2 and e(i + 1) + r for the others; feature (i, j)
    is needed for j >= i."""
    HALF: gl.constexpr = D // 2
    paired = (s >= HALF).to(gl.int32)
    i = s + paired * (s - HALF) + paired * (r >= HALF).to(gl.int32)
    j = r + paired * HALF * (r < HALF).to(gl.int32)
    return M + (_segment(i, D) + j)[:, None] * E + e[None, :], (j >= i)[:, None]


@gluon.jit
def _fetch(ring, M, s, r, e, D: gl.constexpr, E: gl.constexpr, STAGES: gl.constexpr, STEPS: gl.constexpr):
    """Step s's rows into the ring (the rows a step does not need as zeros); an empty group past the last step."""
    if s < STEPS:
        ptrs, need = _state_rows(M, s, r, e, D, E)
        async_copy.async_copy_global_to_shared(ring.index(s % STAGES), ptrs, mask=need)
    async_copy.commit_group()


@gluon.jit
def _arrived(ring, M, s0, r, e, D: gl.constexpr, E: gl.constexpr, STAGES: gl.constexpr, STEPS: gl.constexpr,
             GROUP: gl.constexpr):
    """Waits until steps s0 .. s0 + GROUP - 1 are in the ring for every warp, then fetches the steps STAGES - 1
    ahead of those, into slots whose products every warp group has finished (steps <= s0 - 2)."""
    async_copy.wait_group(STAGES - 2 * GROUP - 1)
    fence_async_shared()  # each thread's copies visible to the tensor cores, then everyone's (the barrier)
    gl.thread_barrier()
    for k in gl.static_range(GROUP):
        _fetch(ring, M, s0 + k + STAGES - GROUP - 1, r, e, D, E, STAGES, STEPS)


@gluon.jit
def _apply_kernel(A, SA1, SA2, SA, M, OUT, SO1, SO2, SO, W, B, SB1, SB2, SB, DW, ADD, SD1, SD2, SD, H2, C, NF,
                  D: gl.constexpr, E: gl.constexpr, BLOCK_C: gl.constexpr, HAS_W: gl.constexpr,
                  HAS_ADD: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr):
    """phi(a) M for BLOCK_C tokens of block t_ = u H2 + h (strides as features._apply_kernel): sqrt 2 times the
    sum over i <= j of a_i a_j M[e(i) + j] plus (1 - sqrt 2) (a * a) M[(j, j)], every step's product chained in
    one accumulator. HAS_W, HAS_ADD: as features._apply_kernel (DW [T, C], one column tile)."""
    NW: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, E, 16])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    TILE: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])  # 8 columns a thread
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    RING: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, E], M.dtype.element_ty)
    ROW: gl.constexpr = gl.SliceLayout(1, A_OP)
    HALF: gl.constexpr = D // 2
    STEPS: gl.constexpr = HALF + HALF // 2
    AHEAD: gl.constexpr = STAGES - GROUP - 1  # steps in flight (a slot is refilled once its product is done, _arrived)
    gl.static_assert(D == E)
    gl.static_assert(AHEAD >= GROUP)
    gl.static_assert((HALF // 2) % GROUP == 0)  # both loops take whole groups of steps
    tiles = gl.cdiv(C, BLOCK_C)  # a block's token tiles run side by side: the state is read once from HBM
    t_ = (gl.program_id(0) // tiles).to(gl.int64)
    c0 = (gl.program_id(0) % tiles) * BLOCK_C
    M = M + t_ * NF * E
    r = gl.arange(0, D, layout=gl.SliceLayout(1, TILE))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, TILE))
    ring = gl.allocate_shared_memory(M.dtype.element_ty, [STAGES, D, E], RING)
    for s in range(AHEAD):
        _fetch(ring, M, s, r, cols, D, E, STAGES, STEPS)
    A = A + (t_ // H2) * SA1 + (t_ % H2) * SA2
    c = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, TILE))
    cmask = (c < C)[:, None]
    a = gl.load(A + c[:, None] * SA + cols[None, :], mask=cmask, other=0.0)
    a_t = gl.allocate_shared_memory(a.dtype, [D, BLOCK_C], PLAIN, gl.permute(a, [1, 0]))
    columns = a_t._reinterpret(a.dtype, [D, BLOCK_C], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                                order=[0]))
    # the diagonal's remainder, (1 - sqrt 2) / sqrt 2 (a * a) M[(j, j)], starts the accumulator
    diag = gl.allocate_shared_memory(M.dtype.element_ty, [D, E], RING,
                                     gl.load(M + (_segment(r, D) + r)[:, None] * E + cols[None, :]))
    fence_async_shared()
    square = gl.convert_layout((a.to(gl.float32) * a.to(gl.float32)).to(a.dtype), A_OP)
    acc = warpgroup_mma(square, diag, gl.zeros([BLOCK_C, E], gl.float32, MMA), use_acc=False)
    acc = acc * ((1.0 - SQRT2) / SQRT2)
    operand = gl.convert_layout(a, A_OP)
    # a product in flight reads its register operand until the next step's wait: the wait's deps keep the previous
    # step's operand alive until then
    p_prev = square
    for s0 in range(0, HALF, GROUP):
        _arrived(ring, M, s0, r, cols, D, E, STAGES, STEPS, GROUP)
        for k in gl.static_range(GROUP):
            p = operand * columns.index(s0 + k).load(ROW)[:, None]
            acc = warpgroup_mma(p, ring.index((s0 + k) % STAGES), acc, is_async=True)
            acc, p_prev, p = warpgroup_mma_wait(num_outstanding=1, deps=(acc, p_prev, p))
            p_prev = p
    upper = gl.load(A + c[:, None] * SA + (HALF + cols % HALF)[None, :], mask=cmask, other=0.0)
    operand = gl.convert_layout(upper, A_OP)
    first = gl.arange(0, D, layout=gl.SliceLayout(0, A_OP))[None, :] < HALF
    for s0 in range(HALF, STEPS, GROUP):
        _arrived(ring, M, s0, r, cols, D, E, STAGES, STEPS, GROUP)
        for k in gl.static_range(GROUP):
            i = 2 * (s0 + k) - HALF
            p = operand * gl.where(first, columns.index(i).load(ROW)[:, None], columns.index(i + 1).load(ROW)[:, None])
            acc = warpgroup_mma(p, ring.index((s0 + k) % STAGES), acc, is_async=True)
            acc, p_prev, p = warpgroup_mma_wait(num_outstanding=1, deps=(acc, p_prev, p))
            p_prev = p
    acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
    async_copy.wait_group(0)
    out = gl.convert_layout(acc * SQRT2, TILE)
    if HAS_W:
        b = gl.load(B + (t_ // H2) * SB1 + (t_ % H2) * SB2 + c[:, None] * SB + cols[None, :], mask=cmask, other=0.0)
        gl.store(DW + t_ * C + c, gl.sum(out * b.to(gl.float32), axis=1), mask=c < C)
        out = out * gl.load(W + t_ * C + c, mask=c < C, other=0.0)[:, None]
    if HAS_ADD:
        out += gl.load(ADD + (t_ // H2) * SD1 + (t_ % H2) * SD2 + c[:, None] * SD + cols[None, :], mask=cmask,
                       other=0.0).to(gl.float32)
    gl.store(OUT + (t_ // H2) * SO1 + (t_ % H2) * SO2 + c[:, None] * SO + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=cmask)


def launch_outer(a, sa, b, sb, w, out, heads, C):
    """_outer_kernel over every block: a, b blocks [U, C, heads, 64] with their (u, h, token) strides sa, sb
    (features._strides), w [T, C] float32, out [T, D, 64] in b's dtype."""
    _outer_kernel[(out.shape[0],)](a, *sa, b, *sb, w, out, heads, C, out.shape[1], D=HEAD, E=HEAD,
                                   BLOCK_C=max(64, 1 << (C - 1).bit_length()), num_warps=NUM_WARPS)


def launch_apply(a, sa, m, out, so, w, b, sb, dw, add, sd, heads, C, has_w, has_add):
    """_apply_kernel over every block, APPLY["BLOCK_C"] tokens a program (a block's programs side by side): a, b,
    add, out blocks [U, C, heads, 64] with their strides (features._strides), m [T, D, 64] in a's dtype, w, dw
    [T, C] float32; b, w, dw used only with has_w, add only with has_add (any tensor stands in otherwise)."""
    grid = (m.shape[0] * triton.cdiv(C, APPLY["BLOCK_C"]),)
    _apply_kernel[grid](a, *sa, m, out, *so, w, b, *sb, dw, add, *sd, heads, C, m.shape[1], D=HEAD, E=HEAD,
                        BLOCK_C=APPLY["BLOCK_C"], HAS_W=has_w, HAS_ADD=has_add, STAGES=APPLY["STAGES"],
                        GROUP=APPLY["GROUP"], num_warps=APPLY["NUM_WARPS"])
