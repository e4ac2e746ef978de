"""KL (forward and reverse) and JSD kernels against the fp64 eager reference."""
import functools

import pytest
import torch

import fastkd
from fastkd import kernels, reference
from helpers import compare_to_reference, leaf, logits, loss_and_grads, rel_err

LOSSES = {
    "kl": (fastkd.kl_div, reference.kl_div, {}),
    "reverse_kl": (fastkd.kl_div, reference.kl_div, {"reverse": True}),
    "jsd": (fastkd.jsd, reference.jsd, {"beta": 0.3}),
}



@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 columns, so that short rows already span several blocks."""
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", 64)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("V", [1, 7, 33, 4097])
def test_fp32_matches_fp64_reference(name, V, device):
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((5, V))), leaf(logits((5, V), seed=1))
    for reduction in ("batchmean", "sum", "none"):
        compare_to_reference(fn, ref, s, t, temperature=2.0, reduction=reduction, loss_tol=1e-5, grad_tol=1e-5, **kw)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("V", [64, 65, 200, 1000])
def test_rows_spanning_several_blocks(name, V, small_blocks, device):
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((3, V))), leaf(logits((3, V), seed=1))
    compare_to_reference(fn, ref, s, t, temperature=1.5, loss_tol=1e-5, grad_tol=1e-5, **kw)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(name, dtype, device):
    """Loss within 1e-5 of the fp64 reference on the same (rounded) values, gradients within 1e-2."""
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((6, 300), dtype)), leaf(logits((6, 300), dtype, seed=1))
    loss, ref_loss = compare_to_reference(fn, ref, s, t, temperature=1.0, loss_tol=1e-5, grad_tol=1e-2, **kw)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", LOSSES)
def test_teacher_requires_grad(name, device):
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((4, 50))), leaf(logits((4, 50), seed=1))
    compare_to_reference(fn, ref, s, t, temperature=3.0, loss_tol=1e-5, grad_tol=1e-5, **kw)
    s.requires_grad_(False)
    _, (gt,) = loss_and_grads(fn, s, t, temperature=3.0, **kw)
    assert torch.isfinite(gt).all()


@pytest.mark.parametrize("name", ["kl", "jsd"])
def test_masked_teacher_vocabulary(name, device):
    """Teacher logits of -inf (a masked vocabulary) are legal: finite loss, equal to the reference."""
    fn, ref, kw = LOSSES[name]
    t = logits((4, 40), seed=1)
    t[:, ::3] = float("-inf")
    t[1, 2:] = float("-inf")  # a teacher row with a single live entry (column 1)
    s, t = leaf(logits((4, 40))), leaf(t, False)
    compare_to_reference(fn, ref, s, t, temperature=1.0, loss_tol=1e-5, grad_tol=1e-5, **kw)


@pytest.mark.parametrize("name", LOSSES)
def test_large_logits(name, device):
    """Logits of magnitude 1e4.  Only the student gradient: the teacher's, p_t (log p_t - log p_s - KL)
    with KL ~ 1e4, cancels in fp32 (eager fp32 autograd is off by ~4% there too)."""
    fn, ref, kw = LOSSES[name]
    s = leaf(logits((3, 100), scale=1e4))
    t = leaf(logits((3, 100), scale=1e4, seed=1), False)
    compare_to_reference(fn, ref, s, t, temperature=1.0, loss_tol=1e-5, grad_tol=1e-5, **kw)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_identical_inputs_give_zero(name, scale, device):
    fn, _, kw = LOSSES[name]
    x = logits((4, 77), scale=scale)
    loss = fn(x, x.clone(), reduction="none", **kw)
    assert (loss >= 0).all() and (loss == 0).all(), loss


@pytest.mark.parametrize("name", LOSSES)
def test_labels_ignore_rows_on_3d_input(name, device):
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((2, 3, 20))), leaf(logits((2, 3, 20), seed=1))
    labels = torch.tensor([[1, -100, 4], [-100, 0, 7]])
    for reduction in ("batchmean", "sum", "none"):
        loss, ref_loss = compare_to_reference(fn, ref, s, t, temperature=2.0, labels=labels, reduction=reduction,
                                              loss_tol=1e-5, grad_tol=1e-5, **kw)
    assert loss.shape == (2, 3) and (loss[labels == -100] == 0).all()
    _, (gs, gt) = loss_and_grads(fn, s, t, labels=labels, **kw)
    assert (gs[labels == -100] == 0).all() and (gt[labels == -100] == 0).all()
    assert (gs[labels != -100] != 0).any()


@pytest.mark.parametrize("name", LOSSES)
def test_all_rows_ignored(name, device):
    fn, _, kw = LOSSES[name]
    s, t = leaf(logits((3, 10))), leaf(logits((3, 10), seed=1))
    labels = torch.full((3,), 5)
    loss, (gs, gt) = loss_and_grads(fn, s, t, labels=labels, ignore_index=5, **kw)
    assert loss.item() == 0.0 and (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("layout", ["sliced", "transposed", "sliced_3d"])
def test_non_contiguous_inputs(name, layout, device):
    fn, ref, kw = LOSSES[name]
    if layout == "sliced":  # row stride 2V, column stride 2
        s, t = logits((5, 60))[:, ::2], logits((5, 60), seed=1)[:, 1::2]
    elif layout == "transposed":  # column stride = number of rows
        s, t = logits((30, 5)).t(), logits((30, 5), seed=1).t()
    else:  # leading dims that do not collapse into one row stride
        s, t = logits((2, 4, 30))[:, :3], logits((2, 4, 30), seed=1)[:, 1:]
    assert not s.is_contiguous()
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    compare_to_reference(fn, ref, s, t, temperature=2.0, loss_tol=1e-5, grad_tol=1e-5, **kw)


@pytest.mark.parametrize("name", LOSSES)
def test_expanded_and_scaled_grad_output(name, device):
    fn, ref, kw = LOSSES[name]
    s, t = leaf(logits((4, 30))), leaf(logits((4, 30), seed=1))
    for grad in (torch.tensor(3.0).expand(4), torch.tensor([0.5, -1.0, 2.0, 0.0])):
        grad = grad.to(device)
        (gs,) = torch.autograd.grad(fn(s, t, reduction="none", **kw), s, grad)
        s64, t64 = leaf(s.double()), leaf(t.double())
        (ref_gs,) = torch.autograd.grad(ref(s64, t64, reduction="none", **kw), s64, grad.double())
        assert rel_err(gs, ref_gs) <= 1e-5
    (gs,) = torch.autograd.grad(fn(s, t, **kw), s, torch.tensor(-2.5))
    s64, t64 = leaf(s.double()), leaf(t.double())
    (ref_gs,) = torch.autograd.grad(ref(s64, t64, **kw), s64, torch.tensor(-2.5, dtype=torch.float64))
    assert rel_err(gs, ref_gs) <= 1e-5


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_kl(beta, device):
    """TRL's convention: beta = 0 is forward KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t)."""
    s, t = logits((3, 20)), logits((3, 20), seed=1)
    expected = fastkd.kl_div(s, t, 2.0, reverse=beta == 1.0, reduction="none")
    assert torch.equal(fastkd.jsd(s, t, beta, 2.0, reduction="none"), expected)


def test_empty_batch(device):
    s, t = leaf(logits((0, 10))), leaf(logits((0, 10)))
    for name, (fn, _, kw) in LOSSES.items():
        assert fn(s, t, reduction="none", **kw).shape == (0,)
        loss = fn(s, t, **kw)
        assert loss.item() == 0.0
        loss.backward()


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_fp64(name, device):
    fn, _, kw = LOSSES[name]
    s, t = leaf(logits((3, 9), torch.float64)), leaf(logits((3, 9), torch.float64, seed=1))
    labels = torch.tensor([0, -100, 2])
    f = functools.partial(fn, temperature=1.7, labels=labels, reduction="none", **kw)
    assert torch.autograd.gradcheck(f, (s, t))
