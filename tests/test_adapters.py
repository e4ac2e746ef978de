"""The TRL and torchtune adapters against eager re-implementations of those projects' formulas
(TRL's GKDTrainer.generalized_jsd_loss, torchtune's ForwardKLLoss / ForwardKLWithChunkedOutputLoss):
fp64 through the reference backend within 1e-10, fp32 through the kernels within 1e-5."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import adapters
from helpers import leaf, logits, randint, rel_err


# -- the projects' formulas, eagerly ---------------------------------------------------------------

def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
            zero_nan_terms=False):
    """TRL's generalized JSD: F.kl_div(input, target, log_target=True) = p_target (log p_target - input), the
    mixture in log space, beta 0 / 1 plain KL, labels == -100 left out, TRL's four reductions (no T^2).
    zero_nan_terms: each KL's 0 * -inf = NaN terms (a masked logit) taken as 0, which TRL does not do."""
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)

    def kl(inp, target):
        terms = F.kl_div(inp, target, reduction="none", log_target=True)
        return torch.nan_to_num(terms, nan=0.0) if zero_nan_terms else terms

    if beta == 0:
        terms = kl(log_ps, log_pt)
    elif beta == 1:
        terms = kl(log_pt, log_ps)
    else:
        log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - beta), log_pt + math.log(beta)]), dim=0)
        terms = beta * kl(log_m, log_pt) + (1 - beta) * kl(log_m, log_ps)
    if labels is not None:
        mask = labels != -100
        terms = terms[mask]
    if reduction == "batchmean":
        return terms.sum() / (mask.sum() if labels is not None else terms.size(0) * terms.size(1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def torchtune_ce(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    """torchtune's ForwardKLLoss: -sum_j p_t log p_s per row with terms where the student logit is inf masked,
    summed over rows whose label is not ignore_index, over their count (0 when none) if normalize.  In
    torchtune's fp32 (fp64 for fp64 logits, to compare at fp64 precision)."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=acc)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=acc)
    x = torch.masked_fill(teacher_prob * student_logprob, torch.isinf(student_logits), 0).sum(-1).view(-1)
    mask = (labels != ignore_index).int().view(-1)
    if not normalize:
        return -(x * mask).sum()
    if mask.sum() == 0:
        return torch.tensor(0.0, dtype=acc)
    return -(x * mask).sum() / mask.sum()


def torchtune_chunked(student_chunks, teacher_chunks, labels, num_output_chunks, ignore_index=-100):
    """torchtune's ForwardKLWithChunkedOutputLoss: labels split along T into num_output_chunks (all of equal
    length but the last, which takes the remainder), unnormalized per-chunk sums over the total count."""
    base, remainder = divmod(labels.size(1), num_output_chunks)
    label_chunks = labels.split([base] * (num_output_chunks - 1) + [base + remainder], dim=1)
    total = sum(torchtune_ce(s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), lab.reshape(-1), ignore_index,
                             normalize=False) for s, t, lab in zip(student_chunks, teacher_chunks, label_chunks))
    count = (labels != ignore_index).sum()
    return total / count if count > 0 else torch.tensor(0.0)


# -- comparison -----------------------------------------------------------------------------------

def labels_with_ignored(shape, V, seed=0, every=4):
    y = randint(V, shape, seed)
    y.view(-1)[::every] = -100
    return y


def compare(fn, ref, tensors, tol, grad_tol=None, backend="auto"):
    """fn(*tensors) against ref on fp64 copies: the value and the gradients of every tensor that requires grad."""
    ref_tensors = [leaf(x.double(), x.requires_grad) for x in tensors]
    with fastkd.use_backend(backend):
        got = fn(*tensors)
    want = ref(*ref_tensors)
    assert got.shape == want.shape and rel_err(got.detach(), want.detach()) <= tol, (got, want)
    inputs = [x for x in tensors if x.requires_grad]
    if inputs:
        weight = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).view(got.shape)
        grads = torch.autograd.grad((got * weight).sum(), inputs)
        ref_grads = torch.autograd.grad((want * weight.double()).sum(), [x for x in ref_tensors if x.requires_grad])
        for g, rg in zip(grads, ref_grads):
            assert rel_err(g, rg) <= (grad_tol or tol), rel_err(g, rg)
    return got


# -- TRL ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_trl_fp64_reference(reduction, beta, with_labels):
    V = 33
    s, t = leaf(logits((2, 5, V), torch.float64)), leaf(logits((2, 5, V), torch.float64, seed=1))
    labels = labels_with_ignored((2, 5), V) if with_labels else None
    compare(lambda a, b: adapters.generalized_jsd_loss(a, b, labels, beta, 2.0, reduction),
            lambda a, b: trl_jsd(a, b, labels, beta, 2.0, reduction), [s, t], 1e-10, backend="reference")


@pytest.mark.parametrize("beta, reduction, with_labels", [
    (0.0, "batchmean", True), (0.4, "batchmean", True), (1.0, "sum", True), (0.4, "mean", True),
    (0.7, "batchmean", False), (0.4, "none", True),
])
def test_trl_fp32_kernels(beta, reduction, with_labels):
    """Through the fused kernels: value and gradients of student and teacher (TRL differentiates both)."""
    V = 70
    s, t = leaf(logits((2, 4, V))), leaf(logits((2, 4, V), seed=1))
    labels = labels_with_ignored((2, 4), V, seed=2) if with_labels else None
    compare(lambda a, b: adapters.generalized_jsd_loss(a, b, labels, beta, 1.5, reduction),
            lambda a, b: trl_jsd(a, b, labels, beta, 1.5, reduction), [s, t], 1e-5)


def test_trl_flattened_logits_keep_trls_batchmean_denominator():
    """2-D [N, V] logits without labels: TRL divides by size(0) * size(1) = N x V; so does the adapter."""
    V = 20
    s, t = logits((6, V), torch.float64), logits((6, V), torch.float64, seed=1)
    got = adapters.generalized_jsd_loss(s, t)
    assert rel_err(got, trl_jsd(s, t)) <= 1e-10
    assert rel_err(got * V, fastkd.jsd(s, t)) <= 1e-10


def test_trl_t_squared_option_and_fastkd_convention():
    V, T = 40, 3.0
    s, t = logits((2, 3, V), torch.float64), logits((2, 3, V), torch.float64, seed=1)
    labels = labels_with_ignored((2, 3), V)
    plain = adapters.generalized_jsd_loss(s, t, labels, 0.3, T)
    scaled = adapters.generalized_jsd_loss(s, t, labels, 0.3, T, scale_by_t2=True)
    assert rel_err(scaled, T**2 * trl_jsd(s, t, labels, 0.3, T)) <= 1e-10
    assert rel_err(scaled, fastkd.jsd(s, t, 0.3, T, labels=labels)) <= 1e-10
    assert rel_err(plain * T**2, scaled) <= 1e-12
    none = adapters.generalized_jsd_loss(s, t, labels, 0.3, T, "none", scale_by_t2=True)
    assert rel_err(none, T**2 * trl_jsd(s, t, labels, 0.3, T, "none")) <= 1e-10


def test_trl_all_ignored_gives_zero_where_trl_gives_nan():
    V = 10
    s, t = leaf(logits((2, 3, V))), logits((2, 3, V), seed=1)
    labels = torch.full((2, 3), -100)
    for reduction in ("batchmean", "mean"):
        assert torch.isnan(trl_jsd(s.detach(), t, labels, 0.5, 1.0, reduction))
        loss = adapters.generalized_jsd_loss(s, t, labels, 0.5, 1.0, reduction)
        assert loss == 0
    loss.backward()
    assert (s.grad == 0).all()
    assert adapters.generalized_jsd_loss(s, t, labels, 0.5, 1.0, "none").shape == (0, V)


def test_trl_masked_teacher_vocabulary_is_finite():
    """A teacher logit of -inf: TRL's p (log p - log q) is 0 * -inf = NaN there; the adapter gives 0."""
    V = 12
    s, t = logits((2, 3, V), torch.float64), logits((2, 3, V), torch.float64, seed=1)
    t[..., :3] = -math.inf
    for beta in (0.0, 0.5):  # (beta = 1, reverse KL, is +inf there in both: the student has mass where p_t = 0)
        got = adapters.generalized_jsd_loss(s, t, beta=beta)
        assert torch.isfinite(got) and rel_err(got, trl_jsd(s, t, beta=beta, zero_nan_terms=True)) <= 1e-10
        assert torch.isnan(trl_jsd(s, t, beta=beta))
        student = leaf(s)
        terms = adapters.generalized_jsd_loss(student, t, beta=beta, reduction="none")
        assert rel_err(terms.detach(), trl_jsd(s, t, beta=beta, reduction="none", zero_nan_terms=True)) <= 1e-10
        (grad,) = torch.autograd.grad(terms.sum(), student)
        assert torch.isfinite(grad).all()


def test_trl_argument_errors():
    s = logits((2, 3, 5))
    with pytest.raises(ValueError, match="reduction"):
        adapters.generalized_jsd_loss(s, s, reduction="avg")
    with pytest.raises(ValueError, match="batch, seq, vocab"):
        adapters.generalized_jsd_loss(s[0, 0], s[0, 0])
    with pytest.raises(ValueError, match="beta"):
        adapters.generalized_jsd_loss(s, s, beta=-0.1)
    with pytest.raises(ValueError, match="labels"):
        adapters.generalized_jsd_loss(s, s, torch.zeros(2, 2, dtype=torch.long))


# -- torchtune ------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_torchtune_forward_kl_fp64_reference(normalize):
    V = 29
    s, t = leaf(logits((12, V), torch.float64)), leaf(logits((12, V), torch.float64, seed=1))
    labels = labels_with_ignored((12,), V)
    loss = adapters.ForwardKLLoss()
    compare(lambda a, b: loss(a, b, labels, normalize), lambda a, b: torchtune_ce(a, b, labels, -100, normalize),
            [s, t], 1e-10, backend="reference")


def test_torchtune_forward_kl_fp32_kernels_with_teacher_grad():
    """Kernels: the cross-entropy (KL + the teacher's entropy) and its gradients, the teacher's included;
    labels of another shape with one entry per row, a non-default ignore_index."""
    V = 61
    s, t = leaf(logits((2, 6, V))), leaf(logits((2, 6, V), seed=1))
    labels = labels_with_ignored((12,), V, seed=3)
    labels[labels == -100] = -1
    compare(lambda a, b: adapters.ForwardKLLoss(ignore_index=-1)(a, b, labels),
            lambda a, b: torchtune_ce(a, b, labels, -1), [s, t], 1e-5)


@pytest.mark.parametrize("T, chunks, backend, dtype, tol", [
    (9, 3, "reference", torch.float64, 1e-10),
    (11, 4, "reference", torch.float64, 1e-10),  # uneven: the last chunk takes the remainder
    (7, 2, "auto", torch.float32, 1e-5),
])
def test_torchtune_chunked(T, chunks, backend, dtype, tol):
    V = 37
    s, t = leaf(logits((2, T, V), dtype)), logits((2, T, V), dtype, seed=1)
    labels = labels_with_ignored((2, T), V, seed=4, every=3)
    base, remainder = divmod(T, chunks)
    lengths = [base] * (chunks - 1) + [base + remainder]
    loss = adapters.ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks)
    compare(lambda a, b: loss(list(a.split(lengths, 1)), list(b.split(lengths, 1)), labels),
            lambda a, b: torchtune_chunked(a.split(lengths, 1), b.split(lengths, 1), labels, chunks), [s, t], tol,
            backend=backend)


def test_torchtune_bf16_logits_computed_in_fp32():
    """bf16 logits (torchtune's usual input): both upcast and compute in fp32, so the values agree to 1e-5."""
    V = 50
    s, t = logits((10, V), torch.bfloat16), logits((10, V), torch.bfloat16, seed=1)
    labels = labels_with_ignored((10,), V)
    got = adapters.ForwardKLLoss()(s, t, labels)
    assert got.dtype == torch.float32 and rel_err(got, torchtune_ce(s, t, labels)) <= 1e-5


def test_torchtune_all_ignored_and_masked_logits():
    V = 16
    s, t = leaf(logits((2, 4, V))), logits((2, 4, V), seed=1)
    ignored = torch.full((2, 4), -100)
    chunked = adapters.ForwardKLWithChunkedOutputLoss(num_output_chunks=2)
    loss = chunked(list(s.split(2, 1)), list(t.split(2, 1)), ignored)
    assert loss == 0 and torchtune_chunked(s.split(2, 1), t.split(2, 1), ignored, 2) == 0
    loss.backward()
    assert (s.grad == 0).all()
    # entries masked (-inf) in both student and teacher: the same finite value as torchtune's
    s2, t2 = logits((6, V), torch.float64), logits((6, V), torch.float64, seed=1)
    s2[:, :4], t2[:, :4] = -math.inf, -math.inf
    labels = labels_with_ignored((6,), V)
    assert rel_err(adapters.ForwardKLLoss()(s2, t2, labels), torchtune_ce(s2, t2, labels)) <= 1e-10
    # masked in the student only, with teacher mass there: the true cross-entropy is +inf; torchtune drops the term
    t2[:, :4] = 0.0
    assert adapters.ForwardKLLoss()(s2, t2, labels) == math.inf
    assert torch.isfinite(torchtune_ce(s2, t2, labels))


def test_torchtune_argument_errors():
    s = logits((2, 6, 5))
    labels = torch.zeros(2, 6, dtype=torch.long)
    loss = adapters.ForwardKLWithChunkedOutputLoss(num_output_chunks=3)
    with pytest.raises(ValueError, match="3 student and teacher"):
        loss(list(s.split(3, 1)), list(s.split(3, 1)), labels)
    with pytest.raises(ValueError, match="add up"):
        loss(list(s[:, :5].split(2, 1)), list(s[:, :5].split(2, 1)), labels)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        loss(list(s.split(2, 1)), list(s.split(2, 1)), labels[0])
    with pytest.raises(ValueError, match="one entry per row"):
        adapters.ForwardKLLoss()(s, s, labels[:, :5])
    with pytest.raises(ValueError, match="num_output_chunks"):
        adapters.ForwardKLWithChunkedOutputLoss(num_output_chunks=0)
    with pytest.raises(ValueError, match="same shape"):
        adapters.ForwardKLLoss()(s, s[:, :, :4], labels)
