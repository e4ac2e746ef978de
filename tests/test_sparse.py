"""sparse_kl_div / sparse_jsd: a full student row against a top-k teacher, vs the fp64 reference (full-vocabulary
softmax, gather, and the tail as the exact sum over the ids outside the support)."""
import pytest
import torch

import fastkd
from fastkd import _checks, ops, reference
from fastkd.traffic import OpLog, count_bytes
from helpers import DEVICE, leaf, logits, randn, rel_err

NEG = float("-inf")
MODES = {"forward": dict(beta=0.0), "reverse": dict(beta=1.0), "jsd": dict(beta=0.3)}
KINDS = [("tail", "logprobs"), ("renormalize", "logprobs"), ("renormalize", "logits")]


def teacher(shape, K, seed=1, values="logprobs", pad=0):
    """The top-K ids and values of a random teacher; the last `pad` pairs of every other row are padding
    (id 0 repeated, value -inf)."""
    t = logits(shape, torch.float64, seed=seed)
    vals, ids = t.log_softmax(-1).topk(K, -1)
    if values == "logits":
        vals = t.gather(-1, ids)
    if pad:
        vals[..., ::2, K - pad:] = NEG
        ids[..., ::2, K - pad:] = 0
    return ids, vals


def loss_fn(beta, **kw):
    return lambda s, ids, vals, **more: fastkd.sparse_jsd(s, ids, vals, beta, **kw, **more)


def check(s, ids, vals, beta, loss_tol, grad_tol, **kw):
    """Loss and student gradient (a weighted sum for 'none') of the kernels vs the fp64 reference."""
    out = []
    for x, ref in ((leaf(s), False), (leaf(s.double()), True)):
        with fastkd.use_backend("reference" if ref else "auto"):
            loss = fastkd.sparse_jsd(x, ids, vals.double() if ref else vals, beta, **kw)
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
        (grad,) = torch.autograd.grad((loss * w).sum(), x)
        out.append((loss.detach(), grad))
    (loss, grad), (ref_loss, ref_grad) = out
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert rel_err(loss, ref_loss) <= loss_tol, (loss, ref_loss)
    assert rel_err(grad, ref_grad) <= grad_tol, rel_err(grad, ref_grad)
    return loss, ref_loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("missing,values", KINDS)
