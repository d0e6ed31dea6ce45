"""kernel.linears / linear / swiglu: the Triton kernel (CPU interpreter here, compiled on a GPU) against float64
and against the PyTorch formula they replace, and their dispatch (the formula for gradients, many rows,
autocast and mixed dtypes)."""
import re

import pytest
import torch
import torch.nn.functional as F

import kernel.dense as dense
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, LlamaDecoderLayer
from helpers import CountOps
from kernel import linear, linears, swiglu


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _f64_linear(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


# rows: one token, a few, the bound; widths and K off the blocks (BLOCK_N 32, BLOCK_K 128)
SHAPES = [(1, 48, 40), (3, 200, 16), (64, 130, 97), (5, 16, 300)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_linears_float32_match_float64(M, K, N):
    x = _rand(2, M, K)[:1]  # leading dims [1, M]
    ws = [_rand(N, K, seed=1), _rand(16, K, seed=2), _rand(N + 3, K, seed=3)]
    bs = [None, _rand(16, seed=4), _rand(N + 3, seed=5)]
    got = linears(x, ws, bs, backend="triton")
    assert [tuple(y.shape) for y in got] == [(1, M, N), (1, M, 16), (1, M, N + 3)]
    for y, w, b in zip(got, ws, bs):
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), _f64_linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_linears_any_count_of_weights(count):
    x = _rand(4, 64)
    ws = [_rand(8 * (i + 1) + 5, 64, seed=i + 1) for i in range(count)]
    for y, w in zip(linears(x, ws, backend="triton"), ws):
        torch.testing.assert_close(y.double(), _f64_linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_residual_and_swiglu_float32(M, K, N):
    x, w, wu, r = _rand(M, K), _rand(N, K, seed=1), _rand(N, K, seed=2), _rand(M, N, seed=3)
    torch.testing.assert_close(linear(x, w, residual=r, backend="triton").double(), r.double() + _f64_linear(x, w),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w, backend="triton").double(), _f64_linear(x, w), rtol=1e-5, atol=1e-5)
    ref = F.silu(_f64_linear(x, w)) * _f64_linear(x, wu)  # products of two sums of K terms: float32's rounding
    torch.testing.assert_close(swiglu(x, w, wu, backend="triton").double(), ref, rtol=1e-5, atol=1e-6 * K)


def test_half_precision_rounds_like_the_formula():
    """float16 (the tensor-core products bf16 takes on a GPU): each product rounded to x's dtype before the
    elementwise ops, as the formula; the kernel's outputs within a rounding of the formula's."""
    M, K, N = 32, 256, 96
    x, w, wu = (t.half() for t in (_rand(M, K), _rand(N, K, seed=1) / 16, _rand(N, K, seed=2) / 16))
    r = _rand(M, N, seed=3).half()
    for got, ref in [
        (linear(x, w, residual=r, backend="triton"), r.float() + (x.float() @ w.float().T).half().float()),
        (swiglu(x, w, wu, backend="triton"),
         F.silu((x.float() @ w.float().T).half().float()).half().float() * (x.float() @ wu.float().T).half().float()),
    ]:
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), ref.half().float(), rtol=2e-3, atol=2e-3)


def test_formula_when_the_kernel_does_not_apply(monkeypatch):
    """Gradients, more than MAX_ROWS rows, mixed dtypes: the formula (the launcher is never reached)."""
    monkeypatch.setattr(dense, "_launch", lambda *a, **k: pytest.fail("the kernel ran"))
    w = _rand(24, 32, seed=1)
    many = _rand(dense.MAX_ROWS + 1, 32)
    torch.testing.assert_close(linear(many, w, backend="triton"), F.linear(many, w))
    x = _rand(4, 32).requires_grad_()
    y = swiglu(x, w, w, backend="triton")
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None
    with pytest.raises(RuntimeError):  # F.linear's own error for a float32 x and a float16 weight
        linear(_rand(4, 32), w.half(), backend="triton")


