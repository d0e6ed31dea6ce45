"""The outer product of features.py for Hopper (sm_90), in Gluon: phi(a)^T (w b) for chunks of 256 tokens or fewer.

Gluon (Triton's lower-level language) states what Triton chooses for itself: where each operand lives, how a
result is laid out for its store. This kernel computes what features._outer_kernel computes, bit for bit (the
same products a_j a_i rounded once, the same tensor-core sums), at d = dv = 64, faster on an H200
(bench/NOTES.md): each step's result is rounded to bf16 in the product's layout, passed through shared
memory once and stored in 16-byte rows, and the steps i >= d / 2, which need only the rows j >= d / 2, go two
at a time through one product (48 products a chunk instead of 64). features.outer takes it where it applies
(hopper_outer_applies) and _outer_kernel everywhere else; the interpreter cannot run Gluon, so the CPU tests
check _outer_kernel and the GPU tests check this kernel against it and float64 (tests/test_power_attention.py),
and tests/test_compile.py compiles it for sm_90 on any machine.

Step i (i < d / 2) multiplies the d x C operand a^T scaled per token by a_i (registers) with w b (shared memory)
into rows e(i) + j of the state; the product's A operand must hold 64 rows, so for i >= d / 2 the operand is the
upper half of a^T twice, scaled by a_i in its first 32 rows and by a_{i+1} in the others.
"""
from __future__ import annotations

import torch
import triton

if not triton.__version__.startswith("3.6."):  # Gluon is experimental; features.py then keeps its Triton kernel
    raise ImportError(f"kernel/power/hopper.py is written for Gluon as Triton 3.6 ships it, not {triton.__version__}")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,  # noqa: E402
                                                            warpgroup_mma_wait)

SQRT2 = gl.constexpr(1.4142135623730951)
HEAD = 64  # d and dv this kernel is written for
NUM_WARPS = 4  # one warp group: the product's 64 rows


