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
from helpers import leaf, loss_and_grads, rel_err

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


def eps_of(dtype):
    """Unit roundoff of the accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def assert_close(x, ref, tol, eps, scale, what):
    """Norm-wise |x - ref| <= max(tol |ref|, ROUNDING eps scale).

    `scale` is the size of the terms the result is computed from: where they cancel (a KL near 0,
    p_s close to p_t) the result cannot be relative-accurate in any fixed precision, only to a few
    roundings of those terms (eager fp32 torch is no better there).  Elsewhere the test is relative.
    """
    err = rel_err(x, ref, floor=max(ROUNDING * eps * scale / tol, 1e-300))
    assert err <= tol, (what, err, float(x.double().norm()), float(ref.double().norm()), scale)


# A result whose terms are of size S must agree with the reference to ROUNDING * eps * S.
ROUNDING = 4


def rounding_scales(s64, t64, temperature, labels, ignore_index, reduction):
    """Sizes of the terms a fused loss and its gradients are computed from (see assert_close).

    Per row, with a = s / T, b = t / T: the KL terms are of size T^2 (1 + max|a - b|); the gradient
    entries are T w (p_s + p_t) times log-probabilities of size up to 1 + 2 max(|a|, |b|, |lse|),
    w being the row's weight in the loss that is differentiated (<= 1.5, over the counted rows for batchmean).
    """
    V = s64.shape[-1]
    a, b = s64.reshape(-1, V) / temperature, t64.reshape(-1, V) / temperature
    mask = torch.ones(a.shape[0], dtype=torch.float64)
    if labels is not None:
        mask = (labels.reshape(-1) != ignore_index).double().cpu()
    mask = mask.to(a.device)
    count = max(float(mask.sum()), 1.0)
    loss_terms = temperature**2 * (1 + (a - b).abs().amax(-1)) * mask
    if reduction == "none":
        loss_scale = float(loss_terms.norm())
    else:
        loss_scale = float(loss_terms.sum()) / (count if reduction == "batchmean" else 1.0)
    size = torch.stack([a.abs().amax(-1), b.abs().amax(-1), a.logsumexp(-1).abs(), b.logsumexp(-1).abs()]).amax(0)
    weight = 1.5 * mask / (count if reduction == "batchmean" else 1.0)
    grad_terms = (temperature * weight * (1 + 2 * size))[:, None] * (a.softmax(-1) + b.softmax(-1))
    return loss_scale, float(grad_terms.norm())


def check_loss(fn, ref, dtype, lead, V, scale, seed, device, monkeypatch, max_block, labels, ignore_index,
               reduction, temperature, **kw):
    """Fused loss and student + teacher gradients against the reference on fp64 copies of the same values."""
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", max_block)
    shape = (*lead, V)
    s = leaf(make_logits(shape, dtype, scale, seed, device))
    t = leaf(make_logits(shape, dtype, scale, seed + 1, device))
    s64, t64 = leaf(s.double()), leaf(t.double())
    kw.update(temperature=temperature, labels=labels, ignore_index=ignore_index, reduction=reduction)
    loss, grads = loss_and_grads(fn, s, t, **kw)
    ref_loss, ref_grads = loss_and_grads(ref, s64, t64, **kw)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (lead if reduction == "none" else ())
    assert torch.isfinite(loss).all() and (loss >= 0).all(), loss  # a divergence
    if reduction == "none" and labels is not None:
        assert (loss[labels == ignore_index] == 0).all()
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss_scale, grad_scale = rounding_scales(s64.detach(), t64.detach(), temperature, labels, ignore_index, reduction)
    assert_close(loss, ref_loss, loss_tol, eps_of(dtype), loss_scale, "loss")
    for name, g, rg in zip(("student grad", "teacher grad"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == shape and torch.isfinite(g).all()
        assert_close(g, rg, grad_tol, eps_of(dtype), grad_scale, name)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures, reverse=st.booleans(),
       reduction=reductions, scale=scales, seed=seeds, p_ignore=label_choices, ignore_index=ignore_indices,
       max_block=max_blocks)
def test_kl_div_matches_reference(dtype, lead, V, temperature, reverse, reduction, scale, seed, p_ignore,
                                  ignore_index, max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.kl_div, reference.kl_div, dtype, lead, V, scale, seed, device, monkeypatch, max_block,
               labels, ignore_index, reduction, temperature, reverse=reverse)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures,
       beta=st.one_of(st.floats(0.01, 0.99), st.sampled_from([0.0, 1.0])), reduction=reductions, scale=scales,
       seed=seeds, p_ignore=label_choices, ignore_index=ignore_indices, max_block=max_blocks)
def test_jsd_matches_reference(dtype, lead, V, temperature, beta, reduction, scale, seed, p_ignore, ignore_index,
                               max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.jsd, reference.jsd, dtype, lead, V, scale, seed, device, monkeypatch, max_block,
               labels, ignore_index, reduction, temperature, beta=beta)


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
    # output terms: softmax p, log_softmax |x / T| + |lse|
    a = (x64 / temperature).detach()
    p = a.softmax(-1)
    out_terms = a.abs() + a.logsumexp(-1, keepdim=True).abs() if log else p
    assert_close(y.detach(), ref_y.detach(), tol, eps_of(dtype), float(out_terms.norm()), "output")
    # gradient terms: softmax p (|dy| + |<dy, p>|) / T, log_softmax |dy| + p |sum dy|
    dy = grad_y.double()
    if log:
        terms = dy.abs() + p * dy.sum(-1, keepdim=True).abs()
    else:
        terms = p * (dy.abs() + (dy * p).sum(-1, keepdim=True).abs()) / temperature
    assert_close(g, ref_g, tol, eps_of(dtype), float(terms.norm()), "grad")
