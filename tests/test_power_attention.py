"""kernel.power_attention: every algorithm against float64 references, forward and every gradient.

References: attention_reference (the N x N form, float64) for outputs without state, and the float64
token recurrence of kernel/power/naive.py for states; naive itself is checked against the N x N form.
The Triton kernels (state scan, one-token step, and the attention/kron kernels inside the chunked form)
run here under the interpreter on CPU tensors; on CUDA machines the gpu tests cover them.
"""
import pytest
import torch

from helpers import CountOps, rel_err
from kernel import attention_reference, power_attention
from kernel.power import power_attention_naive, state_scan, state_size, zero_state

interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter test on CPU tensors")


def make_inputs(seed, B, H, N, d, dv, *, decay=1.0, positive=False, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, x, generator=gen, dtype=torch.float64) for x in (d, d, dv))
    if positive:  # power 1 with normalisation needs keys and queries whose scores keep one sign
        q, k = q.abs(), k.abs()
    g = -torch.rand(B, H, N, generator=gen, dtype=torch.float64) * decay
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v, g))


def random_state(seed, B, H, d, dv, power, dtype=torch.float64, n=12):
    """A state as a real context leaves it: the recurrence over n random tokens (a random tensor would not
    be one: its normaliser phi(q).z could be negative or cancel)."""
    q, k, v, g = make_inputs(seed, B, H, n, d, dv, decay=0.1, positive=power == "1")
    return power_attention_naive(q, k, v, g, power=power, output_final_state=True)[1].to(dtype)


def grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(123)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in tensors]


def stateful_grads(fn, tensors, power, **kw):
    """Outputs (o, final state) and every gradient of fn(q, k, v, g[, initial_state]) with state out."""
    def call(q, k, v, g, *s):
        return fn(q, k, v, g, power=power, initial_state=s[0] if s else None, output_final_state=True, **kw)
    return grads(call, tensors)


def projection(q, k, v):
    """[B, N, 3 H d]: q, k, v [B, H, N, d] side by side as one projection's output, as the model's block has them;
    projection_views gives its [B, N, H, d] views back."""
    B, H, N, d = q.shape
    return torch.cat([t.transpose(1, 2).reshape(B, N, H * d) for t in (q, k, v)], dim=-1)


def projection_views(qkv, H):
    B, N = qkv.shape[:2]
    return [t.view(B, N, H, -1) for t in qkv.chunk(3, dim=-1)]


def assert_rel_close(got, ref, tol):
    """Every tensor of `got` within `tol` of its float64 counterpart in `ref` (relative norm)."""
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < tol, f"output/gradient {i}: relative error {rel_err(a, b):.2e}"




