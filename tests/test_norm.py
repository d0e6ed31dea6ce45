"""kernel.rms_norm: the Triton kernel (CPU interpreter here, compiled on a GPU) against the PyTorch formula
weight * F.rms_norm(x.float(), ...).to(x.dtype), and RMSNorm's dispatch (the formula whenever autograd records).

The kernel sums a row's squares in another order than ATen, so on random rows rstd may differ by a few float32
ulps. Rows of multiples of 1/8 (|x| <= 4) have squares and partial sums exact in float32 in any order: there the
kernel must give the formula's bits. The interpreter has no bfloat16 (numpy has none): bf16 is tested on the GPU.
"""
import pytest
import torch

import kernel.triton_norm
from GPT_Trainer.LlamaDecoderLayerClean import RMSNorm
from kernel import rms_norm
from kernel.triton_norm import MAX_CHANNELS

CPU_DTYPES = [torch.float32, torch.float16]
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def _exact_rows(shape, dtype, device="cpu", scale=1.0):
    """k / 8 * scale with |k| <= 32 (exact in bf16 and fp16; scale a power of two): the sum of C <= 16384
    squares is exact in float32 whatever the order."""
    return (torch.randint(-32, 33, shape, device=device) / 8 * scale).to(dtype)


def _both(x, w, eps=1e-5):
    got, ref = rms_norm(x, w, eps, backend="triton"), rms_norm(x, w, eps, backend="torch")
    assert got.dtype == ref.dtype == torch.result_type(w, x) and got.shape == x.shape
    return got, ref


def _assert_bitwise(got, ref):
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", CPU_DTYPES + [torch.float64])
@pytest.mark.parametrize("wdtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(48,), (5, 100), (2, 3, 48), (0, 48), (3, 1)])
def test_bitwise_on_exact_rows(dtype, wdtype, shape):
    x = _exact_rows(shape, dtype)
    if x.dim() > 1:
        x[:1] = 0  # rows of zeros: rsqrt(eps), output 0
    _assert_bitwise(*_both(x, torch.randn(shape[-1]).to(wdtype)))


@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_eps(eps):
    # mean(x^2) ~ 1e-3 for these rows: eps 0.1 dominates, 1e-5 does not
    x = _exact_rows((6, 100), torch.float32, scale=2**-6)
    _assert_bitwise(*_both(x, torch.randn(100), eps))


@pytest.mark.parametrize("view", ["slice", "transposed", "channel_stride"])
def test_strided_input(view):
    C = 48
    if view == "slice":  # the middle third of a wider projection: rows 3C apart, read in place
        x = _exact_rows((2, 7, 3 * C), torch.float16)[..., C:2 * C]
    elif view == "transposed":  # leading dims that do not merge into one row stride: copied
        x = _exact_rows((7, 2, C), torch.float16).transpose(0, 1)
    else:  # channels 2 apart: copied
        x = _exact_rows((2, 7, 2 * C), torch.float16)[..., ::2]
    _assert_bitwise(*_both(x, torch.randn(C)))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("wdtype", CPU_DTYPES)
@pytest.mark.parametrize("C", [48, 100, 1024])
def test_random_rows(dtype, wdtype, C):
    """Random rows: within the summation-order error. float32: rstd a few ulps off, at most 3 eps relative in
    150 seeds, so 4 eps; float16: that may flip the rounding of x * rstd by one fp16 ulp (eps relative) and an fp16
    product with the weight rounds once more, so 2 eps (1.65 seen; atol for fp16 subnormals, |weight| < 1.5)."""
    x = (torch.randn(4, 9, C) * 3).to(dtype)
    got, ref = _both(x, (torch.rand(C) + 0.5).to(wdtype))
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    else:
        torch.testing.assert_close(got, ref, rtol=2 * torch.finfo(torch.float16).eps, atol=3 * 2.0**-24)


def test_bad_inputs():
    with pytest.raises(ValueError, match="weight of shape"):
        rms_norm(torch.randn(2, 48), torch.ones(47), 1e-5, backend="triton")
    with pytest.raises(ValueError, match=f"at most {MAX_CHANNELS} channels"):
        rms_norm(torch.randn(1, MAX_CHANNELS + 1), torch.ones(MAX_CHANNELS + 1), 1e-5, backend="triton")


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_rmsnorm_dispatch(device, monkeypatch):
    """RMSNorm runs the kernel only when autograd records nothing; with gradients its grads are the formula's."""
    calls = []
    kernel_fn = kernel.triton_norm.triton_rms_norm
    monkeypatch.setattr(kernel.triton_norm, "triton_rms_norm", lambda *a: calls.append(1) or kernel_fn(*a))
    monkeypatch.setenv("TWOMAMBA_ATTENTION_BACKEND", "triton")  # "auto" picks the kernel on the CPU too
    norm = RMSNorm(48).to(device)
    norm.weight.data.normal_()
    x = _exact_rows((3, 5, 48), torch.float32, device).requires_grad_(True)
    dy = torch.randn(3, 5, 48, device=device)

    y = norm(x)
    assert not calls and y.grad_fn is not None
    dx, dw = torch.autograd.grad(y, (x, norm.weight), dy)
    w = norm.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = w * torch.nn.functional.rms_norm(x_ref, (48,), eps=norm.eps)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w), dy)
    _assert_bitwise(y.detach(), y_ref.detach())
    _assert_bitwise(dx, dx_ref)
    _assert_bitwise(dw, dw_ref)

    norm.weight.requires_grad_(False)
    norm(x)  # x still requires grad
    assert not calls
    with torch.no_grad():
        _assert_bitwise(norm(x), y.detach())
    with torch.inference_mode():
        norm(x)
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 1, 1024), (2, 300, 1024), (3, 100), (2, 8192)])
def test_gpu_bitwise_on_exact_rows(dtype, shape):
    """The small model's width (1024, one token and a prompt), another C and the largest C that must fit;
    the weight in the model's dtype and in float32."""
    x = _exact_rows(shape, dtype, "cuda")
    x[0] = 0
    for w in (torch.randn(shape[-1], device="cuda").to(dtype), torch.randn(shape[-1], device="cuda")):
        _assert_bitwise(*_both(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_random_rows(dtype):
    """Random rows on the GPU: float32 within the summation-order error as on the CPU; bf16 within one bf16 ulp
    of x * rstd and the product's rounding (2 ulps)."""
    x = (torch.randn(64, 1024, device="cuda") * 3).to(dtype)
    got, ref = _both(x, (torch.rand(1024, device="cuda") + 0.5).to(dtype))
    rtol = 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 2 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got, ref, rtol=rtol, atol=0)
