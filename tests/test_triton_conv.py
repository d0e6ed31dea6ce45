"""The Triton causal conv (CPU interpreter here, the compiled kernels on a GPU) against nn.functional.conv1d
in float64: output and the gradients of x, weight and bias."""
import pytest
import torch

from helpers import rel_err
from kernel.conv import causal_conv1d


def _run(x, w, b, dy, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    y = causal_conv1d(leaves[0], leaves[1], leaves[2] if b is not None else None, backend=backend)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def _check(x, w, b, tol, dtype=None):
    dy = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    got = _run(x.to(dtype or x.dtype), w, b, dy, "triton")
    ref = _run(x.double(), w.double(), None if b is None else b.double(), dy, "torch")
    assert got[0].is_contiguous() and got[0].dtype == (dtype or x.dtype)
    for name, a, r in zip(["y", "dx", "dweight", "dbias"], got, ref):
        err = rel_err(a, r)
        assert err < tol, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("N", [1, 37])
def test_matches_conv1d(width, has_bias, N):
    # N = 37 and C = 40 cross the interpreter's 8 x 16 blocks and its backward's spans of two of them; N = 1 is
    # shorter than the window
    B, C = 2, 40
    x = torch.randn(B, N, C)
    w, b = torch.randn(C, 1, width), torch.randn(C) if has_bias else None
    _check(x, w, b, 1e-5)


def test_wide_window_takes_conv1d():
    """The kernels take up to MAX_WIDTH taps; a wider window on the triton backend runs conv1d, the same numbers."""
    x, w, b = torch.randn(2, 37, 40), torch.randn(40, 1, 5), torch.randn(40)
    dy = torch.randn(2, 37, 40)
    for got, ref in zip(_run(x, w, b, dy, "triton"), _run(x, w, b, dy, "torch")):
        assert torch.equal(got, ref)
    from kernel.triton_conv import triton_causal_conv1d

    with pytest.raises(ValueError, match="up to 4 taps, got 5"):
        triton_causal_conv1d(x, w, b)


@pytest.mark.parametrize("view", ["slice", "transposed"])
def test_strided_input(view):
    B, N, C = 2, 21, 24
    if view == "slice":  # channels of a wider projection, as q, k, v of a fused qkv
        x = torch.randn(B, N, 3 * C)[..., C:2 * C]
    else:  # a [B, N, C] view of [B, C, N] storage
        x = torch.randn(B, C, N).transpose(1, 2)
    _check(x, torch.randn(C, 1, 2), torch.randn(C), 1e-5)


@pytest.mark.gpu
def test_gpu_bf16_real_shape():
    """The block's conv on the GPU: bf16 [16, 2048, 3072] (the small model's qkv), within 1e-2 of float64."""
    x = torch.randn(16, 2048, 3072, device="cuda")
    w, b = torch.randn(3072, 1, 2, device="cuda"), torch.randn(3072, device="cuda")
    _check(x, w, b, 1e-2, dtype=torch.bfloat16)