@pytest.mark.parametrize("V,K", [(33, 5), (4097, 7), (2048, 1030)])
def test_fp32_matches_fp64_reference(mode, missing, values, V, K):
    """Odd V; V one past a 4096-column block (two blocks); K over one 1024-pair block.  Padding, labels, T = 2."""
    s = logits((2, 3, V), seed=0)
    ids, vals = teacher((2, 3, V), K, values=values, pad=min(2, K - 1))
    labels = torch.tensor([[1, -100, 3], [0, 2, 5]], device=DEVICE)
    check(s, ids, vals.float(), MODES[mode]["beta"], 1e-5, 1e-5, values=values, missing=missing, temperature=2.0,
          labels=labels, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("missing,values", KINDS[:2])
def test_low_precision(dtype, missing, values):
    s = logits((4, 300), dtype, seed=2)
    ids, vals = teacher((4, 300), 20, values=values)
    check(s, ids, vals.to(dtype), 0.3, 1e-5, 1e-2, values=values, missing=missing)
    check(s, ids, vals.to(dtype), 0.0, 1e-5, 1e-2, values=values, missing=missing, reduction="sum")


@pytest.mark.parametrize("beta,missing,values", [(0.0, *KINDS[0]), (1.0, *KINDS[0]), (0.4, *KINDS[0]),
                                                  (1.0, *KINDS[1]), (0.4, *KINDS[2])])
def test_gradcheck(beta, missing, values):
    s = leaf(logits((2, 7), torch.float64, seed=3))
    ids, vals = teacher((2, 7), 3, values=values, pad=1)
    fn = loss_fn(beta, values=values, missing=missing, temperature=1.5, reduction="none")
    assert torch.autograd.gradcheck(lambda x: fn(x, ids, vals), (s,))


@pytest.mark.parametrize("mode", MODES)
def test_full_support_equals_dense_divergence(mode):
    """K = V (the tail is empty): the sparse loss is the dense KL / JSD of fastkd.kl_div / jsd."""
    s, t = logits((3, 40), seed=4), logits((3, 40), seed=5)
    vals, ids = t.log_softmax(-1).topk(40, -1)
    beta = MODES[mode]["beta"]
    for missing in ("tail", "renormalize"):
        sparse = fastkd.sparse_jsd(s, ids, vals, beta, missing=missing, temperature=1.0)
        dense = fastkd.jsd(s, t, beta)
        assert rel_err(sparse, dense) <= 1e-5, (missing, float(sparse), float(dense))


def test_k1_and_padding_are_left_out():
    """K = 1; padding pairs (any id, even negative or past V, with value -inf) change nothing."""
    s = logits((4, 50), seed=6)
    ids, vals = teacher((4, 50), 1)
    check(s, ids, vals.float(), 0.0, 1e-5, 1e-5)
    ids3, vals3 = teacher((4, 50), 3)
    padded_ids = torch.cat([ids3, torch.tensor([[0, -1, 50]] * 4, device=DEVICE)], 1)
    padded_vals = torch.cat([vals3, torch.full((4, 3), NEG, device=DEVICE, dtype=vals3.dtype)], 1)
    for missing in ("tail", "renormalize"):
        for beta in (0.0, 1.0, 0.5):
            a = fastkd.sparse_jsd(s, ids3, vals3.float(), beta, missing=missing, reduction="none")
            b = fastkd.sparse_jsd(s, padded_ids, padded_vals.float(), beta, missing=missing, reduction="none")
            assert torch.equal(a, b)


def test_all_padding_and_ignored_rows():
    """A row whose pairs are all padding compares two empty supports (renormalize: 0) or two full tails (0);
    ignored rows give 0 and a zero gradient."""
    s = leaf(logits((3, 20), seed=7))
    ids, vals = teacher((3, 20), 4)
    vals = vals.float().clone()
    vals[1] = NEG
    labels = torch.tensor([0, 1, -100], device=DEVICE)
    for missing in ("tail", "renormalize"):
        rows = fastkd.sparse_kl_div(s, ids, vals, missing=missing, labels=labels, reduction="none")
        assert rows[1] == 0 and rows[2] == 0 and rows[0] > 0
        (g,) = torch.autograd.grad(rows.sum(), s)
        assert torch.all(g[1:] == 0) and torch.any(g[0] != 0)


def test_renormalize_gradient_is_zero_off_support():
    s = leaf(logits((2, 64), seed=8))
    ids, vals = teacher((2, 64), 6, values="logits")
    loss = fastkd.sparse_kl_div(s, ids, vals.float(), values="logits", missing="renormalize")
    (g,) = torch.autograd.grad(loss, s)
    off = torch.ones_like(g, dtype=torch.bool).scatter_(1, ids, False)
    assert torch.all(g[off] == 0) and torch.all(g[~off] != 0)


def test_saturated_student_stays_finite():
    """Student logits of +-1e4 (T = 1): the full-row lse and the tail stay finite where the KL is finite."""
    s = logits((3, 100), seed=9) * 5e3
    t = logits((3, 100), seed=10)
    vals, ids = t.log_softmax(-1).topk(10, -1)
    check(s, ids, vals.float(), 1.0, 1e-5, 1e-5)
    check(s, ids, vals.float(), 0.5, 1e-5, 1e-5)


def test_strided_inputs():
    """Transposed student rows (column stride != 1), 3-D sliced ids and values."""
    base = logits((60, 6), seed=11)
    s = base.t()  # [6, 60], column stride 6
    ids, vals = teacher((6, 60), 9)
    ids_wide, vals_wide = torch.cat([ids, ids], 1), torch.cat([vals, vals], 1).float()
    check(s, ids_wide[:, ::2], vals_wide[:, ::2], 0.3, 1e-5, 1e-5, temperature=0.7)


def test_bad_ids(monkeypatch):
    s = logits((2, 10), seed=12)
    ids, vals = teacher((2, 10), 3)
    bad = ids.clone()
    bad[1, 0] = 10
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 10\)"):
        fastkd.sparse_kl_div(s, bad, vals.float())
    if DEVICE == "cpu":  # as on a GPU (no range check): a NaN row, never an out-of-bounds read
        monkeypatch.setattr(_checks, "range_checkable", lambda t: False)
        rows = fastkd.sparse_kl_div(s, bad, vals.float(), reduction="none")
        assert torch.isfinite(rows[0]) and torch.isnan(rows[1])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(values="probs"), ValueError, "values must be"),
    (dict(missing="drop"), ValueError, "missing must be"),
    (dict(values="logits", missing="tail"), ValueError, "needs values='logprobs'"),
    (dict(reduction="mean"), ValueError, "reduction='mean'"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_argument_errors(kwargs, error, match):
    s = logits((2, 10))
    ids, vals = teacher((2, 10), 3)
    with pytest.raises(error, match=match):
        fastkd.sparse_kl_div(s, ids, vals.float(), **kwargs)


def test_tensor_errors():
    s = logits((2, 10))
    ids, vals = teacher((2, 10), 3)
    vals = vals.float()
    with pytest.raises(TypeError, match="teacher_ids must be int32 or int64"):
        fastkd.sparse_kl_div(s, ids.float(), vals)
    with pytest.raises(ValueError, match="teacher_values must have shape"):
        fastkd.sparse_kl_div(s, ids, vals[:1])
    with pytest.raises(ValueError, match="same shape"):
        fastkd.sparse_kl_div(s, ids, vals[:, :2])
    with pytest.raises(ValueError, match="must not require grad"):
        fastkd.sparse_kl_div(s, ids, leaf(vals))
    with pytest.raises(ValueError, match="beta"):
        fastkd.sparse_jsd(s, ids, vals, 1.5)


def test_int32_ids_and_modules_of_reference_agree():
    s = logits((3, 30), seed=13)
    ids, vals = teacher((3, 30), 5)
    a = fastkd.sparse_kl_div(s, ids, vals.float(), reverse=True)
    b = fastkd.sparse_kl_div(s, ids.int(), vals.float(), reverse=True)
    c = reference.sparse_kl_div(s.double(), ids, vals, reverse=True)
    assert torch.equal(a, b) and rel_err(a, c) <= 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("missing,bound", [("tail", 3.1), ("renormalize", 1.1)])
def test_bytes_per_student_element(missing, bound):
    """bf16, V = 16384, K = 32: forward + backward <= 3.1 element sizes per student logit (renormalize: the forward
    reads only the K gathered logits, the backward writes the row); the gradient is written once (+ K ids)."""
    N, V, K = 2, 16384, 32
    s = randn((N, V), seed=14).bfloat16().requires_grad_()
    ids, vals = teacher((N, V), K)
    vals = vals.bfloat16()
    with count_bytes() as fwd:
        loss = fastkd.sparse_kl_div(s, ids, vals, missing=missing)
    with count_bytes() as bwd:
        loss.backward()
    per_elem = N * V * 2
    total = (fwd.read + fwd.written + bwd.read + bwd.written) / per_elem
    assert total <= bound, total
    assert bwd.written <= per_elem + N * K * 2


@pytest.mark.interpreter
def test_no_dense_temporaries_or_host_syncs(monkeypatch):
    s = randn((4, 512), seed=15).requires_grad_()
    ids, vals = teacher((4, 512), 8)
    monkeypatch.setattr(_checks, "range_checkable", lambda t: False)  # as on a GPU
    with OpLog() as log:
        fastkd.sparse_jsd(s, ids, vals.float(), 0.5).backward()
    assert len(log.allocations(4 * 512)) == 1  # the gradient
    assert not log.host_syncs()


def test_opcheck():
    s = leaf(logits((3, 9), torch.float64, seed=16))
    ids, vals = teacher((3, 9), 3, pad=1)
    labels = torch.tensor([1, -100, 2], device=DEVICE)
    torch.library.opcheck(ops.sparse_kl_rows, (s, ids, vals, 2, 0.3, 1.5, True, False, labels, -100))
    _, stats = ops.sparse_kl_rows(s.detach(), ids, vals, 0, 0.0, 1.5, False, True, None, -100)
    g = torch.rand(3, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ops.sparse_kl_rows_backward, (g, s.detach(), ids, vals, stats, 0, 0.0, 1.5, False, True,
                                                        None, -100))
