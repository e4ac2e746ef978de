"""Chunked fused-linear KD (fastkd.linear) against F.linear + the unchunked loss, the fp64 references,
gradcheck on the kernels, and the allocations of a call (no [tokens, V] tensor)."""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import linear, reference
from fastkd.traffic import OpLog
from helpers import leaf, randint, randn, rel_err

LOSSES = {"kl_div": linear.linear_kl_div, "jsd": linear.linear_jsd, "dkd": linear.linear_dkd}


def labels_with_ignored(shape, V, seed=0, every=5):
    y = randint(V, shape, seed)
    y.view(-1)[::every] = -100
    return y


def make(lead, H, V, dtype=torch.float32, seed=0, bias=True, teacher_hidden=None):
    """Student hidden [lead, H], weight [V, H], bias [V]; teacher logits [lead, V], or (teacher_hidden = H_t)
    the teacher's hidden states, weight and bias.  Logits come out with a spread of about 2."""
    h = randn((*lead, H), seed, dtype)
    w = (2.0 / H**0.5 * randn((V, H), seed + 1)).to(dtype)
    b = (0.5 * randn((V,), seed + 2)).to(dtype) if bias else None
    if teacher_hidden is None:
        return h, w, b, (2.0 * randn((*lead, V), seed + 3)).to(dtype), None, None
    th = randn((*lead, teacher_hidden), seed + 4, dtype)
    tw = (2.0 / teacher_hidden**0.5 * randn((V, teacher_hidden), seed + 5)).to(dtype)
    return h, w, b, th, tw, (0.5 * randn((V,), seed + 6)).to(dtype)


def loss_and_grads(fn, h, w, b, *args):
    """fn's loss and the gradients of its (linspace-weighted) sum w.r.t. h, w and b (the ones given)."""
    h, w, b = (leaf(x) if x is not None else None for x in (h, w, b))
    loss = fn(h, w, b, *args)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    grads = torch.autograd.grad((loss * weight).sum(), [x for x in (h, w, b) if x is not None])
    return loss.detach(), grads


def fused(name, **kw):
    def fn(h, w, b, t, tw, tb):
        return LOSSES[name](h, w, t, tw, student_bias=b, teacher_bias=tb, **kw)
    return fn


def composed(loss_fn, **kw):
    """F.linear for the logits, then `loss_fn` (fastkd.kl_div, reference.jsd, ...) on the full [tokens, V]."""
    def fn(h, w, b, t, tw, tb):
        return loss_fn(F.linear(h, w, b), t if tw is None else F.linear(t, tw, tb), **kw)
    return fn


def fp64(xs):
    return [x.double() if x is not None else None for x in xs]


def check(name, inputs, loss_tol=1e-5, grad_tol=1e-5, chunk_size=16, **kw):
    """LOSSES[name] against F.linear + the fp64 reference of the same loss."""
    loss, grads = loss_and_grads(fused(name, chunk_size=chunk_size, **kw), *inputs)
    ref_loss, ref_grads = loss_and_grads(composed(getattr(reference, name), **kw), *fp64(inputs))
    assert loss.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    assert rel_err(loss, ref_loss) <= loss_tol, (loss, ref_loss)
    for g, rg, x in zip(grads, ref_grads, [x for x in inputs[:3] if x is not None]):
        assert g.dtype == x.dtype and g.shape == x.shape and torch.isfinite(g).all()
        assert rel_err(g, rg) <= grad_tol, rel_err(g, rg)
    return loss, grads


def test_kl_equals_unchunked_composition_and_fp64():
    """Forward KL, 3-D hidden [4, 8, H], bias, labels with ignored rows, T = 2, 4 chunks of 8 rows: equal to
    F.linear + fastkd.kl_div (the same kernels unchunked) within 1e-4 and to fp64 within 1e-5."""
    V = 130
    inputs = make((4, 8), 24, V)
    kw = dict(temperature=2.0, labels=labels_with_ignored((4, 8), V))
    loss, grads = check("kl_div", inputs, chunk_size=8, **kw)
    ref_loss, ref_grads = loss_and_grads(composed(fastkd.kl_div, **kw), *inputs)
    assert rel_err(loss, ref_loss) <= 1e-4
    assert all(rel_err(g, rg) <= 1e-4 for g, rg in zip(grads, ref_grads))


@pytest.mark.parametrize("name, kw, teacher_hidden, reduction", [
    ("kl_div", dict(reverse=True, temperature=1.5), 20, "batchmean"),
    ("jsd", dict(beta=0.3, temperature=2.0), None, "sum"),
    ("jsd", dict(beta=1.0), 12, "batchmean"),
    ("dkd", dict(alpha=0.5, beta=4.0, temperature=2.0), 20, "batchmean"),
])
def test_variants_match_fp64(name, kw, teacher_hidden, reduction):
    """Reverse KL, JSD (and its beta = 1 endpoint), DKD; teacher as logits or as hidden states + weight + bias;
    tokens not a multiple of the chunk (20 = 2 x 8 + 4)."""
    V = 150
    inputs = make((20,), 16, V, teacher_hidden=teacher_hidden, seed=3)
    labels = labels_with_ignored((20,), V, seed=4)
    kw = {**kw, ("target" if name == "dkd" else "labels"): labels}
    check(name, inputs, reduction=reduction, chunk_size=8, **kw)


