"""Property tests: the fused kernels against the fp64 eager reference over drawn shapes, dtypes and arguments.

Inputs come from torch with a drawn seed (not hypothesis float arrays), so a failure prints a seed
that reproduces it.  Shapes stay small: the Triton interpreter is slow.

Tolerances are relative (fp32 1e-5, fp64 1e-10; fp16/bf16: loss 1e-5, gradients 1e-2), plus a slack
of a few roundings of the terms each result is computed from, where those terms cancel (see
`assert_close`).
"""
import math

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


# teacher independent of the student, or the student plus noise (the distillation regime: KL near 0)
closeness = st.sampled_from([None, 0.3, 0.01])


def make_pair(shape, dtype, scale, close, seed, device):
    s = make_logits(shape, torch.float64, scale, seed, device)
    if close is None:
        t = make_logits(shape, torch.float64, scale, seed + 1, device)
    else:
        t = s + make_logits(shape, torch.float64, scale * close, seed + 1, device)
    return s.to(dtype), t.to(dtype)


def make_logits(shape, dtype, scale, seed, device):
    """scale * N(0, 1) drawn on the CPU in fp64 (the same values on every device), rounded to dtype."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64, device="cpu")).to(dtype).to(device)


def make_labels(lead, V, p_ignore, ignore_index, seed, device):
    """Random class labels, about a fraction p_ignore of them set to ignore_index."""
    if p_ignore is None:
        return None
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    labels = torch.randint(0, V, lead, generator=g, device="cpu")
    labels[torch.rand(lead, generator=g, device="cpu") < p_ignore] = ignore_index
    return labels.to(device)


label_choices = st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.7, 1.0]))
ignore_indices = st.sampled_from([-100, -1])


def underflow(x):
    """Norm of fp16's rounding of subnormal values: half a subnormal step per element (bf16 has fp32's range)."""
    if x.dtype != torch.float16:
        return 0.0
    return 0.5 * torch.finfo(torch.float16).tiny * torch.finfo(torch.float16).eps * math.sqrt(x.numel())


def eps_of(dtype):
    """Machine epsilon of the accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def assert_close(x, ref, tol, slack, what):
    """Norm-wise |x - ref| <= tol |ref| + slack.

    `slack` is a few roundings of the terms the result is computed from: where they cancel (a KL
    near 0, p_s close to p_t) the result cannot be relative-accurate in any fixed precision (eager
    fp32 torch is no better there).  Elsewhere the bound is the relative tolerance.
    """
    ref_norm = float(ref.double().norm())
    err = rel_err(x, ref, floor=ref_norm + slack / tol + 1e-9)  # 1e-9: rel_err's floor for exact zeros
    assert err <= tol, (what, rel_err(x, ref), ref_norm, slack)


# A result whose terms are of size S must agree with the reference to ROUNDING * eps * S.
ROUNDING = 4


