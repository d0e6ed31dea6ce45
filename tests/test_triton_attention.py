"""The Triton attention core (CPU interpreter here, the real kernels on a GPU) against the float64 reference.

Every check compares o and the gradients of q, k, v and g with attention_reference run on float64 copies,
on random inputs drawn from the test's seed (tests/conftest.py). On the CPU the kernels run in fp32; the bound
is max(tol, 10 x the error of the same reference run in float32), because some inputs are ill-conditioned
for any fp32 code: with a saturated exp, o_i ~ v_j for one j < i and dL/dq_i comes from the cancellation
dO_i.v_j - dO_i.o_i, which float32 PyTorch autograd suffers just the same. (The kernels avoid it for the
diagonal term, the case of strong decay; test_extreme_decay checks that with no allowance.)
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from kernel.attention import attention
from kernel.reference import bhnd_views

POWERS = ["1", "2", "exp"]
NAMES = ["o", "dq", "dk", "dv", "dg"]


class Inputs:
    def __init__(self, B, H, N, d, *, power, normalize, decay, device="cpu", dtype=torch.float32, qk_scale=1.0):
        self.seed = int(torch.randint(2**31, ()))  # drawn from the test's seed (conftest.py): replayable
        gen = torch.Generator().manual_seed(self.seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        q, k, v = rand(B, H, N, d) * qk_scale, rand(B, H, N, d) * qk_scale, rand(B, H, N, d)
        if power == "1" and normalize:
            # the `linear` type applies relu to q and k; signed scores would make the row sum ~0 and o unbounded
            q, k = q.abs(), k.abs()
        if decay is None:
            g = None
        elif decay == "mixed":
            g = -F.softplus(rand(B, H, N) * 2 - 1)  # per-token decay from ~0 to a few units
        else:
            g = torch.full((B, H, N), float(decay), dtype=torch.float64)
        self.tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
        self.g = None if g is None else g.to(device=device, dtype=torch.float32)
        self.do = rand(B, H, N, d).to(device=device, dtype=dtype)
        self.kw = dict(power=power, normalize=normalize)

    def run(self, backend, dtype=None, op=attention):
        """o and the gradients of op, with the inputs cast to dtype (None: as drawn)."""
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in self.tensors]
        g = None if self.g is None else self.g.detach().to(dtype or self.g.dtype).requires_grad_(True)
        o = op(*leaves, g, backend=backend, **self.kw)
        wrt = leaves + ([g] if g is not None else [])
        grads = torch.autograd.grad(o, wrt, self.do.to(o.dtype))
        return [o.detach()] + list(grads)




def _compare(inputs, tol, fp32_escape=True, op=attention):
    got = inputs.run("triton", op=op)
    ref = inputs.run("torch", torch.float64)
    ref32 = inputs.run("torch", torch.float32)
    # Exact zeros in the reference (dq at N = 1 with normalisation) are met only up to rounding: allow an
    # absolute floor far below any real mistake, relative to the largest of the compared tensors.
    floor = 1e-6 * max(r.norm().item() for r in ref)
    for name, x, r, r32 in zip(NAMES, got, ref, ref32):
        assert x.shape == r.shape
        assert torch.isfinite(x).all(), f"{name}: non-finite values, seed {inputs.seed}"
        err, err32, norm = (x.double() - r).norm().item(), (r32.double() - r).norm().item(), r.norm().item()
        assert err <= max(tol * norm, 10 * err32 if fp32_escape else 0.0, floor), (
            f"{name}: rel err {err / max(norm, 1e-300):.2e} (fp32 reference {err32 / max(norm, 1e-300):.2e}), "
            f"seed {inputs.seed}")
    return got


@pytest.mark.parametrize("N,d", [(1, 16), (17, 32), (100, 16)])
@pytest.mark.parametrize("decay", [None, "mixed"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("power", POWERS)
def test_matches_reference(power, normalize, decay, N, d):
    _compare(Inputs(2, 2, N, d, power=power, normalize=normalize, decay=decay), 1e-4)


@pytest.mark.parametrize("decay", [-20.0, -1e-4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("power", POWERS)
def test_extreme_decay(power, normalize, decay):
    # At -20 every row is its diagonal plus e^-20 corrections. The kernels keep the diagonal term apart, so
    # they must meet the bound with no allowance for the fp32 reference, whose dq is off by 10-100x there.
    # k is pulled towards q so that no s_ii is ~0, which would make the row ill-conditioned for any code.
    inputs = Inputs(1, 2, 64, 16, power=power, normalize=normalize, decay=decay)
    q, k, v = inputs.tensors
    inputs.tensors = [q, (q + k) / 2, v]
    _compare(inputs, 1e-3, fp32_escape=False)


@pytest.mark.parametrize("decay", [None, "mixed"])
def test_exp_large_scores(decay):
    # |s| in the hundreds: e^s overflows without the running maximum
    _compare(Inputs(1, 2, 50, 16, power="exp", normalize=True, decay=decay, qk_scale=8.0), 1e-4)


def _far_key_outweighs_decay(inputs):
    """Key 0 along the last query, long enough that its weight there beats the decay of every token between."""
    q, k, v = inputs.tensors
    k[:, :, 0] = q[:, :, -1] * 60


@pytest.mark.parametrize("case", ["mixed", "far key", "growing a"])
def test_exp_skips_only_negligible_blocks(case):
    """exp with decay skips the blocks of pairs whose weights are provably below e^-44 of their row's diagonal
    weight (|q.k| <= |q| max|k|, the smallest a of each group of keys): still exact where a far key's score
    outweighs the decay, and where some g > 0 makes a rise (outside the documented g <= 0: the bound only loosens)."""
    inputs = Inputs(2, 2, 100, 16, power="exp", normalize=True, decay="mixed")
    if case == "far key":
        _far_key_outweighs_decay(inputs)
    elif case == "growing a":
        inputs.g[..., 40:60] = 3.0
    _compare(inputs, 1e-4)


@pytest.mark.parametrize("block_m", [16, 64])
def test_exp_dq_starts_where_the_forward_started(monkeypatch, block_m):
    """The dq kernel starts each block of queries at the earliest start the forward kept for its rows: exact when
    its blocks cut the forward's (16 rows: half of one) or span several (64 rows: two), with blocks skipped."""
    import triton

    from kernel import triton_attention as ta
    from kernel.triton_attention import attention_forward

    inputs = Inputs(1, 2, 100, 16, power="exp", normalize=True, decay=-2.0)
    q, k, v = inputs.tensors
    first = attention_forward(q, k, v, inputs.g, "exp", True, 0.25, False, q.dtype)[2][-1]
    assert first.max() > 0, "no key block skipped: the test would not reach the dq kernel's start"
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": ta.SKIP_GROUP}, num_warps=4, num_stages=1)
    monkeypatch.setattr(ta._bwd_dq_kernel, "configs", [config])
    monkeypatch.setattr(ta._bwd_dq_kernel, "cache", {})
    _compare(inputs, 1e-4)