def hopper_outer_applies(a, b, C):
    """Whether outer(a, b, w) of features.py may run here: bf16 or fp16 on an sm_90 GPU, d = dv = 64, chunks of at
    most 256 tokens."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)
            and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
            and a.shape[-1] == HEAD and b.shape[-1] == HEAD and C <= 256)


@gluon.jit
def _segment(i, D: gl.constexpr):
    """Offset such that feature (i, j), j >= i, is row start + j of the state (features._segment)."""
    return i * D - i * (i - 1) // 2 - i


@gluon.jit
def _store_step(OUT, res, i, J0: gl.constexpr, JM: gl.constexpr, t_, D: gl.constexpr, E: gl.constexpr, NF,
                MMA: gl.constexpr, ROWS: gl.constexpr):
    """Row r of the product res is the state's feature (i + r // JM, J0 + r % JM) times c_ij: rounded in the
    product's layout, then to rows of 8 columns a thread (through shared memory) for 16-byte stores; the rows
    j < i are not stored."""
    r = gl.arange(0, res.shape[0], layout=gl.SliceLayout(1, MMA))
    coef = gl.where(J0 + r % JM == i + r // JM, 1.0, SQRT2)
    val = gl.convert_layout((res * coef[:, None]).to(OUT.dtype.element_ty), ROWS)
    r = gl.arange(0, res.shape[0], layout=gl.SliceLayout(1, ROWS))
    e = gl.arange(0, E, layout=gl.SliceLayout(0, ROWS))
    ir, jr = i + r // JM, J0 + r % JM
    gl.store(OUT + t_ * NF * E + (_segment(ir, D) + jr)[:, None] * E + e[None, :], val, mask=(jr >= ir)[:, None])


@gluon.jit
def _outer_kernel(A, SA1, SA2, SA, B, SB1, SB2, SB, W, OUT, H2, C, NF, D: gl.constexpr, E: gl.constexpr,
                  BLOCK_C: gl.constexpr):
    """phi(a)^T (w b) for block t_ = u H2 + h of the blocks [U, C, H2, .] (strides as features._outer_kernel)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, E, 16])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    TILE: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16 x 64, 8 columns a thread
    ROWS: gl.constexpr = gl.BlockedLayout([4, 8], [4, 8], [4, 1], [1, 0])  # a warp's 16 rows of the product
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    HALF: gl.constexpr = D // 2
    gl.static_assert(D == E)  # a and b share their column layout and its 64 columns
    t_ = gl.program_id(0).to(gl.int64)
    A = A + (t_ // H2) * SA1 + (t_ % H2) * SA2
    B = B + (t_ // H2) * SB1 + (t_ % H2) * SB2
    c = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(1, TILE))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, TILE))
    a = gl.load(A + c[:, None] * SA + cols[None, :], mask=(c < C)[:, None], other=0.0)
    a_t = gl.allocate_shared_memory(a.dtype, [D, BLOCK_C], PLAIN, gl.permute(a, [1, 0]))
    # the same rows one at a time (row i: the column a_i), in the row-major layout PLAIN has: index() takes a
    # buffer of one rank more than its layout, and Gluon 3.6 slices only at constant offsets
    columns = a_t._reinterpret(a.dtype, [D, BLOCK_C], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                                order=[0]))
    b = gl.load(B + c[:, None] * SB + cols[None, :], mask=(c < C)[:, None], other=0.0)
    w = gl.load(W + t_ * C + c, mask=c < C, other=0.0)
    b_s = gl.allocate_shared_memory(b.dtype, [BLOCK_C, E],
                                    gl.NVMMASharedLayout.get_default_for([BLOCK_C, E], b.dtype),
                                    (b.to(gl.float32) * w[:, None]).to(b.dtype))  # w b rounded once, as _outer_kernel
    fence_async_shared()  # b_s is read by the tensor cores' asynchronous proxy
    COLUMN: gl.constexpr = gl.SliceLayout(0, A_OP)
    zero = gl.zeros([D, E], gl.float32, MMA)
    operand = a_t.load(A_OP)
    for i in range(0, HALF):
        p = operand * columns.index(i).load(COLUMN)[None, :]
        res, p = warpgroup_mma_wait(num_outstanding=0, deps=(warpgroup_mma(p, b_s, zero, use_acc=False,
                                                                           is_async=True), p))
        _store_step(OUT, res, i, 0, D, t_, D, E, NF, MMA, ROWS)
    upper = gl.allocate_shared_memory(a.dtype, [D, BLOCK_C], PLAIN)
    rows = a_t.slice(HALF, HALF, dim=0).load(TILE)
    upper.slice(0, HALF, dim=0).store(rows)
    upper.slice(HALF, HALF, dim=0).store(rows)
    operand = upper.load(A_OP)
    first = gl.arange(0, D, layout=gl.SliceLayout(1, A_OP))[:, None] < HALF
    for i in range(HALF, D, 2):
        p = operand * gl.where(first, columns.index(i).load(COLUMN)[None, :],
                               columns.index(i + 1).load(COLUMN)[None, :])
        res, p = warpgroup_mma_wait(num_outstanding=0, deps=(warpgroup_mma(p, b_s, zero, use_acc=False,
                                                                           is_async=True), p))
        _store_step(OUT, res, i, HALF, HALF, t_, D, E, NF, MMA, ROWS)


def launch_outer(a, sa, b, sb, w, out, heads, C):
    """_outer_kernel over every block: a, b blocks [U, C, heads, 64] with their (u, h, token) strides sa, sb
    (features._strides), w [T, C] float32, out [T, D, 64] in b's dtype."""
    _outer_kernel[(out.shape[0],)](a, *sa, b, *sb, w, out, heads, C, out.shape[1], D=HEAD, E=HEAD,
                                   BLOCK_C=max(64, 1 << (C - 1).bit_length()), num_warps=NUM_WARPS)
