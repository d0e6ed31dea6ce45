"""kron(x) through Triton (the CPU interpreter here) against kron_reference, forward and backward."""
import pytest
import torch

from kernel.kron import kron, kron_reference


def _rand(*shape, dtype=torch.float32, device="cpu"):
    # the global generator, seeded per test by conftest.py (a failure report names the seed)
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _check(x, tol):
    x = x.detach().requires_grad_(True)
    y = kron(x, backend="triton")
    dy = _rand(*y.shape, dtype=y.dtype, device=y.device)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = kron_reference(x64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert _rel(y, y64) < tol
    assert _rel(dx, dx64) < tol


@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 32), (2, 1, 7, 64), (130, 3)])
def test_kron_matches_reference(shape):
    _check(_rand(*shape), 1e-5)


def test_kron_inner_product_is_squared_dot():
    q, k = _rand(4, 9, 32), _rand(4, 9, 32)
    lhs = (kron(q, backend="triton") * kron(k, backend="triton")).sum(-1)
    rhs = (q * k).sum(-1) ** 2
    assert _rel(lhs, rhs.double()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_kron_gpu(dtype, d):
    _check(_rand(2, 4, 1000, d, dtype=dtype, device="cuda"), 1e-2 if dtype != torch.float32 else 1e-5)


def test_kron_backward_reads_transposed_gradients():
    """The chunked form hands kron's backward a transposed gradient; it is read in place, not copied."""
    x = _rand(3, 10, 8).requires_grad_(True)
    dy_t = _rand(3, 36, 10)  # [batch, entries, rows] storage, used as [batch, rows, entries]
    (dx,) = torch.autograd.grad(kron(x, backend="triton"), x, dy_t.transpose(1, 2))
    (ref,) = torch.autograd.grad(kron_reference(x.double()), x, dy_t.transpose(1, 2).double())
    assert _rel(dx, ref) < 1e-5