@pytest.mark.parametrize("power,normalize", [("1", False), ("1", True), ("2", False), ("2", True)])
def test_naive_matches_quadratic_reference(power, normalize):
    q, k, v, g = make_inputs(1, 2, 2, 19, 8, 5, positive=normalize and power == "1")
    for gg in (g, None):
        ref = attention_reference(q, k, v, gg, power=power, normalize=normalize)
        out = power_attention_naive(q, k, v, gg, power=power, normalize=normalize)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("power", ["1", "2"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("algorithm,chunk", [("chunk", 16), ("chunk", 32), ("chunk", 5), ("quadratic", 16),
                                             ("recurrent", 16)])
def test_algorithms_float64(power, normalize, decay, algorithm, chunk):
    """Every algorithm with a state in and out == the float64 recurrence, forward and all gradients
    (N = 37: not a multiple of any chunk size)."""
    B, H, N, d, dv = 2, 2, 37, 8, 6
    q, k, v, g = make_inputs(2, B, H, N, d, dv, positive=normalize and power == "1")
    g = g if decay else torch.zeros_like(g)  # g = 0 is no decay; its gradient is still checked
    s0 = random_state(3, B, H, d, dv, power)

    def run(q, k, v, g, s0):
        return power_attention(q, k, v, g, power=power, normalize=normalize, initial_state=s0,
                               output_final_state=True, algorithm=algorithm, chunk_size=chunk, backend="torch")

    def ref(q, k, v, g, s0):
        return power_attention_naive(q, k, v, g, power=power, normalize=normalize, initial_state=s0,
                                     output_final_state=True)

    outs, gs = grads(run, (q, k, v, g, s0))
    routs, rgs = grads(ref, (q, k, v, g, s0))
    for a, b in zip(outs + gs, routs + rgs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("power", ["1", "2"])
def test_split_anywhere_equals_one_call(power):
    B, H, N, d, dv = 1, 2, 41, 8, 4
    q, k, v, g = make_inputs(4, B, H, N, d, dv, decay=0.5)
    whole, final = power_attention(q, k, v, g, power=power, output_final_state=True, algorithm="chunk",
                                   chunk_size=16, backend="torch")
    for cuts in ([1], [16, 17], [5, 6, 30, 40]):
        state, pieces, start = None, [], 0
        for i, end in enumerate(cuts + [N]):
            algorithm = ("quadratic", "chunk", "recurrent")[i % 3]
            o, state = power_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                       g[:, :, start:end], power=power, initial_state=state,
                                       output_final_state=True, algorithm=algorithm, chunk_size=16,
                                       backend="torch")
            pieces.append(o)
            start = end
        torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(state, final, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("power", ["1", "2"])
def test_prefill_in_segments(power, monkeypatch):
    """Without gradients a long input runs in segments of whole chunks (here 2 chunks of 8 tokens, then 5
    tokens) with the state passed on: o and the final state == the float64 recurrence, with or without an
    initial state, decay or no decay."""
    from kernel.power import chunk

    B, H, N, d, dv = 2, 2, 37, 8, 4
    monkeypatch.setattr(chunk, "SEGMENT_TOKENS", B * H * 8 * 2)
    q, k, v, g = make_inputs(16, B, H, N, d, dv, decay=0.5, positive=power == "1")
    for s0, gg in ((None, g), (random_state(17, B, H, d, dv, power), None)):
        ref, ref_state = power_attention_naive(q, k, v, gg, power=power, initial_state=s0, output_final_state=True)
        with torch.no_grad():
            out, state = power_attention(q, k, v, gg, power=power, initial_state=s0, output_final_state=True,
                                         algorithm="chunk", chunk_size=8, backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(state, ref_state, rtol=1e-9, atol=1e-10)


def test_extreme_decay_and_no_decay():
    """Decays from 0 to -1e4 per token: the chunked form keeps every exponent a difference inside a chunk."""
    B, H, N, d, dv = 1, 2, 50, 8, 4
    q, k, v, g = make_inputs(5, B, H, N, d, dv)
    g = g * torch.tensor([1e-6, 1e4], dtype=torch.float64)[None, :, None]
    for gg in (g, None):
        ref = attention_reference(q, k, v, gg, power="2")
        out, state = power_attention(q, k, v, gg, power="2", output_final_state=True, algorithm="chunk",
                                     chunk_size=16, backend="torch")
        assert torch.isfinite(state).all()
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@interpreter
def test_chunk_triton_extreme_decay_and_no_decay():
    """The kernels' decays (one kernel each way, float64 sums inside the chunks) at decays from 0 to -1e4 per
    token, and without decay: o, the final state and every gradient == the float64 recurrence's."""
    B, H, N, d, dv = 1, 2, 21, 8, 6
    q, k, v, g = make_inputs(31, B, H, N, d, dv)
    g = g * torch.tensor([1e-6, 1e4], dtype=torch.float64)[None, :, None]
    s0 = random_state(32, B, H, d, dv, "2")
    for gg in (g, None):
        def call(fn, *t, **kw):
            q_, k_, v_, s_, *g_ = t
            return fn(q_, k_, v_, g_[0] if g_ else None, power="2", initial_state=s_, output_final_state=True, **kw)

        tensors = [q, k, v, s0] + ([gg] if gg is not None else [])
        outs, gs = grads(lambda *t: call(power_attention, *t, algorithm="chunk", chunk_size=8, backend="triton"),
                         [t.float() for t in tensors])
        routs, rgs = grads(lambda *t: call(power_attention_naive, *t), tensors)
        assert all(torch.isfinite(x).all() for x in outs + gs)
        assert_rel_close(outs + gs, routs + rgs, 2e-5)


@pytest.mark.parametrize("algorithm", ["quadratic", "chunk", "recurrent"])
def test_keys_and_values_in_other_dtypes(algorithm):
    """k and v in other float dtypes than q are taken in q's, on every algorithm, as kernel.attention does."""
    q, k, v, g = make_inputs(33, 1, 2, 13, 8, 6)
    q = q.float()
    got = power_attention(q, k, v.half(), g, algorithm=algorithm, chunk_size=4, backend="torch")
    ref = power_attention(q, k.float(), v.half().float(), g, algorithm=algorithm, chunk_size=4, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_zero_rows_give_zero():
    q, k, v, g = make_inputs(6, 1, 1, 20, 4, 3)
    k[:, :, :7] = 0  # the first 7 rows see only zero keys: normaliser 0
    out = power_attention(q, k, v, g, power="2", algorithm="chunk", chunk_size=8, backend="torch")
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("algorithm", ["quadratic", "chunk", "recurrent"])
def test_bnhd_layout_equals_bhnd(algorithm):
    """layout "bnhd" ([B, N, H, d] in, o out in it, the state as ever) == the [B, H, N, d] call, with and without
    a state."""
    q, k, v, g = make_inputs(18, 2, 3, 21, 8, 6)
    s0 = random_state(19, 2, 3, 8, 6, "2")
    bnhd = [t.transpose(1, 2) for t in (q, k, v, g)]
    kw = dict(algorithm=algorithm, chunk_size=8, backend="torch")
    ref_o, ref_s = power_attention(q, k, v, g, initial_state=s0, output_final_state=True, **kw)
    o, state = power_attention(*bnhd, initial_state=s0, output_final_state=True, layout="bnhd", **kw)
    torch.testing.assert_close(o, ref_o.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, ref_s, rtol=1e-12, atol=1e-12)
    if algorithm != "recurrent":
        o = power_attention(*bnhd, layout="bnhd", **kw)
        torch.testing.assert_close(o, power_attention(q, k, v, g, **kw).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    q, k, v, g = make_inputs(7, 1, 1, 4, 4, 3)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        power_attention(q, k, v, g, algorithm="parallel")
    with pytest.raises(ValueError, match="no finite state"):
        power_attention(q, k, v, g, power="exp", output_final_state=True)
    with pytest.raises(ValueError, match="initial_state must be"):
        power_attention(q, k, v, g, initial_state=torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="layout must be one of"):
        power_attention(q, k, v, g, layout="nhd")
    with pytest.raises(ValueError, match="chunk_size"):
        power_attention(q, k, v, g, algorithm="chunk", chunk_size=0)
    from kernel.power import auto_algorithm

    with pytest.raises(ValueError, match="power must be one of"):
        auto_algorithm(4, "3")


@interpreter
@pytest.mark.parametrize("power,normalize", [("1", False), ("2", True), ("2", False)])
@pytest.mark.parametrize("has_state", [True, False])
def test_chunk_triton_interpreter(power, normalize, has_state):
    """The chunked form through the Triton kernels (fp32) against the float64 recurrence, all gradients."""
    B, H, N, d, dv = 1, 2, 21, 8, 6
    q, k, v, g = make_inputs(8, B, H, N, d, dv, decay=2.0)
    s0 = random_state(9, B, H, d, dv, power) if has_state else None

    def tensors(dtype):
        return [t.to(dtype) for t in (q, k, v, g)] + ([s0.to(dtype)] if has_state else [])

    outs, gs = stateful_grads(power_attention, tensors(torch.float32), power, normalize=normalize,
                              algorithm="chunk", chunk_size=8, backend="triton")
    routs, rgs = stateful_grads(power_attention_naive, tensors(torch.float64), power, normalize=normalize)
    assert_rel_close(outs + gs, routs + rgs, 2e-5)


@interpreter
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N,has_state", [(24, False), (21, True)])
def test_chunk_triton_bnhd_views(normalize, N, has_state):
    """The model's call: q, k, v [B, N, H, d] views of one [B, N, 3 H d] projection and g [B, N, H] through the
    chunked form's kernels in that layout (strided blocks, no transposed copies; padded when N is not a multiple
    of the chunk) == the float64 recurrence on [B, H, N, d]: o, the final state and every gradient (of the
    projection, g and the initial state); o comes back contiguous in [B, N, H, dv] without padding."""
    B, H, d = 2, 3, 8
    q, k, v, g = make_inputs(21, B, H, N, d, d, decay=2.0)
    s0 = [random_state(22, B, H, d, d, "2")] if has_state else []
    qkv = projection(q, k, v)
    g_n = g.transpose(1, 2).contiguous()

    def fused(qkv, g_n, *s):
        return power_attention(*projection_views(qkv, H), g_n, normalize=normalize, initial_state=s[0] if s else None,
                               output_final_state=has_state, algorithm="chunk", chunk_size=8, backend="triton",
                               layout="bnhd")

    def reference(qkv, g_n, *s):
        out = power_attention_naive(*(t.transpose(1, 2) for t in projection_views(qkv, H)), g_n.transpose(1, 2),
                                    power="2", normalize=normalize, initial_state=s[0] if s else None,
                                    output_final_state=has_state)
        return (out[0].transpose(1, 2), out[1]) if has_state else out.transpose(1, 2)

    outs, gs = grads(fused, [t.float() for t in [qkv, g_n] + s0])
    routs, rgs = grads(reference, [qkv, g_n] + s0)
    assert_rel_close(outs + gs, routs + rgs, 2e-5)
    assert outs[0].shape == (B, N, H, d) and (N % 8 or outs[0].is_contiguous())


@interpreter
@pytest.mark.parametrize("state_only", [False, True])
def test_chunk_triton_projection_gradient_in_one_tensor(state_only):
    """q, k, v the thirds of one [B, N, 3 H d] projection (N a multiple of the chunk, as the model trains): the
    kernels write the projection's gradient as one tensor, so autograd concatenates nothing (one copy of the
    projection's size less a layer) == the float64 recurrence; with a loss on the final state alone, the queries'
    third of the gradient is zero."""
    B, H, N, d = 1, 2, 16, 8
    q, k, v, g = make_inputs(29, B, H, N, d, d, decay=2.0)
    s0 = random_state(30, B, H, d, d, "2")
    g_n = g.transpose(1, 2).contiguous()

    def run(fn, qkv, g_n, s, **kw):
        if fn is power_attention_naive:
            o, state = fn(*(t.transpose(1, 2) for t in projection_views(qkv, H)), g_n.transpose(1, 2), power="2",
                          initial_state=s, output_final_state=True)
            o = o.transpose(1, 2)
        else:
            o, state = fn(*projection_views(qkv, H), g_n, power="2", initial_state=s, output_final_state=True,
                          layout="bnhd", **kw)
        return state if state_only else (o, state)

    qkv = projection(q, k, v).float().requires_grad_()
    tensors = [g_n.float().requires_grad_(), s0.float().requires_grad_()]
    out = run(power_attention, qkv, *tensors, algorithm="chunk", chunk_size=8, backend="triton")
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(123)  # the loss of grads(), which the reference takes
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    cats = CountOps(lambda func, args: func is torch.ops.aten.cat.default)
    with cats:
        loss.backward()
    assert cats.calls == 0
    routs, rgs = grads(lambda *t: run(power_attention_naive, *t), [projection(q, k, v), g_n, s0])
    assert_rel_close([o.detach() for o in outs] + [qkv.grad] + [t.grad for t in tensors], list(routs) + rgs, 2e-5)
    if state_only:
        assert not qkv.grad[..., :H * d].any()


def test_feature_blocks_bad_layout():
    """Blocks given to the feature products must share the heads of a and have contiguous columns: a one-line
    error, not a silently wrong read."""
    from kernel.power.features import _blocks

    x = torch.zeros(2, 8, 3, 4)
    with pytest.raises(ValueError, match="blocks of 2 heads with contiguous columns expected"):
        _blocks(x, 2)
    with pytest.raises(ValueError, match="contiguous columns"):
        _blocks(torch.zeros(2, 8, 4, 3).transpose(2, 3), 3)
    assert _blocks(x, 3) is x and _blocks(torch.zeros(6, 8, 4), 3).shape == (2, 8, 3, 4)


@interpreter
def test_chunk_in_pieces(monkeypatch):
    """More chunks than the in-chunk kernel's grid takes (MAX_GRID_HEADS, made small here): the sequences (batch
    x heads) run in slices, with the outputs, final states and every gradient of one call; a single sequence of
    more chunks than that is refused."""
    from kernel.power import chunk

    B, H, N, d, dv = 2, 3, 21, 8, 6  # 3 chunks of 8 per sequence
    q, k, v, g = make_inputs(29, B, H, N, d, dv, decay=2.0)
    s0 = random_state(30, B, H, d, dv, "2")
    tensors = [t.float() for t in (q, k, v, g, s0)]
    kw = dict(algorithm="chunk", chunk_size=8, backend="triton")
    whole = stateful_grads(power_attention, tensors, "2", **kw)
    monkeypatch.setattr(chunk, "MAX_GRID_HEADS", 7)  # two sequences a slice
    pieces = stateful_grads(power_attention, tensors, "2", **kw)
    for a, b in zip(*(outs + gs for outs, gs in (whole, pieces))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(chunk, "MAX_GRID_HEADS", 2)
    with pytest.raises(ValueError, match="at most 2 chunks per sequence, got 3"):
        power_attention(*tensors[:4], **kw)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_chunk_state_only(backend):
    """A loss on the final state alone (o unused, so no gradient reaches the queries' reads of the state):
    the gradients of k, v, g and the initial state == the float64 recurrence's, and q gets none."""
    B, H, N, d, dv = 1, 2, 21, 8, 6
    q, k, v, g = make_inputs(27, B, H, N, d, dv, decay=2.0)
    s0 = random_state(28, B, H, d, dv, "2")
    dtype = torch.float64 if backend == "torch" else torch.float32

    def final_state(fn, *t, **kw):
        return fn(*t[:4], power="2", initial_state=t[4], output_final_state=True, **kw)[1]

    outs, gs = grads(lambda *t: final_state(power_attention, *t, algorithm="chunk", chunk_size=8, backend=backend),
                     [t.to(dtype) for t in (q, k, v, g, s0)])
    routs, rgs = grads(lambda *t: final_state(power_attention_naive, *t), (q, k, v, g, s0))
    assert gs[0] is None
    assert_rel_close(outs + gs[1:], routs + rgs[1:], 1e-8 if backend == "torch" else 2e-5)


@pytest.mark.parametrize("power,normalize", [("1", False), ("1", True), ("2", False), ("2", True)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_chunk_output_only(power, normalize, backend):
    """The training call, no final state (z formed only to normalise; intra on v alone without normalisation),
    == the float64 recurrence: o and the gradients of q, k, v, g and the initial state."""
    B, H, N, d, dv = 1, 2, 21, 8, 6
    q, k, v, g = make_inputs(22, B, H, N, d, dv, decay=2.0, positive=normalize and power == "1")
    s0 = random_state(23, B, H, d, dv, power)
    dtype = torch.float64 if backend == "torch" else torch.float32
    outs, gs = grads(lambda *t: power_attention(*t[:4], power=power, normalize=normalize, initial_state=t[4],
                                                algorithm="chunk", chunk_size=8, backend=backend),
                     [t.to(dtype) for t in (q, k, v, g, s0)])
    routs, rgs = grads(lambda *t: power_attention_naive(*t[:4], power=power, normalize=normalize, initial_state=t[4]),
                       (q, k, v, g, s0))
    assert_rel_close(outs + gs, routs + rgs, 1e-8 if backend == "torch" else 2e-5)


@pytest.mark.parametrize("power,normalize", [("1", False), ("2", True)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_recompute_states(power, normalize, backend):
    """recompute_states=True (training under activation checkpointing) gives the outputs and gradients of
    keeping the states, bit for bit, while nothing saved for the backward pass is as large as the per-chunk
    states: they are formed again there (the fused state part on the kernels, torch.utils.checkpoint on the
    PyTorch path)."""
    B, H, N, d, dv, C = 1, 2, 21, 8, 6, 4  # C < d: the states (d x dv for power 1) outsize every other tensor
    q, k, v, g = make_inputs(25, B, H, N, d, dv, decay=1.0, positive=power == "1")
    s0 = random_state(26, B, H, d, dv, power)
    dtype = torch.float64 if backend == "torch" else torch.float32
    states_numel = B * H * -(-N // C) * state_size(d, power) * dv
    results = []
    for recompute in (False, True):
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results.append(stateful_grads(power_attention, [t.to(dtype) for t in (q, k, v, g, s0)], power,
                                          normalize=normalize, algorithm="chunk", chunk_size=C,
                                          recompute_states=recompute, backend=backend))
        assert (max(saved) >= states_numel) != recompute, (recompute, max(saved), states_numel)
    for a, b in zip(*(outs + gs for outs, gs in results)):
        assert torch.equal(a, b)


def test_chunk_bf16_as_accurate_as_quadratic():
    """In bf16 at weak decay (a long effective context) the chunked form's o and gradients are about as close to
    float64 as the quadratic form's: its in-chunk sums stay float32 until they are divided by the whole
    context's normaliser (rounded to bf16 first, its dq and dk errors were 2.1x the quadratic form's here)."""
    B, H, N, d, dv = 1, 2, 1000, 64, 64
    q, k, v, g = make_inputs(24, B, H, N, d, dv, decay=0.05)

    def run(fn, dtype, **kw):
        return grads(lambda *t: fn(*t, power="2", **kw), [t.to(dtype) for t in (q, k, v)] + [g])

    ref = sum(run(attention_reference, torch.float64), [])
    errors = {}
    for algorithm in ("chunk", "quadratic"):
        got = sum(run(power_attention, torch.bfloat16, algorithm=algorithm, chunk_size=256, backend="torch"), [])
        errors[algorithm] = torch.tensor([rel_err(a, b) for a, b in zip(got, ref)])
    assert (errors["chunk"] < 1.4 * errors["quadratic"]).all(), errors


@interpreter
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_combine(normalize):
    """intra + inter * decay (and intra_den + inter_z * decay), divided and cast in one kernel each way == the
    PyTorch formula: o and every gradient, over rows that span two programs, dv off the block, and rows whose
    normaliser is 0 (o = 0, zero gradients)."""
    from kernel.power.chunk import COMBINE_ROWS, combine

    gen = torch.Generator().manual_seed(20)
    R, dv = COMBINE_ROWS + 5, 6
    intra, inter, dens = (torch.randn(*shape, generator=gen) for shape in ((R, dv), (R, dv), (2, R)))
    intra_den, inter_z = dens
    if normalize:
        intra_den[:3], inter_z[:3] = 1.0, -1.0  # den = 1 + (-1) * 1 = 0 with decay 1
    decay = torch.rand(R, generator=gen) + 0.5
    decay[:3] = 1.0

    def run(fused):
        if normalize:
            return lambda *t: combine(*t, normalize=True, fused=fused, out_dtype=t[0].dtype)
        return lambda a, b, c: combine(a, None, b, None, c, normalize=False, fused=fused, out_dtype=a.dtype)

    tensors = (intra, intra_den, inter, inter_z, decay) if normalize else (intra, inter, decay)
    out, gs = grads(run(True), tensors)
    ref, rgs = grads(run(False), [t.double() for t in tensors])
    assert_rel_close(out + gs, ref + rgs, 1e-5)  # float32 against float64
    if normalize:
        assert torch.equal(out[0][:3], torch.zeros(3, dv))
        assert not any(g[:3].any() for g in gs)


@interpreter
@pytest.mark.parametrize("n", [1, 2, 5])
def test_state_scan_triton_matches_torch(n):
    """The scans (each step loads the next chunk's rows ahead) == the float64 loop, every gradient, from one chunk."""
    gen = torch.Generator().manual_seed(10)
    u = torch.randn(3, n, 2100, generator=gen)
    log_decay = -torch.rand(3, n, generator=gen) * 3
    h0 = torch.randn(3, 2100, generator=gen)
    outs, gs = grads(lambda u, l, h: state_scan(u, l, h, backend="triton"), (u, log_decay, h0))
    routs, rgs = grads(lambda u, l, h: state_scan(u, l, h, backend="torch"), (u.double(), log_decay.double(),
                                                                              h0.double()))
    assert_rel_close(outs + gs, routs + rgs, 1e-6)


@interpreter
@pytest.mark.parametrize("power", ["1", "2"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("block_r,block_v,layout", [(64, 16, "none"), (16, 4, "rows"), (8, 16, "columns"),
                                                     (64, 4, "columns")])
def test_recurrent_step_kernel(power, normalize, block_r, block_v, layout, monkeypatch):
    """Decoding token by token with the fused Triton step == the float64 recurrence over the whole sequence;
    the state's rows (36 for power 2, 8 for power 1) in one block or several (the last one partial), its 6
    value columns in one tile of 8 or in two groups of 4 (the second partial); the state made by the first
    step ("none"), or given contiguous ("rows") or in zero_state's column-major layout ("columns") and updated
    in place from the first step on."""
    from kernel.power import recurrent

    monkeypatch.setattr(recurrent, "BLOCK_R", block_r)
    monkeypatch.setattr(recurrent, "BLOCK_V", block_v)
    B, H, N, d, dv = 2, 3, 6, 8, 6
    q, k, v, g = (t.float() for t in make_inputs(11, B, H, N, d, dv, positive=power == "1"))
    k[0, 0, 0] = 0  # the first step of that head has no weight at all: den = 0, o = 0
    ref, ref_state = power_attention_naive(q.double(), k.double(), v.double(), g.double(), power=power,
                                           normalize=normalize, output_final_state=True)
    # the projection's layout [B, N, H, .] seen as [B, H, N, .]: the step reads it through its strides
    q, k, v, g = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, g))
    D = state_size(d, power)
    state = {"none": None, "rows": torch.zeros(B, H, D, dv + 1), "columns": zero_state(B, H, D, dv, "cpu")}[layout]
    outs = []
    with torch.no_grad():
        for t in range(N):  # a step without a state makes one, the others update theirs in place
            o, new_state = power_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], g[:, :, t:t + 1],
                                           power=power, normalize=normalize, initial_state=state,
                                           output_final_state=True, inplace=state is not None, backend="triton")
            assert state is None or new_state is state
            state = new_state
            outs.append(o)
    assert rel_err(torch.cat(outs, dim=2), ref) < 1e-5
    assert rel_err(state, ref_state) < 1e-5


gpu = pytest.mark.gpu
hopper_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="kernel/power/hopper.py's Gluon kernels are for sm_90")


@gpu
@pytest.mark.parametrize("power", ["1", "2"])
@pytest.mark.parametrize("N", [1000, 4133])
def test_gpu_chunk_bf16(power, N):
    """Real shapes on the GPU in bf16: o and every gradient within 1e-2 of float64 (relative norm)."""
    B, H, d, dv = 2, 4, 64, 64
    q, k, v, g = make_inputs(12, B, H, N, d, dv, decay=0.2, positive=power == "1")
    s0 = random_state(13, B, H, d, dv, power)

    def tensors(dtype):
        return [t.to(device="cuda", dtype=dtype) for t in (q, k, v)] + [g.cuda(), s0.cuda()]

    outs, gs = stateful_grads(power_attention, tensors(torch.bfloat16), power, algorithm="chunk")
    routs, rgs = stateful_grads(power_attention_naive, tensors(torch.float64), power)
    assert_rel_close(outs + gs, routs + rgs, 1e-2)


@gpu
def test_gpu_feature_kernels_pipelined_equal_unpipelined(monkeypatch):
    """The fused feature products with their software pipeline == the same kernels with one stage, bit for bit,
    over many programs (2048 blocks, bf16) and repeated calls: the order of the sums is the same, so any
    difference is a race in the pipeline. Versions of apply and grad that chained their steps in the accumulator
    failed this way on an H200 (NaN or wrong rows in some programs; bench/NOTES.md) while matching float64 at 32
    blocks."""
    from kernel.power import features

    T, C, d, E = 2048, 256, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(31)
    a, b, dy = (torch.randn(T, C, w, device="cuda", generator=gen).bfloat16() for w in (d, E, E))
    m = (torch.randn(T, d * (d + 1) // 2, E, device="cuda", generator=gen) / 30).bfloat16()
    w = torch.rand(T, C, device="cuda", generator=gen)
    calls = {"outer": lambda: features.outer(a, b), "apply": lambda: features.apply(a, m, torch.float32),
             "grad": lambda: features.grad(a, m, dy),  # and with token weights (the keys' decays):
             "outer w": lambda: features.outer(a, b, w), "apply w": lambda: features.apply(a, m, b.dtype, w, b),
             "grad w": lambda: features.grad(a, m, dy, w),
             "grad adds": lambda: features.grad(a, m, dy, w, adds=(a, a * 2)),  # other terms before the one rounding
             "apply add": lambda: features.apply(a, m, b.dtype, w, b, add=dy)}
    monkeypatch.setattr(features, "hopper", None)  # the Triton outer product everywhere (Hopper's: below)
    got = {name: [fn() for _ in range(3)] for name, fn in calls.items()}
    for launch in (features.OUTER, features.APPLY, features.GRAD):  # each product's launch constants
        monkeypatch.setitem(launch, "NUM_STAGES", 1)
    for name, fn in calls.items():
        ref = fn()
        for outs in got[name]:
            for out, r in zip(*((x,) if torch.is_tensor(x) else x for x in (outs, ref))):
                assert not r.isnan().any(), name
                assert torch.equal(out, r), f"{name}: pipelined != one stage ({(out != r).float().mean():.1e} differ)"


@gpu
@hopper_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [256, 200, 40])
def test_gpu_hopper_outer_equals_triton_kernel(monkeypatch, dtype, C):
    """kernel/power/hopper.py's outer product == features._outer_kernel bit for bit (the same roundings and
    tensor-core sums) and near float64, on the model's [B, N, H, .] views of one projection, with and without
    token weights, over 192 blocks, for chunks of 256 tokens and shorter ones the blocks pad."""
    from kernel.power import features

    hopper = pytest.importorskip("kernel.power.hopper")  # written for Triton 3.6's Gluon
    U, H, d = 12, 16, 64
    gen = torch.Generator(device="cuda").manual_seed(37)
    qkv = torch.randn(U, C, H, 3 * d, device="cuda", generator=gen).to(dtype)
    k, v = qkv[..., d:2 * d], qkv[..., 2 * d:]  # strided views, as the model's
    w = torch.rand(U * H, C, device="cuda", generator=gen) ** 4  # decays in (0, 1]
    assert hopper.applies(k, v) and C <= hopper.OUTER_MAX_C
    for weights in (w, None):
        got = features.outer(k, v, weights)
        with monkeypatch.context() as m:
            m.setattr(features, "hopper", None)
            ref = features.outer(k, v, weights)
        assert torch.equal(got, ref), f"{(got != ref).float().mean():.1e} differ"
        a = k.transpose(1, 2).reshape(U * H, C, d)
        b = v.transpose(1, 2).reshape(U * H, C, d)
        if weights is not None:  # w b rounded once to the inputs' dtype, as both kernels do
            b = (b.float() * weights[..., None]).to(dtype)
        exact = features.feature_outer(a.double(), b.double(), power="2")
        assert rel_err(got.double(), exact) < 1e-2


@gpu
@hopper_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [256, 200, 40])
def test_gpu_hopper_apply_near_float64(monkeypatch, dtype, C):
    """kernel/power/hopper.py's apply phi(a) M, and with token weights and an added term (w phi(a) M + add,
    <phi(a) M, b>), on the model's [B, N, H, .] views over 192 blocks: within 5e-3 of float64 (as close as
    features._apply_kernel, whose sums round differently), the same bits on every call (its steps chained in
    one accumulator while the next steps' rows stream in; a race in that pipeline would change some), and the
    outputs written in place where given."""
    from kernel.power import features

    hopper = pytest.importorskip("kernel.power.hopper")  # written for Triton 3.6's Gluon
    U, H, d = 12, 16, 64
    T = U * H
    gen = torch.Generator(device="cuda").manual_seed(41)
    qkv = torch.randn(U, C, H, 3 * d, device="cuda", generator=gen).to(dtype)
    a, b, add = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # strided views, as the model's
    m = (torch.randn(T, d * (d + 1) // 2, d, device="cuda", generator=gen) / 30).to(dtype)
    w = torch.rand(T, C, device="cuda", generator=gen) ** 4
    assert hopper.applies(a, m)
    blocks = [x.transpose(1, 2).reshape(T, C, d).double() for x in (a, b, add)]
    y = features.feature_apply(blocks[0], m.double(), power="2")
    exact = {"plain": (y,), "w add": (w.double()[..., None] * y + blocks[2], (y * blocks[1]).sum(-1))}
    calls = {"plain": lambda: (features.apply(a, m, torch.float32),),
             "w add": lambda: features.apply(a, m, dtype, w, b, add=add)}
    for name, fn in calls.items():
        got = fn()
        with monkeypatch.context() as mp:
            mp.setattr(features, "hopper", None)
            ref = fn()
        for x, r, e in zip(got, ref, exact[name]):
            err = rel_err(x.double(), e)
            assert err < 5e-3, f"{name}: {err:.1e} from float64 (the Triton kernel: {rel_err(r.double(), e):.1e})"
        for _ in range(3):
            assert all(torch.equal(x, y) for x, y in zip(fn(), got)), name
    out = torch.empty(U, C, H, d, device="cuda", dtype=dtype)  # the backward's d v, written into its blocks
    dst, _ = features.apply(a, m, dtype, w, b, add=add, out=out)
    assert dst is out and rel_err(out.transpose(1, 2).reshape(T, C, d).double(), exact["w add"][0]) < 5e-3


@gpu
@pytest.mark.parametrize("power,normalize", [("1", False), ("2", False), ("2", True)])
def test_gpu_chunk_output_only_bf16(power, normalize):
    """The training call at real shapes in bf16 (no final state: z only when normalising, the chunk term on v
    alone without normalisation): o and every gradient within 1e-2 of float64."""
    B, H, N, d, dv = 2, 4, 1000, 64, 64
    q, k, v, g = make_inputs(24, B, H, N, d, dv, decay=0.2, positive=power == "1")

    def run(fn, dtype, **kw):
        tensors = [t.to(device="cuda", dtype=dtype) for t in (q, k, v)] + [g.cuda()]
        return grads(lambda *t: fn(*t, power=power, normalize=normalize, **kw), tensors)

    outs, gs = run(power_attention, torch.bfloat16, algorithm="chunk")
    routs, rgs = run(power_attention_naive, torch.float64)
    assert_rel_close(outs + gs, routs + rgs, 1e-2)


@gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_gpu_chunk_bnhd_views_bf16(recompute):
    """The model's training call at real shapes in bf16: q, k, v [B, N, H, d] views of one projection, g
    [B, N, H], the chunked kernels reading and writing that layout: o and every gradient within 1e-2 of float64."""
    B, H, N, d = 2, 4, 1000, 64
    q, k, v, g = make_inputs(25, B, H, N, d, d, decay=0.2)
    qkv = projection(q, k, v).cuda()

    def run(fn, dtype, **kw):
        def call(qkv, g_n):
            views = projection_views(qkv, H)
            if fn is power_attention_naive:
                return fn(*(t.transpose(1, 2) for t in views), g_n.transpose(1, 2), power="2").transpose(1, 2)
            return fn(*views, g_n, power="2", layout="bnhd", **kw)
        return grads(call, [qkv.to(dtype), g.transpose(1, 2).contiguous().cuda()])

    outs, gs = run(power_attention, torch.bfloat16, algorithm="chunk", recompute_states=recompute)
    routs, rgs = run(power_attention_naive, torch.float64)
    assert_rel_close(outs + gs, routs + rgs, 1e-2)


@gpu
@pytest.mark.parametrize("power", ["1", "2"])
def test_gpu_recurrent_step(power):
    B, H, N, d, dv = 3, 4, 40, 64, 64
    q, k, v, g = (t.cuda() for t in make_inputs(14, B, H, N, d, dv, decay=0.3, positive=power == "1"))
    _, state = power_attention(q[:, :, :-1].float(), k[:, :, :-1].float(), v[:, :, :-1].float(), g[:, :, :-1],
                               power=power, output_final_state=True, algorithm="chunk")
    with torch.no_grad():
        o, s = power_attention(q[:, :, -1:].float(), k[:, :, -1:].float(), v[:, :, -1:].float(), g[:, :, -1:],
                               power=power, initial_state=state, output_final_state=True)
    ref, ref_state = power_attention_naive(q, k, v, g, power=power, output_final_state=True)
    assert rel_err(o, ref[:, :, -1:]) < 1e-4
    assert rel_err(s, ref_state) < 1e-4


def _normaliser_products(power, T, C, d):
    """feature_weighted_sum and feature_dot against the materialised features in float64, with gradients."""
    from kernel.power.features import feature_dot, feature_weighted_sum
    from kernel.power.naive import feature_map

    gen = torch.Generator().manual_seed(21)
    D = state_size(d, power)
    a, w, z = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((T, C, d), (T, C), (T, D)))
    got = grads(lambda a, w, z: (feature_weighted_sum(a, w, power=power), feature_dot(a, z, power=power)), (a, w, z))
    ref = grads(lambda a, w, z: ((feature_map(a, power).transpose(1, 2) @ w[..., None]).squeeze(-1),
                                 (feature_map(a, power) @ z[..., None]).squeeze(-1)), (a, w, z))
    return got[0] + got[1], ref[0] + ref[1]


@pytest.mark.parametrize("power", ["1", "2"])
def test_normaliser_products(power):
    """The state's normaliser part through d x d products == the materialised features, with gradients:
    phi(a)^T w (feature_weighted_sum) and phi(a) z (feature_dot), float64, d = 7 (odd, no tiling)."""
    for x, y in zip(*_normaliser_products(power, 3, 10, 7)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def _kron_grad(a, m, dy):
    """d a of <phi(a) m, dy> in float64 by autograd through the materialised features."""
    from kernel.power.naive import feature_map

    a = a.double().requires_grad_()
    return torch.autograd.grad((feature_map(a, "2") @ m.double() * dy.double()).sum(), a)[0]


@interpreter
@pytest.mark.parametrize("T,C,d,E", [(2, 5, 8, 16), (1, 16, 12, 33), (1, 17, 56, 80), (1, 150, 8, 16),
                                     (3, 150, 8, 33), (1, 300, 8, 16), (1, 300, 8, 33), (1, 300, 56, 16),
                                     (1, 9, 80, 16)])
def test_fused_feature_products(T, C, d, E):
    """The kernels of the chunked form's state part (features.py), float32, each against its float64 formula
    through the materialised kron features: phi(a)^T b and phi(a)^T (w b) (token weights in (0, 1], as the
    chunk's key decays), phi(a) M and, for the weighted product's backward, (w phi(a) M, <phi(a) M, b>), also plus
    another term, and the d a of <phi(a) M, dy> plain, times w and plus one or two other terms. C = 300 walks
    the chunk in blocks of tokens (the outer product's long-chunk path), C = 150 with T = 3 runs each block in
    two programs of apply and grad (a block's programs side by side), E = 33 and 80 take a second column tile,
    d = 56 the half-width steps past d / 2 with columns to mask (d pads to 64), d = 80 the outer product's
    steps of i in two programs (64 a program) and columns padded to 128."""
    from kernel.power import features
    from kernel.power.naive import feature_map

    gen = torch.Generator().manual_seed(15)
    nf = d * (d + 1) // 2
    a, b, dy = (torch.randn(T, C, x, generator=gen) for x in (d, E, E))
    w = torch.rand(T, C, generator=gen) + 1e-3
    m = torch.randn(T, nf, E, generator=gen)
    add, add2 = (torch.randn(T, C, d, generator=gen) for _ in range(2))
    add_e = torch.randn(T, C, E, generator=gen)
    phi = feature_map(a.double(), "2")
    pm = phi @ m.double()
    got_w, got_dw = features.apply(a, m, torch.float32, w, b)
    got_w_add, got_dw_add = features.apply(a, m, torch.float32, w, b, add=add_e)
    checks = {
        "outer": (features.outer(a, b), phi.transpose(1, 2) @ b.double()),
        "outer w": (features.outer(a, b, w), phi.transpose(1, 2) @ (w.double()[..., None] * b.double())),
        "apply": (features.apply(a, m, torch.float32), pm),
        "apply w": (got_w, w.double()[..., None] * pm),
        "apply dw": (got_dw, (pm * b.double()).sum(-1)),
        "apply w add": (got_w_add, w.double()[..., None] * pm + add_e.double()),
        "apply w add, dw": (got_dw_add, (pm * b.double()).sum(-1)),
        "grad": (features.grad(a, m, dy), _kron_grad(a, m, dy)),
        "grad w add": (features.grad(a, m, dy, w, adds=(add,)),
                       w.double()[..., None] * _kron_grad(a, m, dy) + add.double()),
        "grad two adds": (features.grad(a, m, dy, adds=(None, add, add2)),
                          _kron_grad(a, m, dy) + add.double() + add2.double()),
    }
    for name, (x, ref) in checks.items():
        assert rel_err(x, ref) < 1e-5, f"{name}: relative error {rel_err(x, ref):.2e}"
    with pytest.raises(ValueError, match="at most two terms"):
        features.grad(a, m, dy, adds=(add, add, add2))


@interpreter
@pytest.mark.parametrize("T,C,d", [(2, 10, 7), (1, 150, 12), (1, 33, 16)])
def test_fused_normaliser_products(T, C, d):
    """The normaliser's kernels, float32, against their float64 formulas: phi(a)^T w (_gram_kernel),
    phi(a) . z and s times its gradient in a (_quad_kernel), alone and both from one launch; head widths below
    and at a 16-wide tile, C = 150 over three blocks of tokens of the gram and two programs of the quadratic
    form."""
    from kernel.power import features
    from kernel.power.naive import feature_map

    gen = torch.Generator().manual_seed(21)
    a, w, s = torch.randn(T, C, d, generator=gen), torch.randn(T, C, generator=gen), torch.randn(T, C, generator=gen)
    z = torch.randn(T, d * (d + 1) // 2, generator=gen)
    a64 = a.double().requires_grad_()
    phi = feature_map(a64, "2")
    dot = (phi @ z.double()[..., None]).squeeze(-1)
    checks = {"gram": (features.gram(a, w), (phi.transpose(1, 2) @ w.double()[..., None]).squeeze(-1)),
              "quad": (features.quad(a, z), dot),
              "quad grad": (features.quad(a, z, s), torch.autograd.grad((dot * s.double()).sum(), a64)[0])}
    checks["quad grad, with value"], checks["quad value, with grad"] = zip(features.quad(a, z, s, value=True),
                                                                           (checks["quad grad"][1], dot))
    for name, (x, ref) in checks.items():
        assert rel_err(x, ref) < 1e-5, f"{name}: relative error {rel_err(x, ref):.2e}"


def test_inplace_updates_the_given_state():
    q, k, v, g = make_inputs(16, 1, 2, 9, 8, 4)
    s0 = random_state(17, 1, 2, 8, 4, "2")
    ref_o, ref_state = power_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="torch")
    for n in (9, 1):
        state = s0.clone()
        o, out = power_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], g[:, :, :n], initial_state=state,
                                 output_final_state=True, inplace=True, backend="torch")
        assert out is state
        if n == 9:
            torch.testing.assert_close(state, ref_state)
    with pytest.raises(ValueError, match="inplace=True needs"):
        power_attention(q, k, v, g, inplace=True)
