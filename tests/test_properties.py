"""Property tests: the fused kernels against the fp64 eager reference over drawn shapes, dtypes and arguments.

Inputs come from torch with a drawn seed (not hypothesis float arrays), so a failure prints a seed
that reproduces it.  Shapes stay small: the Triton interpreter is slow.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import kernels, reference
from helpers import compare_to_reference, leaf, rel_err

# (loss tolerance, gradient tolerance), relative to the fp64 reference on the same (rounded) inputs
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 1e-2),
}

PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

dtypes = st.sampled_from(list(TOLERANCES))
temperatures = st.floats(0.25, 8.0)
reductions = st.sampled_from(["batchmean", "sum", "none"])
seeds = st.integers(0, 2**31 - 1)
# logit scale: near-uniform rows (KL near 0), ordinary ones, peaked ones
scales = st.sampled_from([0.1, 1.0, 3.0, 10.0])
# 4096: a row fits in one block; 16 and 64: rows of up to 300 columns span up to 19 blocks
max_blocks = st.sampled_from([4096, 64, 16])


@st.composite
def lead_shapes(draw):
    """Leading shape with 1..6 rows: [rows] or [a, b]."""
    if draw(st.booleans()):
        return (draw(st.integers(1, 6)),)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 2)))


vocab_sizes = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257]))


def make_logits(shape, dtype, scale, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def make_labels(lead, V, p_ignore, ignore_index, seed, device):
    """Random class labels, about a fraction p_ignore of them set to ignore_index."""
    if p_ignore is None:
        return None
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < p_ignore] = ignore_index
    return labels.to(device)


label_choices = st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.7, 1.0]))
ignore_indices = st.sampled_from([-100, -1])


def check_loss(fn, ref, dtype, lead, V, scale, seed, device, monkeypatch, max_block, labels, ignore_index,
               reduction, **kw):
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", max_block)
    shape = (*lead, V)
    s = leaf(make_logits(shape, dtype, scale, seed, device))
    t = leaf(make_logits(shape, dtype, scale, seed + 1, device))
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss, ref_loss = compare_to_reference(fn, ref, s, t, labels=labels, ignore_index=ignore_index,
                                          reduction=reduction, loss_tol=loss_tol, grad_tol=grad_tol, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (lead if reduction == "none" else ())
    assert (loss >= 0).all(), loss  # a divergence
    if reduction == "none" and labels is not None:
        assert (loss[labels == ignore_index] == 0).all()


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures, reverse=st.booleans(),
       reduction=reductions, scale=scales, seed=seeds, p_ignore=label_choices, ignore_index=ignore_indices,
       max_block=max_blocks)
def test_kl_div_matches_reference(dtype, lead, V, temperature, reverse, reduction, scale, seed, p_ignore,
                                  ignore_index, max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.kl_div, reference.kl_div, dtype, lead, V, scale, seed, device, monkeypatch, max_block,
               labels, ignore_index, reduction, temperature=temperature, reverse=reverse)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures,
       beta=st.one_of(st.floats(0.01, 0.99), st.sampled_from([0.0, 1.0])), reduction=reductions, scale=scales,
       seed=seeds, p_ignore=label_choices, ignore_index=ignore_indices, max_block=max_blocks)
def test_jsd_matches_reference(dtype, lead, V, temperature, beta, reduction, scale, seed, p_ignore, ignore_index,
                               max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.jsd, reference.jsd, dtype, lead, V, scale, seed, device, monkeypatch, max_block,
               labels, ignore_index, reduction, beta=beta, temperature=temperature)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures, log=st.booleans(),
       scale=scales, seed=seeds, max_block=max_blocks)
def test_softmax_matches_torch(dtype, lead, V, temperature, log, scale, seed, max_block, device, monkeypatch):
    """Output and gradient of (log_)softmax(x / T) against torch's in fp64 on the same (rounded) values."""
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", max_block)
    shape = (*lead, V)
    x = leaf(make_logits(shape, dtype, scale, seed, device))
    grad_y = make_logits(shape, dtype, 1.0, seed + 1, device)
    fn, torch_fn = (fastkd.log_softmax, torch.log_softmax) if log else (fastkd.softmax, torch.softmax)
    y = fn(x, temperature)
    (g,) = torch.autograd.grad(y, x, grad_y)
    x64 = leaf(x.double())
    ref_y = torch_fn(x64 / temperature, -1)
    (ref_g,) = torch.autograd.grad(ref_y, x64, grad_y.double())
    assert y.dtype == g.dtype == dtype and y.shape == g.shape == shape
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 1e-2)
    assert rel_err(y.detach(), ref_y.detach()) <= tol, rel_err(y.detach(), ref_y.detach())
    assert rel_err(g, ref_g) <= tol, rel_err(g, ref_g)