def test_exp_skipping_is_on(monkeypatch):
    """With the threshold lowered to skip blocks of non-negligible weight, the kernels no longer match the
    reference: the skipped loop bounds are in use (forward, dq and dk/dv), not only computed."""
    import triton.language as tl

    from kernel import triton_attention as ta

    inputs = Inputs(1, 2, 100, 16, power="exp", normalize=True, decay=-0.5)
    ref = inputs.run("torch", torch.float64)
    monkeypatch.setattr(ta, "SKIP_NATS", tl.constexpr(-5.0))
    got = inputs.run("triton")
    for name, x, r in zip(NAMES, got, ref):
        assert rel_err(x, r) > 1e-2, f"{name}: unchanged by skipping blocks of weight e^5, seed {inputs.seed}"


@pytest.mark.parametrize("power", ["2", "exp"])
def test_tuning_runs_skip_nothing_and_stay_exact(monkeypatch, power):
    """The autotuner times the skipping kernels with their bounds loosened (a pre_hook, run only when it tunes, which
    the interpreter's one config never does): here every launch runs the hook first, as the call that tunes does.
    exp with decay then skips nothing and still matches float64; power 2, whose bound arguments stand in for other
    tensors (no skipping), is left unchanged."""
    from kernel import triton_attention as ta

    for kernel in (ta._fwd_kernel, ta._bwd_dq_kernel, ta._bwd_dkdv_kernel):
        def tuning_run(*args, kernel=kernel, run=kernel.run, **kwargs):
            kernel.pre_hook({**dict(zip(kernel.arg_names, args)), **kwargs, **kernel.configs[0].all_kwargs()})
            return run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", tuning_run)
    inputs = Inputs(1, 2, 100, 16, power=power, normalize=True, decay=-2.0)
    q, k, v = inputs.tensors
    first = ta.attention_forward(q, k, v, inputs.g, power, True, 0.25, False, q.dtype)[2][-1]
    if power == "exp":  # without the hook this call skips (test_exp_dq_starts_where_the_forward_started)
        assert (first == 0).all(), "a tuning run skipped key blocks"
    _compare(inputs, 1e-4)


