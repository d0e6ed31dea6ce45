"""The PyTorch reference of the attention core against an explicit float64 loop, plus gradcheck."""
import itertools

import pytest
import torch

from kernel import attention, causal_conv1d, causal_conv1d_step
from kernel.kron import kron_reference
from kernel.reference import attention_reference

COMBOS = list(itertools.product(("1", "2", "exp"), (True, False), (True, False)))  # power, normalize, decay


def loop_attention_float64(q, k, v, g, power, normalize, scale):
    """Row by row, weight by weight, in float64: written independently of the reference."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, _ = q.shape
    a = torch.zeros(b, h, n, dtype=torch.float64) if g is None else torch.cumsum(g.double(), -1)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi, hi, i in itertools.product(range(b), range(h), range(n)):
        num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
        for j in range(i + 1):
            s = float(q[bi, hi, i] @ k[bi, hi, j]) * scale
            decay = float(a[bi, hi, i] - a[bi, hi, j])
            if power == "exp":
                w = torch.exp(torch.tensor(s + decay, dtype=torch.float64))
            else:
                w = (s if power == "1" else s * s) * torch.exp(torch.tensor(decay, dtype=torch.float64))
            num += w * v[bi, hi, j]
            den += float(w)
        out[bi, hi, i] = (0.0 if den == 0 else num / den) if normalize else num
    return out


def random_inputs(b, h, n, d, decay, dtype=torch.float64):
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))
    g = -torch.rand(b, h, n, dtype=dtype) * 2 if decay else None
    return q, k, v, g


@pytest.mark.parametrize("power,normalize,decay", COMBOS)
@pytest.mark.parametrize("n,d", [(1, 4), (7, 8), (13, 16)])
def test_reference_matches_float64_loop(power, normalize, decay, n, d):
    q, k, v, g = random_inputs(2, 2, n, d, decay)
    if power == "1" and normalize:  # signed scores can sum to ~0; non-negative ones (relu'd, as in `linear`) do not
        q, k = q.abs(), k.abs()
    expected = loop_attention_float64(q, k, v, g, power, normalize, d ** -0.5)
    got = attention_reference(q, k, v, g, power=power, normalize=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("power,normalize,decay", COMBOS)
def test_reference_gradcheck(power, normalize, decay):
    q, k, v, g = random_inputs(1, 2, 6, 4, decay)
    if power == "1" and normalize:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    inputs = [t.requires_grad_() for t in (q, k, v, g) if t is not None]

    def fn(*xs):
        qq, kk, vv = xs[:3]
        gg = xs[3] if decay else None
        return attention_reference(qq, kk, vv, gg, power=power, normalize=normalize)

    assert torch.autograd.gradcheck(fn, inputs)


def test_zero_normaliser_rows_give_zero():
    q, k, v, g = random_inputs(1, 1, 5, 4, True, torch.float32)
    q[:, :, 2] = 0.0
    o = attention(q, k, v, g, power="2", normalize=True, backend="torch")
    assert torch.isfinite(o).all()
    assert torch.count_nonzero(o[:, :, 2]) == 0


def test_exp_is_stable_for_large_scores_and_strong_decay():
    q, k, v, _ = random_inputs(1, 2, 9, 8, False, torch.float32)
    g = torch.full((1, 2, 9), -50.0)
    q, k = q * 8, k * 8  # scores of a few hundred: exp overflows float32 without the row-max shift
    o = attention(q, k, v, g, power="exp", normalize=True, backend="torch")
    expected = loop_attention_float64(q, k, v, g, "exp", True, 8 ** -0.5)
    torch.testing.assert_close(o.double(), expected, rtol=1e-4, atol=1e-5)


def test_reference_computes_in_float32_and_returns_input_dtype():
    q, k, v, g = random_inputs(1, 2, 10, 8, True, torch.bfloat16)
    o = attention(q, k, v, g.float(), backend="torch")
    assert o.dtype == torch.bfloat16
    expected = attention_reference(q.double(), k.double(), v.double(), g.double())
    assert (o.double() - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("bad,match", [
    (dict(power="3"), "power must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(out_dtype=torch.int32), "out_dtype must be a floating-point"),
])
def test_bad_arguments_are_named(bad, match):
    q, k, v, g = random_inputs(1, 1, 3, 4, True, torch.float32)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, g, **bad)


def test_bad_shapes_are_named():
    q, k, v, g = random_inputs(1, 1, 3, 4, True, torch.float32)
    with pytest.raises(ValueError, match=r"g \(per-token log decay\)"):
        attention(q, k, v, g[..., :2])
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        attention(q, k[..., :2], v)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_causal_conv_matches_definition(width):
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    w = torch.randn(6, 1, width, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    expected = torch.zeros_like(x) + bias
    for t in range(11):
        for i in range(width):
            src = t - width + 1 + i
            if src >= 0:
                expected[:, t] += w[:, 0, i] * x[:, src]
    torch.testing.assert_close(causal_conv1d(x, w, bias), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter test on CPU tensors")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("width,has_bias", [(1, True), (2, True), (3, False), (4, True)])
def test_conv_steps_continue_the_conv(backend, width, has_bias):
    """Token by token from a zero state (the Triton kernel under the interpreter, 1500 channels: two blocks)
    == the causal conv of the whole sequence; the state ends as the last width-1 inputs."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 7, 1500, generator=gen)
    w = torch.randn(1500, 1, width, generator=gen)
    bias = torch.randn(1500, generator=gen) if has_bias else None
    state = torch.zeros(2, width - 1, 1500)
    steps = torch.cat([causal_conv1d_step(x[:, t:t + 1], state, w, bias, backend=backend) for t in range(7)], dim=1)
    torch.testing.assert_close(steps, causal_conv1d(x, w, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x[:, 7 - (width - 1):])


@pytest.mark.parametrize("d", [1, 4, 16, 64])
def test_kron_reference_squares_the_dot_product(d):
    q, k = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    phi_q, phi_k = kron_reference(q), kron_reference(k)
    assert phi_q.shape == (3, d * (d + 1) // 2)
    torch.testing.assert_close((phi_q * phi_k).sum(-1), (q * k).sum(-1) ** 2)
