"""DKD kernel against the seed's reference (fp64), and against a log-space fp64 evaluation of the
same formula where the seed's log of binary probabilities saturates."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import kernels, reference
from fastkd.traffic import OpLog, count_bytes
from helpers import leaf, logits, loss_and_grads, randint, randn, rel_err



def targets(shape, V, seed=0, ignored=()):
    y = randint(V, shape, seed)
    for idx in ignored:
        y[idx] = -100
    return y


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, 0.0)


def dkd_logspace(s, t, target, alpha=1.0, beta=2.0, temperature=1.0, *, ignore_index=-100, reduction="batchmean"):
    """T^2 (alpha TCKD + beta NCKD) in fp64 from logsumexps: target masked with -inf, no log of a probability."""
    V = s.shape[-1]
    s = s.reshape(-1, V).double() / temperature
    t = t.reshape(-1, V).double() / temperature
    counted = target.reshape(-1) != ignore_index
    y = torch.where(counted, target.reshape(-1), 0)
    gt = F.one_hot(y, V).bool()
    rows = []
    for x in (s, t):
        x_y = x.gather(1, y[:, None])[:, 0]
        lse_m = x.masked_fill(gt, float("-inf")).logsumexp(1)
        lse = torch.logaddexp(lse_m, x_y)
        log_b = torch.stack([x_y - lse, lse_m - lse], 1)
        log_p = (x - lse_m[:, None]).masked_fill(gt, float("-inf"))
        rows.append((log_b, log_p))
    (lbs, lps), (lbt, lpt) = rows
    tckd = (lbt.exp() * (_finite_or_zero(lbt) - _finite_or_zero(lbs))).sum(1)
    nckd = (lpt.exp() * (_finite_or_zero(lpt) - _finite_or_zero(lps))).sum(1)
    loss = torch.where(counted, temperature**2 * (alpha * tckd + beta * nckd), 0.0)
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() / (counted.sum().clamp_min(1) if reduction == "batchmean" else 1)


def check(s, t, target, loss_tol=1e-5, grad_tol=1e-5, ref=dkd_logspace, **kw):
    """fastkd.dkd against `ref` on fp64 copies: loss and the gradients of s (and t when it requires grad)."""
    s64, t64 = leaf(s.double(), s.requires_grad), leaf(t.double(), t.requires_grad)
    loss, grads = loss_and_grads(lambda a, b: fastkd.dkd(a, b, target, **kw), s, t)
    ref_loss, ref_grads = loss_and_grads(lambda a, b: ref(a, b, target, **kw), s64, t64)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, ref_loss) <= loss_tol, (loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == s.dtype and rel_err(g, rg) <= grad_tol, rel_err(g, rg)


@pytest.mark.parametrize("V", [2, 7, 33, 4097])
def test_fp32_matches_seed_reference(V):
    """Non-saturated inputs: the seed's formulation (its -1000 offset) and the fused kernel agree."""
    s, t = leaf(logits((6, V))), leaf(logits((6, V), seed=1), False)
    y = targets((6,), V, ignored=[2])
    for reduction in ("batchmean", "sum", "none"):
        check(s, t, y, ref=reference.dkd, alpha=1.0, beta=8.0, temperature=4.0, reduction=reduction)


