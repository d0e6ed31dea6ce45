"""kernel.neg_softplus: the Triton kernel (CPU interpreter here, compiled on a GPU) against the formula
-F.softplus(x.float()), and its dispatch (the formula whenever autograd records)."""
import pytest
import torch
import torch.nn.functional as F

from kernel import neg_softplus


def _inputs(shape, dtype, device="cpu"):
    """Values across softplus's regimes: far below 0, around 0, near and past the threshold 20, exactly 20."""
    x = torch.randn(shape, device=device) * 12
    x.view(-1)[:4] = torch.tensor([20.0, -30.0, 25.0, 0.0])[:x.numel()]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 16), (1, 1, 4), (2000,), (0, 16)])
def test_kernel_matches_formula(dtype, shape):
    x = _inputs(shape, dtype)
    got, ref = neg_softplus(x, backend="triton"), neg_softplus(x, backend="torch")
    assert got.dtype == ref.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(ref, -F.softplus(x.double()).float(), rtol=1e-6, atol=0)


def test_strided_input():
    x = _inputs((4, 6, 16), torch.float32).transpose(0, 1)  # the kernel reads a contiguous copy
    torch.testing.assert_close(neg_softplus(x, backend="triton"), -F.softplus(x), rtol=1e-6, atol=0)


def test_formula_when_autograd_records():
    x = _inputs((2, 3, 16), torch.float32).requires_grad_()
    g = neg_softplus(x, backend="triton")
    assert g.grad_fn is not None
    g.sum().backward()
    torch.testing.assert_close(x.grad, -torch.sigmoid(x.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_formula(dtype):
    """Compiled, exp and log are the GPU's approximations: up to 1.5e-6 from ATen's (a dozen float32 ulps)."""
    x = _inputs((32, 1, 16), dtype, "cuda")
    torch.testing.assert_close(neg_softplus(x), -F.softplus(x.float()), rtol=4e-6, atol=0)