@pytest.mark.parametrize("bnhd", [False, True])
def test_decay_gradient_is_the_reverse_cumulative_sum(bnhd):
    """d g = reverse cumsum of d a_q + d a_k (a = cumsum g), by _decay_grad_kernel against float64 PyTorch: many
    blocks (N = 1001, not a multiple of the block), g's layout, float64 and float32 outputs."""
    from kernel.triton_attention import _decay_grad

    da_q, da_k = torch.randn(2, 3, 1001), torch.randn(2, 3, 1001)
    ref = (da_q.double() + da_k.double()).flip(-1).cumsum(-1).flip(-1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        dg = _decay_grad(da_q, da_k, bnhd, dtype)
        assert dg.shape == ref.shape and dg.dtype == dtype and dg.transpose(1, 2).is_contiguous() == bnhd
        torch.testing.assert_close(dg.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("power", ["1", "2"])
def test_zero_row_sum_gives_zero(power):
    inputs = Inputs(1, 2, 40, 16, power=power, normalize=True, decay="mixed")
    q = inputs.tensors[0]
    q[:, :, ::3] = 0.0  # these rows have s_ij = 0 for every j, so a zero normaliser
    o = _compare(inputs, 1e-4)[0]
    assert (o[:, :, ::3] == 0).all()


def test_large_cumulative_decay_keeps_precision():
    # a huge first decay shifts every a_j by -1e6, where float32 has a spacing of 0.06: a_i - a_j taken from
    # a float32 cumsum would be off by up to ~6 % (the float32 reference is, so there is no fp32 escape here)
    inputs = Inputs(1, 2, 100, 16, power="2", normalize=True, decay="mixed")
    inputs.g[..., 0] = -1e6
    _compare(inputs, 1e-4, fp32_escape=False)


@pytest.mark.parametrize("power,normalize", [("2", True), ("exp", True), ("1", False)])
def test_half_precision_inputs(power, normalize):
    # fp16 in, fp16 o, dq, dk, dv (g stays fp32). The interpreter cannot emulate bf16 (numpy has no bf16),
    # so bf16 is covered by the GPU tests only.
    inputs = Inputs(1, 2, 40, 16, power=power, normalize=normalize, decay="mixed", dtype=torch.float16)
    got = inputs.run("triton")
    ref = inputs.run("torch", torch.float64)
    for name, x, r, dtype in zip(NAMES, got, ref, [torch.float16] * 4 + [torch.float32]):
        assert x.dtype == dtype
        assert rel_err(x, r) <= 2e-3, f"{name}: rel err {rel_err(x, r):.2e}, seed {inputs.seed}"


def test_odd_head_dims_and_strided_inputs():
    # d = 24 and dv = 40 (not powers of two), q and k transposed views of [B, N, H, d] storage
    B, H, N = 2, 3, 45
    inputs = Inputs(B, H, N, 24, power="2", normalize=True, decay="mixed")
    q, k, _ = inputs.tensors
    inputs.tensors = [q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2),
                      torch.randn(B, H, N, 40, dtype=torch.float64).float()]
    inputs.do = torch.randn(B, H, N, 40)
    assert not inputs.tensors[0].is_contiguous()
    _compare(inputs, 1e-4)


def _bnhd_views(tensors, source):
    """The [B, H, N, x] tensors as [B, N, H, x] views of one buffer, as a block holds them: "projection" slices a
    [B, N, C] buffer (row stride C); "conv" slices a [B, N, C] view of [B, C, N] storage (unit row stride, the
    output of a causal conv1d). Differentiable, so the gradients reach the tensors unchanged."""
    B, H, N, _ = tensors[0].shape
    buf = torch.cat([t.transpose(1, 2).reshape(B, N, -1) for t in tensors], dim=-1)
    if source == "conv":
        buf = buf.transpose(1, 2).contiguous().transpose(1, 2)
    return [p.view(B, N, H, -1) for p in buf.split([t.shape[1] * t.shape[3] for t in tensors], dim=-1)]


def _bnhd_op(source):
    """attention through the "bnhd" layout from strided views, returned as [B, H, N, dv] for _compare; the
    reference backend runs the plain [B, H, N, d] call."""
    def op(q, k, v, g, *, backend, **kw):
        if backend != "triton":
            return attention(q, k, v, g, backend=backend, **kw)
        qv, kv, vv = _bnhd_views([q, k, v], source)
        gv = None if g is None else g.transpose(1, 2)
        o = attention(qv, kv, vv, gv, backend=backend, layout="bnhd", **kw)
        assert o.shape == vv.shape and o.is_contiguous()
        return o.transpose(1, 2)  # the incoming gradient then reaches the kernel with other strides than o
    return op


@pytest.mark.parametrize("source", ["projection", "conv"])
@pytest.mark.parametrize("power,normalize,decay", [("2", True, "mixed"), ("exp", True, "mixed"), ("1", False, "mixed"),
                                                   ("2", False, None), ("2", True, -20.0), ("exp", True, -20.0)])
def test_bnhd_layout_strided_views(power, normalize, decay, source):
    # N = 45 crosses block edges, d = 24 != dv = 40; at decay -20 no allowance for the fp32 reference (as in
    # test_extreme_decay, k pulled towards q)
    B, H, N, d, dv = 2, 3, 45, 24, 40
    inputs = Inputs(B, H, N, d, power=power, normalize=normalize, decay=decay)
    q, k, _ = inputs.tensors
    gen = torch.Generator().manual_seed(inputs.seed + 1)
    extreme = decay == -20.0
    inputs.tensors = [q, (q + k) / 2 if extreme else k, torch.randn(B, H, N, dv, generator=gen)]
    inputs.do = torch.randn(B, H, N, dv, generator=gen)
    _compare(inputs, 1e-3 if extreme else 1e-4, fp32_escape=not extreme, op=_bnhd_op(source))


@pytest.mark.parametrize("power,normalize", [("2", True), ("exp", True), ("1", False)])
def test_descriptor_and_pointer_reads_agree(power, normalize, monkeypatch):
    """The kernels read aligned views with contiguous features through tensor descriptors (TMA) and others through
    pointers: the same tiles, so the same bits (interpreter); a conv's output (features strided) takes pointers."""
    from kernel import triton_attention as ta

    inputs = Inputs(2, 3, 45, 24, power=power, normalize=normalize, decay="mixed")
    views = _bnhd_views(inputs.tensors, "projection")
    assert ta._tma(*bhnd_views("bnhd", *views)) and not ta._tma(*bhnd_views("bnhd", *_bnhd_views(views, "conv")))
    got = inputs.run("triton", op=_bnhd_op("projection"))
    monkeypatch.setattr(ta, "_tma", lambda *tensors: False)
    for name, x, y in zip(NAMES, got, inputs.run("triton", op=_bnhd_op("projection"))):
        assert torch.equal(x, y), f"{name}: descriptor and pointer reads differ, seed {inputs.seed}"


def test_bnhd_gradients_come_back_in_the_callers_layout():
    q, k, v = _bnhd_views([torch.randn(2, 3, 20, 16, requires_grad=True) for _ in range(3)], "projection")
    g = -torch.rand(2, 20, 3, requires_grad=True)
    o = attention(q, k, v, g, backend="triton", layout="bnhd")
    grads = torch.autograd.grad(o, [q, k, v, g], torch.randn_like(o))
    assert o.is_contiguous() and all(x.shape == t.shape for x, t in zip(grads, [q, k, v, g]))
    assert all(x.is_contiguous() for x in grads)  # d g too: written in g's [B, N, H] layout


@pytest.mark.parametrize("normalize", [True, False])
def test_only_the_normalised_backward_keeps_the_output(normalize):
    """The output (and o without its diagonal term) are kept for the normalised backward's Delta only: an
    unnormalised call (every chunk of the chunked form) saves no tensor of v's size but v, float32 out too."""
    q, k = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 20, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(q, k, v, -torch.rand(1, 2, 20), power="2", normalize=normalize, backend="triton",
                  out_dtype=torch.float32)
    assert saved.count(v.numel()) == (3 if normalize else 1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "power,normalize,decay,d,dtype",
    [(p, n, dec, 64, torch.bfloat16) for p in POWERS for n in (True, False) for dec in (None, "mixed")]
    + [(p, n, "mixed", 128, torch.bfloat16) for p, n in (("2", True), ("exp", True), ("1", False))]
    + [(p, n, "mixed", 64, torch.float16) for p, n in (("2", True), ("exp", True), ("1", False))]
    + [("2", True, "mixed", 32, torch.bfloat16), ("2", True, "mixed", 64, torch.float32)],
    ids=lambda x: str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else None,  # -k float32 selects
)
def test_gpu_real_shapes(power, normalize, decay, d, dtype):
    inputs = Inputs(1, 4, 2048, d, power=power, normalize=normalize, decay=decay, device="cuda", dtype=dtype)
    got = inputs.run("triton")
    ref = inputs.run("torch", torch.float64)
    assert got[0].dtype == dtype
    for name, x, r in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), f"{name}: non-finite values, seed {inputs.seed}"
        err = rel_err(x, r)
        assert err <= 1e-2, f"{name}: rel err {err:.2e}, seed {inputs.seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("far_key", [False, True])
