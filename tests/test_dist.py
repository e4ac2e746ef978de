"""DIST kernels against the seed's code in fp64 (the official eps placement), including near-uniform rows
where sum p^2 - 1/V would cancel, rarely-predicted classes where eps dominates, and the global batch."""
import functools
import time

import pytest
import torch

import fastkd
from fastkd import kernels, reference
from fastkd.traffic import OpLog, count_bytes
from helpers import leaf, logits, rel_err



def check(s, t, loss_tol=1e-5, grad_tol=1e-5, **kw):
    """fastkd.dist against the seed's DIST on fp64 copies: loss and gradients of the inputs requiring grad."""
    s64, t64 = leaf(s.double(), s.requires_grad), leaf(t.double(), t.requires_grad)
    inputs = [x for x in (s, t) if x.requires_grad]
    loss = fastkd.dist(s, t, **kw)
    grads = torch.autograd.grad(loss, inputs)
    ref = reference.dist(s64, t64, **kw)
    ref_grads = torch.autograd.grad(ref, [x for x in (s64, t64) if x.requires_grad])
    assert loss.shape == () and torch.isfinite(loss)
    assert rel_err(loss, ref) <= loss_tol, (float(loss), float(ref))
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == s.dtype and torch.isfinite(g).all() and rel_err(g, rg) <= grad_tol, rel_err(g, rg)
    return loss


@pytest.mark.parametrize("N,V", [(2, 9), (5, 7), (33, 100), (6, 4097)])
def test_fp32_matches_seed(N, V):
    check(leaf(logits((N, V))), leaf(logits((N, V), seed=1)), beta=1.0, gamma=2.0, temperature=4.0)


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
def test_near_uniform_rows(scale):
    """p ~ 1/V: sum p^2 - 1/V would lose its digits; the centred form keeps 1e-5 (eager fp32 is ~1e-4 off)."""
    s, t = leaf(logits((40, 300), scale=scale)), leaf(logits((40, 300), scale=scale, seed=1))
    check(s, t, temperature=1.0)
    with fastkd.use_backend("reference"):  # the check can fail: the eager fp32 code misses the bound
        eager = torch.autograd.grad(fastkd.dist(s, t), s)[0]
    s64 = leaf(s.double())
    assert rel_err(eager, torch.autograd.grad(reference.dist(s64, t.double()), s64)[0]) > 1e-5


def test_rarely_predicted_classes_where_eps_dominates():
    """Columns whose probabilities barely vary over the batch (a class no row predicts): their centred
    norms are ~1e-12, eps = 1e-8 dominates the denominator, as in the official code."""
    s, t = logits((16, 50)), logits((16, 50), seed=1)
    s[:, :5] = -30.0 + 1e-3 * s[:, :5]
    t[:, :5] = -30.0 + 1e-3 * t[:, :5]
    check(leaf(s), leaf(t), temperature=1.0)