@pytest.mark.parametrize("V", [64, 65, 200])
def test_rows_spanning_several_blocks_with_teacher_grad(V, monkeypatch):
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", 64)
    s, t = leaf(logits((4, V))), leaf(logits((4, V), seed=1))
    y = torch.tensor([0, V - 1, 63, -100])  # the first, last and a block's last column
    check(s, t, y, alpha=0.5, beta=2.0, temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    s, t = leaf(logits((6, 300), dtype)), leaf(logits((6, 300), dtype, seed=1))
    check(s, t, targets((6,), 300), loss_tol=1e-5, grad_tol=1e-2, temperature=2.0)


def test_masked_teacher_vocabulary_outside_the_target():
    t = logits((4, 40), seed=1)
    y = targets((4,), 40)
    t[:, ::3] = float("-inf")
    t[torch.arange(4), y] = 1.0  # the target itself stays live
    check(leaf(logits((4, 40))), leaf(t, False), y, temperature=1.0)


def test_3d_input_non_contiguous_and_ignored_rows():
    s = logits((2, 30, 3)).transpose(1, 2).requires_grad_()  # [2, 3, 30], column stride 3
    t = logits((2, 3, 60), seed=1)[..., ::2].requires_grad_()
    y = torch.tensor([[4, -100, 29], [0, 7, -100]])
    for reduction in ("batchmean", "none"):
        check(s, t, y, temperature=3.0, reduction=reduction)
    _, (gs, gt) = loss_and_grads(lambda a, b: fastkd.dkd(a, b, y), s, t)
    assert (gs[y == -100] == 0).all() and (gt[y == -100] == 0).all()


def test_expanded_grad_output_and_all_rows_ignored():
    s, t = leaf(logits((4, 30))), leaf(logits((4, 30), seed=1), False)
    y = targets((4,), 30)
    (gs,) = torch.autograd.grad(fastkd.dkd(s, t, y, reduction="none"), s, torch.tensor(3.0).expand(4))
    s64 = leaf(s.double())
    (ref_gs,) = torch.autograd.grad(dkd_logspace(s64, t.double(), y, reduction="none"), s64,
                                    torch.tensor(3.0, dtype=torch.float64).expand(4))
    assert rel_err(gs, ref_gs) <= 1e-5
    loss = fastkd.dkd(s, t, torch.full((4,), -100))
    (gs,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (gs == 0).all()


@pytest.mark.parametrize("case", ["target_dominates", "target_vanishes"])
def test_saturated_inputs_stay_finite(case):
    """A target logit beating the rest by > 100 T (fp32: 1 - p_target = 0) or p_target -> 0: the seed's
    torch.log of the binary probabilities gives inf/NaN, the fused kernel matches the log-space fp64 formula."""
    s, t = logits((4, 50)), logits((4, 50), seed=1)
    y = targets((4,), 50)
    rows = torch.arange(4)
    shift = 150.0 if case == "target_dominates" else -150.0
    s[rows, y] += shift
    t[rows, y] += shift / 2
    s, t = leaf(s), leaf(t)
    seed_loss = reference.dkd(s.detach(), t.detach(), y)
    assert not torch.isfinite(seed_loss), "the seed's formulation should saturate here"
    check(s, t, y, temperature=1.0)


def test_soft_target_is_reduced_by_argmax():
    s, t = logits((5, 10)), logits((5, 10), seed=1)
    soft = randn((5, 10), seed=2).float().exp()
    assert torch.equal(fastkd.dkd(s, t, soft), fastkd.dkd(s, t, soft.argmax(1)))
    module = fastkd.DKD(alpha=1.0, beta=8.0, temperature=4.0)
    assert torch.equal(module(s, t, target=soft), fastkd.dkd(s, t, soft.argmax(1), 1.0, 8.0, 4.0))


@pytest.mark.interpreter
def test_bad_input():
    s, t = logits((3, 10)), logits((3, 10), seed=1)
    with pytest.raises(ValueError, match="V >= 2"):
        fastkd.dkd(s[:, :1], t[:, :1], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have the leading shape"):
        fastkd.dkd(s, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        fastkd.dkd(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target must be in \[0, 10\)"):
        fastkd.dkd(s, t, torch.tensor([0, 10, -100]))
    with pytest.raises(ValueError, match="target must be in"):
        fastkd.dkd(s, t, torch.tensor([0, -1, 2]))
    with pytest.raises(TypeError, match="target="):
        fastkd.DKD()(s, t)


def test_bad_target_gives_a_nan_row_where_unchecked():
    """What a GPU sees (the CPU check is skipped here): a NaN row, never an out-of-bounds read."""
    s, t = logits((3, 10)), logits((3, 10), seed=1)
    rows, _ = fastkd.ops.dkd_rows(s, t, torch.tensor([1, 10, -5]), 1.0, 2.0, 1.0, -100)
    assert torch.isfinite(rows[0]) and rows[1:].isnan().all()


def test_gradcheck_fp64():
    s, t = leaf(logits((4, 9), torch.float64)), leaf(logits((4, 9), torch.float64, seed=1))
    y = torch.tensor([0, -100, 8, 3])
    f = functools.partial(fastkd.dkd, target=y, alpha=0.7, beta=1.9, temperature=1.7, reduction="none")
    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.interpreter
def test_bytes_allocations_and_syncs(monkeypatch):
    N, V = 4, 4096
    s, t = logits((N, V), torch.bfloat16).requires_grad_(), logits((N, V), torch.bfloat16, seed=1)
    y = targets((N,), V, ignored=[1])
    with count_bytes() as fwd:
        loss = fastkd.dkd(s, t, y, temperature=2.0)
    with count_bytes() as bwd:
        loss.backward()
    elems = N * V * 2
    assert (fwd.read + fwd.written) / elems <= 2.05
    assert (fwd.read + fwd.written + bwd.read + bwd.written) / elems <= 5.1
    with OpLog() as log:
        torch.autograd.grad(fastkd.dkd(s, t, y), s)
    big = log.allocations(N * V)
    assert len(big) == 1 and big[0][0].startswith("aten.empty"), big
    assert len(log.host_syncs()) == 1  # the target range check, on the CPU only
    monkeypatch.setattr(fastkd._checks, "range_checkable", lambda target: False)  # as on a GPU
    with OpLog() as log:
        torch.autograd.grad(fastkd.dkd(s, t, y), s)
    assert log.host_syncs() == []


def test_compile_and_opcheck():
    s, t = logits((2, 3, 12), torch.float64), logits((2, 3, 12), torch.float64, seed=1)
    y = torch.tensor([[1, -100, 3], [0, 11, 5]])
    w = torch.eye(12, dtype=torch.float64).requires_grad_()
    f = lambda w: fastkd.dkd(s @ w, t, y, 1.0, 8.0, 4.0)  # noqa: E731
    torch._dynamo.reset()
    eager = torch.autograd.grad(f(w), w)[0]
    compiled_loss = torch.compile(f, backend="aot_eager", fullgraph=True)(w)
    assert rel_err(compiled_loss, f(w)) <= 1e-12
    assert rel_err(torch.autograd.grad(compiled_loss, w)[0], eager) <= 1e-12
    _, stats = fastkd.ops.dkd_rows(s, t, y, 1.0, 2.0, 1.5, -100)
    torch.library.opcheck(fastkd.ops.dkd_rows, (s.requires_grad_(), t, y, 1.0, 2.0, 1.5, -100))
    torch.library.opcheck(fastkd.ops.dkd_rows_backward,
                          (torch.rand(6, dtype=torch.float64), s.detach(), t, stats, y, 1.0, 2.0, 1.5, -100, True, True))


def test_distillation_on_digits_matches_reference():
    """A short real-data run: a linear student distilled from an MLP teacher on scikit-learn's bundled
    digits (no download), with fastkd.DKD and with the seed's reference; the loss curves agree."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data[:128], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:128])
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(randn(p.shape, seed=p.numel()).float() * 0.5)
        teacher_logits = teacher(x)
    init = randn((64, 10), seed=7).float() * 0.1

    def curve(backend):
        w = init.clone().requires_grad_()
        opt = torch.optim.SGD([w], lr=0.02)
        losses = []
        with fastkd.use_backend(backend):
            for step in range(24):
                batch = slice(32 * (step % 4), 32 * (step % 4 + 1))
                loss = fastkd.DKD(alpha=1.0, beta=8.0, temperature=4.0)(x[batch] @ w, teacher_logits[batch],
                                                                          target=y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    fused, eager = curve("triton"), curve("reference")
    assert fused[-4:].mean() < 0.8 * fused[:4].mean(), f"the student should learn: {fused}"
    assert rel_err(fused, eager) <= 1e-4 and ((fused - eager).abs() / eager).max() <= 1e-4