def test_gpu_exp_skipped_blocks(far_key):
    """exp's skipped blocks at a real shape: N = 3001 (no block size divides it), bf16, within 1e-2 of float64."""
    inputs = Inputs(1, 4, 3001, 64, power="exp", normalize=True, decay="mixed", device="cuda", dtype=torch.bfloat16)
    if far_key:
        _far_key_outweighs_decay(inputs)
    got = inputs.run("triton")
    ref = inputs.run("torch", torch.float64)
    for name, x, r in zip(NAMES, got, ref):
        assert rel_err(x, r) <= 1e-2, f"{name}: rel err {rel_err(x, r):.2e}, seed {inputs.seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["projection", "conv"])
@pytest.mark.parametrize("power,normalize", [("2", True), ("exp", True), ("1", False)])
def test_gpu_bnhd_layout(power, normalize, source):
    """The block's call on the GPU: bf16 strided [B, N, H, d] views (the projection's read through tensor
    descriptors, the conv's through pointers), o and every gradient within 1e-2."""
    inputs = Inputs(2, 4, 2048, 64, power=power, normalize=normalize, decay="mixed", device="cuda",
                    dtype=torch.bfloat16)
    got = inputs.run("triton", op=_bnhd_op(source))
    ref = inputs.run("torch", torch.float64)
    for name, x, r in zip(NAMES, got, ref):
        assert torch.isfinite(x).all(), f"{name}: non-finite values, seed {inputs.seed}"
        assert rel_err(x, r) <= 1e-2, f"{name}: rel err {rel_err(x, r):.2e}, seed {inputs.seed}"


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("decay", [None, "mixed", -20.0])
@pytest.mark.parametrize("power", ["1", "2"])
def test_return_den_matches_reference(power, decay, layout):
    """return_den (the chunked form's in-chunk sums): o and the weights' row sums den, and the gradients through
    both, against the float64 reference; o / den is the normalised attention."""
    inputs = Inputs(2, 3, 37, 16, power=power, normalize=False, decay=decay)
    dden = torch.randn(2, 3, 37, generator=torch.Generator().manual_seed(inputs.seed + 1), dtype=torch.float64)

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs.tensors]
        g = None if inputs.g is None else inputs.g.detach().to(dtype).requires_grad_(True)
        o, den = attention(*bhnd_views(layout, *leaves, g), power=power, normalize=False, backend=backend,
                           layout=layout, return_den=True)
        o, den = bhnd_views(layout, o, den)
        wrt = leaves + ([g] if g is not None else [])
        return [o.detach(), den.detach()] + list(torch.autograd.grad([o, den], wrt, [inputs.do.to(o.dtype),
                                                                                    dden.to(den.dtype)]))

    got, ref, ref32 = run("triton", torch.float32), run("torch", torch.float64), run("torch", torch.float32)
    assert got[1].dtype == torch.float32 and got[1].shape == (2, 3, 37)
    for name, x, r, r32 in zip(["o", "den"] + NAMES[1:], got, ref, ref32):
        err, err32, norm = (x.double() - r).norm().item(), (r32.double() - r).norm().item(), r.norm().item()
        assert err <= max(1e-5 * norm, 10 * err32), f"{name}: rel err {err / norm:.2e}, seed {inputs.seed}"
    normalised = attention(*(t.double() for t in inputs.tensors), None if inputs.g is None else inputs.g.double(),
                           power=power, normalize=True, backend="torch")
    den = ref[1][..., None]
    torch.testing.assert_close(torch.where(den == 0, 0.0, ref[0] / torch.where(den == 0, 1.0, den)), normalised)


