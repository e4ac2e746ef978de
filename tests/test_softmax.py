"""Temperature softmax / log_softmax kernels against torch in fp64."""
import pytest
import torch

import fastkd
from helpers import leaf, logits, randn, rel_err



def check(log, x, temperature, out_tol, grad_tol):
    fn = fastkd.log_softmax if log else fastkd.softmax
    x = leaf(x)
    x64 = leaf(x.double())
    y = fn(x, temperature)
    ref = (x64 / temperature).log_softmax(-1) if log else (x64 / temperature).softmax(-1)
    dy = randn(y.shape, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.dtype))
    (ref_dx,) = torch.autograd.grad(ref, x64, dy)
    assert y.dtype == x.dtype and y.shape == x.shape and dx.dtype == x.dtype
    assert rel_err(y, ref) <= out_tol and rel_err(dx, ref_dx) <= grad_tol, (rel_err(y, ref), rel_err(dx, ref_dx))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("V", [1, 7, 33, 4097])
def test_fp32(log, V):
    check(log, logits((5, V), scale=3.0), 2.0, 1e-5, 1e-5)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("V", [64, 65, 300])
def test_rows_spanning_several_blocks(log, V, monkeypatch):
    monkeypatch.setattr(fastkd.kernels.common, "MAX_BLOCK", 64)
    check(log, logits((3, V), scale=3.0), 0.7, 1e-5, 1e-5)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(log, dtype):
    check(log, logits((4, 200), dtype, scale=3.0), 1.0, 1e-2, 1e-2)


@pytest.mark.parametrize("log", [False, True])
def test_non_contiguous_3d_input_and_large_logits(log):
    x = logits((2, 40, 3), scale=1e4).transpose(1, 2)  # [2, 3, 40], column stride 3
    check(log, x, 1.0, 1e-5, 1e-5)


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_fp64(log):
    fn = fastkd.log_softmax if log else fastkd.softmax
    x = leaf(logits((3, 11), torch.float64, scale=3.0))
    assert torch.autograd.gradcheck(lambda x: fn(x, 1.3), (x,))


def test_masked_entries():
    x = logits((2, 10), scale=3.0)
    x[:, ::2] = float("-inf")
    y = fastkd.softmax(x)
    assert (y[:, ::2] == 0).all() and torch.allclose(y.sum(-1), torch.ones(2))
    assert (fastkd.log_softmax(x)[:, ::2] == float("-inf")).all()