def test_reduction_none_recomputes_in_backward():
    """'none': per-row losses (ignored rows 0), and a backward with per-row weights; no bias."""
    V = 100
    inputs = make((2, 10), 16, V, bias=False)
    labels = labels_with_ignored((2, 10), V, seed=5, every=7)
    loss, _ = check("jsd", inputs, beta=0.5, labels=labels, reduction="none", chunk_size=6)
    assert loss.shape == (2, 10) and (loss[labels == -100] == 0).all() and (loss[labels != -100] > 0).all()


@pytest.mark.parametrize("name, kw", [("kl_div", dict(temperature=2.0)), ("dkd", dict(alpha=1.0, beta=2.0))])
def test_bf16_with_fp32_accumulation(name, kw):
    """bf16 hidden, weight, bias and teacher hidden states: within 1e-2 of fp64 (gradients in bf16), and within
    1e-3 of F.linear + the unchunked loss in bf16 (the gap to fp64 is the bf16 rounding of the logits, shared)."""
    V = 200
    inputs = make((24,), 32, V, dtype=torch.bfloat16, teacher_hidden=16, seed=7)
    kw = {**kw, ("target" if name == "dkd" else "labels"): labels_with_ignored((24,), V, seed=8)}
    loss, grads = check(name, inputs, loss_tol=1e-2, grad_tol=1e-2, chunk_size=8, **kw)
    ref_loss, ref_grads = loss_and_grads(composed(getattr(fastkd, name), **kw), *inputs)
    assert rel_err(loss, ref_loss) <= 1e-3 and all(rel_err(g, rg) <= 1e-3 for g, rg in zip(grads, ref_grads))
    assert linear._MIXED_ADDMM[("cpu", torch.bfloat16)] is False  # the CPU has no fp32-output bf16 addmm


def test_no_tokens_by_vocab_tensor_and_no_host_sync():
    """tokens = 4 x chunk: every allocation of the call (forward and backward, teacher from hidden states)
    is below tokens x V elements; no host sync."""
    N, H, V, chunk = 32, 16, 130, 8
    h, w, b, th, tw, tb = make((N,), H, V, teacher_hidden=8)
    h, w, b = leaf(h), leaf(w), leaf(b)
    with OpLog() as log:
        loss = linear.linear_kl_div(h, w, th, tw, student_bias=b, teacher_bias=tb, chunk_size=chunk,
                                    labels=labels_with_ignored((N,), V))
        loss.backward()
    assert log.allocations(N * V) == []
    assert log.host_syncs() == []
    assert (chunk, V) in [shape for _, shape in log.allocations(chunk * V)]  # the chunks' logits
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_fp64_on_the_kernels(reduction):
    h, w, b, t, _, _ = make((3,), 2, 4, dtype=torch.float64, seed=9)
    labels = torch.tensor([1, -100, 3])

    def fn(h, w, b):
        return linear.linear_kl_div(h, w, t, student_bias=b, temperature=1.5, labels=labels, chunk_size=2,
                                    reduction=reduction)

    assert torch.autograd.gradcheck(fn, (leaf(h), leaf(w), leaf(b)))


def test_reference_backend_runs_the_same_chunk_loop():
    """Under the 'reference' backend each chunk runs the eager reference: same values, same allocation bound."""
    N, V = 64, 120
    h, w, b, th, tw, tb = make((N,), 16, V, teacher_hidden=12, seed=11)
    labels = labels_with_ignored((N,), V, seed=12)
    with fastkd.use_backend("reference"):
        for name, kw in (("kl_div", {"labels": labels}), ("jsd", {"beta": 0.7, "labels": labels}),
                         ("dkd", {"target": labels})):
            check(name, (h, w, b, th, tw, tb), reduction="sum", **kw)
        with OpLog() as log:
            loss = linear.linear_kl_div(leaf(h), leaf(w), th, tw, teacher_bias=tb, chunk_size=16)
            loss.backward()
    assert log.allocations(N * V) == []


def test_default_chunk_size_rule(monkeypatch):
    assert linear.default_chunk_size(32768, torch.float32, torch.device("cpu")) == 512  # 256 MiB / (32768 x 16 B)
    assert linear.default_chunk_size(128256, torch.bfloat16, torch.device("cpu")) == 128
    assert linear.default_chunk_size(10**9, torch.float32, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 << 30, 80 << 30))
    assert linear.default_chunk_size(128256, torch.bfloat16, torch.device("cuda")) == 512  # 1 GiB cap
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 30, 80 << 30))
    assert linear.default_chunk_size(128256, torch.bfloat16, torch.device("cuda")) == 128  # a quarter of 1 GiB free