@pytest.mark.parametrize("power,normalize", [("2", True), ("exp", False)])
def test_return_den_needs_unnormalised_powers(power, normalize):
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="return_den needs normalize=False and power '1' or '2'"):
        attention(q, q, q, power=power, normalize=normalize, return_den=True)


def test_batch_times_heads_above_the_grid_limit_runs_in_slices(monkeypatch):
    """More batch x heads than a CUDA grid axis holds: the call is split along the batch, same result."""
    from kernel import triton_attention as ta

    q, k, v = (torch.randn(5, 2, 9, 16) for _ in range(3))
    g = -torch.rand(5, 2, 9)
    whole = ta.triton_attention(q, k, v, g)
    monkeypatch.setattr(ta, "MAX_GRID_HEADS", 4)
    torch.testing.assert_close(ta.triton_attention(q, k, v, g), whole)
    bnhd = [t.transpose(1, 2) for t in (q, k, v, g)]
    torch.testing.assert_close(ta.triton_attention(*bnhd, layout="bnhd"), whole.transpose(1, 2))
    monkeypatch.setattr(ta, "MAX_GRID_HEADS", 1)
    with pytest.raises(ValueError, match="heads per call"):
        ta.triton_attention(q, k, v, g)


@pytest.mark.parametrize("attention_type", [
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2",
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2",
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__D_res",
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate",
])
def test_block_through_the_kernels_matches_the_reference(attention_type, monkeypatch):
    """A generic block's output and every gradient through the kernels (its conv'd [B, N, H, d] views passed
    as they are) == through the PyTorch reference."""
    from GPT_Trainer.LlamaDecoderLayerClean import GenericAttention, attention_config

    block = GenericAttention(64, 2, attention_config(attention_type))
    block.checkpoint_core = True
    h, dout = torch.randn(2, 37, 64), torch.randn(2, 37, 64)

    def run(backend):
        monkeypatch.setenv("TWOMAMBA_ATTENTION_BACKEND", backend)
        block.zero_grad()
        x = h.clone().requires_grad_()
        out = block(x)
        out.backward(dout)
        return [out.detach(), x.grad] + [p.grad for p in block.parameters()]

    for got, ref in zip(run("triton"), run("torch")):
        assert rel_err(got, ref) < 1e-4