def rounding_budgets(s64, t64, temperature, labels, ignore_index, reduction):
    """Slack of the loss and of the gradients, in units of eps (see assert_close).

    Per row, with a = s / T, b = t / T: the KL terms are of size T^2 (1 + log V + max|a - b|) (log V:
    the row sums).  Gradient entries are T w (p_s + p_t) times log-ratios of size
    1 + |log p_s - log p_t| + KL, w being the row's weight in the differentiated loss (<= 1.5, over the
    counted rows for batchmean).  Each gets ROUNDING roundings.
    """
    V = s64.shape[-1]
    a, b = s64.reshape(-1, V) / temperature, t64.reshape(-1, V) / temperature
    mask = torch.ones(a.shape[0], dtype=torch.float64, device=a.device)
    if labels is not None:
        mask = (labels.reshape(-1) != ignore_index).double().to(a.device)
    count = max(float(mask.sum()), 1.0)
    loss_terms = ROUNDING * temperature**2 * (1 + math.log(V) + (a - b).abs().amax(-1)) * mask
    if reduction == "none":
        loss_scale = float(loss_terms.norm())
    else:
        loss_scale = float(loss_terms.sum()) / (count if reduction == "batchmean" else 1.0)
    log_ps, log_pt = a.log_softmax(-1), b.log_softmax(-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(-1, keepdim=True) + (ps * (log_ps - log_pt)).sum(-1, keepdim=True)
    weight = (1.5 * mask / (count if reduction == "batchmean" else 1.0))[:, None]
    grad_terms = temperature * weight * (ps + pt) * ROUNDING * (1 + (log_ps - log_pt).abs() + kl)
    return loss_scale, float(grad_terms.norm())


def check_loss(fn, ref, dtype, lead, V, scale, close, seed, device, monkeypatch, max_block, labels, ignore_index,
               reduction, temperature, **kw):
    """Fused loss and student + teacher gradients against the reference on fp64 copies of the same values."""
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", max_block)
    shape = (*lead, V)
    s, t = map(leaf, make_pair(shape, dtype, scale, close, seed, device))
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
    loss_budget, grad_budget = rounding_budgets(s64.detach(), t64.detach(), temperature, labels, ignore_index,
                                                reduction)
    assert_close(loss, ref_loss, loss_tol, eps_of(dtype) * loss_budget, "loss")
    for name, g, rg in zip(("student grad", "teacher grad"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == shape and torch.isfinite(g).all()
        assert_close(g, rg, grad_tol, eps_of(dtype) * grad_budget + underflow(g), name)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures, reverse=st.booleans(),
       reduction=reductions, scale=scales, close=closeness, seed=seeds, p_ignore=label_choices,
       ignore_index=ignore_indices, max_block=max_blocks)
def test_kl_div_matches_reference(dtype, lead, V, temperature, reverse, reduction, scale, close, seed, p_ignore,
                                  ignore_index, max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.kl_div, reference.kl_div, dtype, lead, V, scale, close, seed, device, monkeypatch, max_block,
               labels, ignore_index, reduction, temperature, reverse=reverse)


@PROPERTY
@given(dtype=dtypes, lead=lead_shapes(), V=vocab_sizes, temperature=temperatures,
       beta=st.one_of(st.floats(0.01, 0.99), st.sampled_from([0.0, 1.0])), reduction=reductions, scale=scales,
       close=closeness, seed=seeds, p_ignore=label_choices, ignore_index=ignore_indices, max_block=max_blocks)
def test_jsd_matches_reference(dtype, lead, V, temperature, beta, reduction, scale, close, seed, p_ignore,
                               ignore_index, max_block, device, monkeypatch):
    labels = make_labels(lead, V, p_ignore, ignore_index, seed, device)
    check_loss(fastkd.jsd, reference.jsd, dtype, lead, V, scale, close, seed, device, monkeypatch, max_block,
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
    a = (x64 / temperature).detach()
    p, lse = a.softmax(-1), a.logsumexp(-1, keepdim=True)
    rounding = ROUNDING * eps_of(dtype)
    # output terms: softmax p, log_softmax |x / T| + |lse|
    out_terms = a.abs() + lse.abs() if log else p
    assert_close(y.detach(), ref_y.detach(), tol, rounding * float(out_terms.norm()) + underflow(y), "output")
    # gradient terms: softmax p (|dy| + |<dy, p>|) / T, log_softmax |dy| + p |sum dy|
    dy = grad_y.double()
    if log:
        terms = dy.abs() + p * dy.sum(-1, keepdim=True).abs()
    else:
        terms = p * (dy.abs() + (dy * p).sum(-1, keepdim=True).abs()) / temperature
    # the backward reads the output stored in the input dtype: for fp16/bf16 add one rounding of it
    # (a unit roundoff, eps / 2: the GPU and conftest's interpreter round fp32 -> bf16 to nearest)
    stored = torch.finfo(dtype).eps / 2 if dtype in (torch.float16, torch.bfloat16) else 0.0
    assert_close(g, ref_g, tol, (rounding + stored) * float(terms.norm()) + underflow(g), "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd_subnormal_probability(dtype, device):
    """A regression found by test_jsd_matches_reference (fp32, V=111, T=0.25, scale 10, beta=0.5, seed 0).

    p_s[1] = exp(-103.2) is the smallest fp32 subnormal (1.4e-45); 0.5 * p_s[1] rounds to 0 and
    p_t[1] = 0, so log m[1] = log 0 once made the term p_s (log p_s - log m) inf (loss inf, gradient
    nan).  The true loss is ~5e-46.
    """
    s = leaf(torch.tensor([[0.0, -103.2]], dtype=dtype, device=device))
    t = leaf(torch.tensor([[0.0, -200.0]], dtype=dtype, device=device))
    loss, grads = loss_and_grads(fastkd.jsd, s, t, beta=0.5, reduction="none")
    ref_loss = reference.jsd(s.detach().double(), t.detach().double(), 0.5, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads), (loss, grads)
    assert float((loss - ref_loss).abs().max()) <= 1e-30