def test_default_chunk_size_gives_the_same_loss():
    inputs = make((40,), 8, 50, seed=13)
    with fastkd.use_backend("reference"):
        a = fused("kl_div")(*inputs)
        b = fused("kl_div", chunk_size=7)(*inputs)
    assert rel_err(a, b) <= 1e-6


def test_only_the_student_gets_gradients_and_no_grad_skips_them():
    h, w, b, th, tw, tb = make((32,), 6, 40, teacher_hidden=8, seed=14)
    h, w, th, tw = leaf(h), leaf(w), leaf(th), leaf(tw)
    with fastkd.use_backend("reference"):
        linear.linear_kl_div(h, w, th, tw, chunk_size=8).backward()
        assert th.grad is None and tw.grad is None and h.grad is not None and w.grad is not None
        with torch.no_grad(), OpLog() as log:
            loss = linear.linear_kl_div(h, w, th, tw, chunk_size=8)
    shapes = [shape for _, shape in log.allocations(1)]
    assert not loss.requires_grad and (40, 6) not in shapes and (32, 6) not in shapes  # no gradient buffers


def test_second_backward_gives_the_same_gradients():
    h, w, b, t, _, _ = make((12,), 4, 20, seed=16)
    h = leaf(h)
    with fastkd.use_backend("reference"):
        for reduction in ("sum", "none"):
            loss = linear.linear_kl_div(h, w, t, chunk_size=5, reduction=reduction)
            first, second = [torch.autograd.grad(loss.sum(), h, retain_graph=True)[0] for _ in range(2)]
            assert torch.equal(first, second)


def test_modules_call_the_functions():
    V = 60
    h, w, b, t, _, _ = make((2, 10), 8, V, seed=15)
    labels = labels_with_ignored((2, 10), V)
    with fastkd.use_backend("reference"):
        pairs = [
            (linear.LinearKLDiv(temperature=2.0, reverse=True, reduction="sum", chunk_size=6)(
                h, w, t, student_bias=b, labels=labels),
             linear.linear_kl_div(h, w, t, student_bias=b, temperature=2.0, reverse=True, labels=labels,
                                  reduction="sum")),
            (linear.LinearJSD(beta=0.2, reduction="none")(h, w, t, labels=labels),
             linear.linear_jsd(h, w, t, beta=0.2, labels=labels, reduction="none")),
            (linear.LinearDKD(alpha=2.0, beta=1.0, chunk_size=4)(h, w, t, target=labels, student_bias=b),
             linear.linear_dkd(h, w, t, target=labels, student_bias=b, alpha=2.0, beta=1.0)),
        ]
    for got, want in pairs:
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6


def test_argument_errors():
    V, H = 12, 4
    h, w, b, t, _, _ = make((6,), H, V)
    th, tw = randn((6, 5)), randn((V, 5))
    call = linear.linear_kl_div
    cases = [
        (lambda: call(h, w[:, :3], t), ValueError, "student_weight"),
        (lambda: call(h, w[0], t), ValueError, "student_weight"),
        (lambda: call(h, w, t, student_bias=b[:-1]), ValueError, "student_bias"),
        (lambda: call(h, w.double(), t), ValueError, "student_weight"),
        (lambda: call(h, w, t[:, :-1]), ValueError, "teacher"),
        (lambda: call(h, w, t[:-1]), ValueError, "teacher"),
        (lambda: call(h, w, t, teacher_bias=b), ValueError, "teacher_bias"),
        (lambda: call(h, w, th, tw[:-1]), ValueError, "teacher"),
        (lambda: call(h, w, th, tw[:, :-1]), ValueError, "teacher_weight"),
        (lambda: call(h, w, th, tw, teacher_bias=b[:-1]), ValueError, "teacher_bias"),
        (lambda: call(h.int(), w, t), TypeError, "student_hidden"),
        (lambda: call(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda: call(h, w, t, chunk_size=-3), ValueError, "chunk_size"),
        (lambda: call(h, w, t, chunk_size=True), ValueError, "chunk_size"),
        (lambda: call(h, w, t, chunk_size=2.0), ValueError, "chunk_size"),
        (lambda: call(h, w, t, reduction="mean"), ValueError, "mean"),
        (lambda: call(h, w, t, temperature=0.0), ValueError, "temperature"),
        (lambda: call(h, w, t, labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        (lambda: linear.linear_jsd(h, w, t, beta=1.5), ValueError, "beta"),
        (lambda: linear.linear_dkd(h, w, t, target=None), TypeError, "target"),
        (lambda: linear.linear_dkd(h, w, t, target=torch.full((6,), V)), ValueError, "target"),
        (lambda: linear.linear_dkd(h, w[:1], t[:, :1], target=torch.zeros(6, dtype=torch.long)), ValueError, "V >= 2"),
    ]
    for fn, error, words in cases:
        with pytest.raises(error, match=words):
            fn()