@pytest.mark.parametrize("op", ["linears", "swiglu"])
def test_autocast_casts_x_once(op):
    """Under autocast, a float32 x feeding several products is cast once (one bf16 copy of x and one float32 copy of
    its gradient, where autocast makes one of each a product): the same outputs as the per-product casts, bit for
    bit, and gradients within bf16's rounding of the per-product ones (their sum is rounded once to bf16 before the
    one cast back)."""
    ws = [_rand(24, 40, seed=1), _rand(24, 40, seed=2)]

    def run(fn):
        leaf = _rand(6, 40).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(leaf * 1.0)  # not a leaf: autocast caches the casts of leaves (weights) only
        outs = out if isinstance(out, list) else [out]
        sum((y.float() * _rand(*y.shape, seed=9 + i)).sum() for i, y in enumerate(outs)).backward()
        return outs, leaf.grad

    if op == "linears":
        fused, formula = (lambda x: linears(x, ws)), (lambda x: [F.linear(x, w) for w in ws])
    else:
        fused, formula = (lambda x: swiglu(x, *ws)), (lambda x: F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1]))
    casts = [CountOps(lambda func, args: func is torch.ops.aten._to_copy.default and args[0].shape == (6, 40))
             for _ in range(2)]
    with casts[0]:
        outs, dx = run(fused)
    with casts[1]:
        ref_outs, ref_dx = run(formula)
    assert (casts[0].calls, casts[1].calls) == (2, 4)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    torch.testing.assert_close(dx, ref_dx, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call,message", [
    (lambda x, w: linears(x, [w] * 5), "1 to 4 weights"),
    (lambda x, w: linears(x, [w], [None, None]), "one bias (or None) per weight"),
    (lambda x, w: linear(x, w.T), "a weight must be [out, 32]"),
    (lambda x, w: linears(x, [w], [torch.zeros(3)]), "a bias must be [24]"),
    (lambda x, w: linear(x, w, residual=torch.zeros(4, 23)), "residual must be (4, 24)"),
    (lambda x, w: swiglu(x, w, w[:8]), "one shape"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(_rand(4, 32), _rand(24, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 32, 64])
def test_gpu_model_shapes_match_formula(M):
    """bf16 at the small model's shapes: the kernel against cuBLAS and the elementwise ops, within bf16's
    rounding (the two sum the K products in different orders)."""
    x, x2 = _rand(M, 1024, device="cuda", dtype=torch.bfloat16), _rand(M, 2048, device="cuda", dtype=torch.bfloat16)
    wqkv, wa = (_rand(n, 1024, seed=s, device="cuda", dtype=torch.bfloat16) / 32 for n, s in ((3072, 1), (16, 2)))
    wg, wu = (_rand(2048, 1024, seed=s, device="cuda", dtype=torch.bfloat16) / 32 for s in (3, 4))
    wd = _rand(1024, 2048, seed=5, device="cuda", dtype=torch.bfloat16) / 45
    r = _rand(M, 1024, seed=6, device="cuda", dtype=torch.bfloat16)
    for got, ref in [
        (linears(x, [wqkv, wa]), [F.linear(x, wqkv), F.linear(x, wa)]),
        ([swiglu(x, wg, wu)], [F.silu(F.linear(x, wg)) * F.linear(x, wu)]),
        ([linear(x2, wd, residual=r)], [r + F.linear(x2, wd)]),
    ]:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2)


Z_GATE_TYPE = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate"


@pytest.mark.parametrize("attention_type,mlp_type,launches", [
    (TWO_MAMBA, "normal", 4),  # qkv with the decay projection, o_proj, gate and up, down with the residual
    (Z_GATE_TYPE, "gelu", 4),  # qkv with dt, decay and the biased Z gate; o_proj; up; down with the residual
    ("softmax", "normal", 4),
    ("mamba", "normal", 3),  # in_proj's rows before dt's with dt's (one of 1 row), gate and up, down with the residual
])
def test_decoder_layer_through_the_kernels(attention_type, mlp_type, launches, monkeypatch):
    """A decoder layer without gradients: with the kernels (the other ops on the CPU's formulas) its output is
    the formula's, for one token of 3 sequences and for a 5-token prompt of 2."""
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(64, 96, 4, attention_type, mlp_type).eval()
    for p in layer.parameters():  # biases and gates away from their inits
        p.data.normal_(0, 0.2)
    calls = []
    launch = dense._launch
    for x in (_rand(3, 1, 64), _rand(2, 5, 64, seed=1)):
        with torch.no_grad():
            ref = layer(x)
            monkeypatch.setattr(dense, "resolve_backend", lambda backend, t: "triton")
            monkeypatch.setattr(dense, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
            got = layer(x)
            monkeypatch.undo()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * launches


@pytest.mark.parametrize("name", ["self_attn.qkv_proj", "self_attn.A_mask_proj", "self_attn.o_proj", "mlp.gate_proj",
                                  "mlp.down_proj"])
def test_hooked_layers_run_as_modules(name, monkeypatch):
    """A forward hook on a projection (as adapters and quantisers attach) is honoured with and without the
    kernels: a hooked or wrapped layer is called as a module, not read for its weight."""
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(64, 96, 4, TWO_MAMBA).eval()
    x = _rand(3, 5, 64)  # 15 rows: the kernels' path; more than one token, so the decay matters
    with torch.no_grad():
        plain = layer(x)
        layer.get_submodule(name).register_forward_hook(lambda module, args, out: out + 1.0)
        ref = layer(x)
        monkeypatch.setattr(dense, "resolve_backend", lambda backend, t: "triton")
        got = layer(x)
    assert not torch.allclose(ref, plain, atol=1e-3)  # the hook changed the output
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