def test_rows_spanning_several_blocks_3d_non_contiguous_and_ignored_rows(monkeypatch):
    monkeypatch.setattr(kernels.common, "MAX_BLOCK", 64)
    monkeypatch.setattr(kernels.dist, "BLOCK_R", 4)
    s = logits((3, 150, 4)).transpose(1, 2).requires_grad_()  # [3, 4, 150], column stride 4
    t = logits((3, 4, 300), seed=1)[..., ::2].requires_grad_()
    labels = torch.tensor([[0, -100, 2, 3], [4, 5, -100, 7], [8, 9, 10, -100]])
    check(s, t, labels=labels, beta=2.0, gamma=1.0, temperature=2.0)
    gs, gt = torch.autograd.grad(fastkd.dist(s, t, labels=labels), (s, t))
    assert (gs[labels == -100] == 0).all() and (gt[labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check(leaf(logits((16, 200), dtype)), leaf(logits((16, 200), dtype, seed=1)), loss_tol=1e-5, grad_tol=1e-2)


def test_single_row_and_bad_input():
    """One counted row: the official code's intra-class correlations are 0 / eps = 0 (documented)."""
    s, t = leaf(logits((1, 10))), leaf(logits((1, 10), seed=1))
    check(s, t)
    with pytest.raises(ValueError, match="V >= 2"):
        fastkd.dist(s[:, :1], t[:, :1])
    with pytest.raises(ValueError, match="eps"):
        fastkd.dist(s, t, eps=-1.0)
    with pytest.raises(ValueError, match="labels"):
        fastkd.dist(s, t, labels=torch.zeros(2, dtype=torch.long))


def test_gradcheck_fp64():
    s, t = leaf(logits((5, 7), torch.float64)), leaf(logits((5, 7), torch.float64, seed=1))
    f = functools.partial(fastkd.dist, beta=1.5, gamma=0.5, temperature=1.7, labels=torch.tensor([0, 1, -100, 3, 4]))
    assert torch.autograd.gradcheck(f, (s, t))


def test_deterministic():
    s, t = leaf(logits((40, 333))), leaf(logits((40, 333), seed=1))
    runs = [(fastkd.dist(s, t), *torch.autograd.grad(fastkd.dist(s, t), (s, t))) for _ in range(10)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.interpreter
def test_bytes_allocations_and_syncs():
    """Forward + backward streams the [N, V] logits 9 times (row stats 2, column stats 2, row dot 2,
    gradient 2 + 1 write); the O(N + V) statistics and coefficients come on top (L2-resident on a GPU)."""
    N, V = 64, 1024
    s, t = logits((N, V), torch.bfloat16).requires_grad_(), logits((N, V), torch.bfloat16, seed=1)
    with count_bytes(stream_numel=N * V) as traffic:
        fastkd.dist(s, t, temperature=2.0).backward()
    elems = N * V * 2
    streams = sum(traffic.by_arg[a].read + traffic.by_arg[a].written for a in ("s_ptr", "t_ptr", "x_ptr", "o_ptr",
                                                                                 "grad_ptr"))
    assert streams == traffic.streams and streams / elems <= 9.1
    # row and column statistics and coefficients: 0.82 element sizes here (N = 64: two row tiles each
    # re-read the [V, 4] column coefficients in the two backward passes), from L2 on a GPU
    assert (traffic.read + traffic.written - streams) / elems <= 0.9
    with OpLog() as log:
        torch.autograd.grad(fastkd.dist(s, t, labels=torch.arange(N) % 7 - 1, ignore_index=-1), s)
    big = log.allocations(N * V)
    assert len(big) == 1 and big[0][0].startswith("aten.empty"), big
    assert log.host_syncs() == []


def test_compile_and_opcheck():
    s, t = logits((2, 3, 12), torch.float64), logits((2, 3, 12), torch.float64, seed=1)
    labels = torch.tensor([[1, -100, 3], [0, 11, 5]])
    w = torch.eye(12, dtype=torch.float64).requires_grad_()
    f = lambda w: fastkd.dist(s @ w, t, 1.0, 2.0, 4.0, labels=labels)  # noqa: E731
    torch._dynamo.reset()
    eager = torch.autograd.grad(f(w), w)[0]
    compiled_loss = torch.compile(f, backend="aot_eager", fullgraph=True)(w)
    assert rel_err(compiled_loss, f(w)) <= 1e-12
    assert rel_err(torch.autograd.grad(compiled_loss, w)[0], eager) <= 1e-12
    out = fastkd.ops.dist(s, t, labels, 1.0, 2.0, 1.5, 1e-8, -100)
    torch.library.opcheck(fastkd.ops.dist, (s.clone().requires_grad_(), t, labels, 1.0, 2.0, 1.5, 1e-8, -100))
    torch.library.opcheck(fastkd.ops.dist_backward, (torch.tensor(0.7, dtype=torch.float64), s, t, labels, *out[1:],
                                                     1.0, 2.0, 1.5, 1e-8, -100, True, True))


@pytest.mark.interpreter
@pytest.mark.parametrize("sizes", [(3, 6), (2, 5, 4)])
def test_global_batch_over_gloo(sizes, tmp_path):
    """Every rank returns the loss of the concatenated batch, and its rows get world_size x the gradient
    of that single-process loss (DDP then averages to exactly the single-process step)."""
    import socket

    import torch.multiprocessing as mp

    import dist_worker

    V = 37
    with socket.socket() as sock:  # a free port on the loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(dist_worker.run, args=(sizes, V, port, str(tmp_path)), nprocs=len(sizes),
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 240  # bounded: a hung rank fails the test instead of CI
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 240 s")
    s, t, labels = dist_worker.batch(sizes, V)
    s, t = leaf(s), leaf(t)
    loss = fastkd.dist(s, t, 1.0, 2.0, 2.0, labels=labels)
    gs, gt = torch.autograd.grad(loss, (s, t))
    world = len(sizes)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        assert rel_err(got["loss"], loss) <= 1e-12
        assert rel_err(got["gs"], world * gs[lo:hi]) <= 1e-10
        assert rel_err(got["gt"], world * gt[lo:hi]) <= 1e-10


def test_masked_teacher_vocabulary_large_logits_and_scaled_grad_output():
    t = logits((8, 40), seed=1)
    t[:, ::5] = float("-inf")  # p_t = 0 there: q_t = -1, finite
    check(leaf(logits((8, 40))), leaf(t, False), temperature=2.0)
    # logits of magnitude 1e4: one-hot rows; the loss holds 1e-5 (the gradients are ~1e-9 and fp32 noise)
    big_s, big_t = logits((8, 40), scale=1e4), logits((8, 40), scale=1e4, seed=1)
    assert rel_err(fastkd.dist(big_s, big_t), reference.dist(big_s.double(), big_t.double())) <= 1e-5
    s, t = leaf(logits((6, 30))), leaf(logits((6, 30), seed=1), False)
    (gs,) = torch.autograd.grad(fastkd.dist(s, t), s, torch.tensor(-2.5))
    s64 = leaf(s.double())
    (ref,) = torch.autograd.grad(reference.dist(s64, t.double()), s64, torch.tensor(-2.5, dtype=torch.float64))
    assert rel_err(gs, ref) <= 1e-5


def test_identical_inputs_and_all_rows_ignored():
    x = logits((6, 30))
    loss = fastkd.dist(x, x.clone())  # rho = 1 but for eps: 1 - rho ~ 1e-5 per column, fp32 keeps 2-3 digits
    assert loss >= 0 and rel_err(loss, reference.dist(x.double(), x.double())) <= 1e-2
    s, t = leaf(logits((3, 10))), leaf(logits((3, 10), seed=1))
    labels = torch.full((3,), -100)
    loss = fastkd.dist(s, t, 1.0, 2.0, 1.0, labels=labels)  # no row counts: both mean correlations are 0
    gs, gt = torch.autograd.grad(loss, (s, t))
    assert float(loss) == 3.0 and (gs == 0).all() and (gt == 0).all()
