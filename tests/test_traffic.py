"""The performance model, checked without a GPU: bytes moved per logit element (counted under the
interpreter), no [N, V] allocation besides the returned gradients, no host sync in a loss call."""
import pytest
import torch

import fastkd
from fastkd.traffic import OpLog, count_bytes

pytestmark = pytest.mark.interpreter

N, V = 4, 4096  # bf16: one 4096-column block per row
E = 2  # bytes per bf16 element

LOSSES = {
    # name: (call, forward bound, forward + backward bound) in element sizes per logit element
    "kl": (lambda s, t: fastkd.kl_div(s, t, 2.0), 2.05, 5.1),
    "reverse_kl": (lambda s, t: fastkd.kl_div(s, t, 2.0, reverse=True), 2.05, 5.1),
    "jsd": (lambda s, t: fastkd.jsd(s, t, 0.5, 2.0), 4.05, 7.1),
}


def pair(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g).bfloat16().requires_grad_(requires_grad)
    t = torch.randn(N, V, generator=g).bfloat16()
    return s, t


@pytest.mark.parametrize("name", LOSSES)
def test_bytes_per_logit_element(name):
    call, fwd_bound, total_bound = LOSSES[name]
    s, t = pair()
    with count_bytes() as fwd:
        loss = call(s, t)
    with count_bytes() as bwd:
        loss.backward()
    per_elem = N * V * E
    fwd_elems = (fwd.read + fwd.written) / per_elem
    total_elems = fwd_elems + (bwd.read + bwd.written) / per_elem
    assert 2.0 <= fwd_elems <= fwd_bound, fwd_elems
    assert 3.0 <= total_elems - fwd_elems and total_elems <= total_bound, total_elems
    # the gradient is written exactly once
    assert bwd.written == pytest.approx(per_elem, rel=0.01)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_bytes(log):
    """A row that fits in one block is read once and written once; backward reads y and dy, writes dx."""
    x = torch.randn(N, V).bfloat16().requires_grad_()
    fn = fastkd.log_softmax if log else fastkd.softmax
    with count_bytes() as fwd:
        y = fn(x, 2.0)
    with count_bytes() as bwd:
        y.backward(torch.ones_like(y))
    assert (fwd.read, fwd.written) == (N * V * E, N * V * E)
    assert (bwd.read, bwd.written) == (2 * N * V * E, N * V * E)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_no_full_size_temporaries_and_no_host_sync(name, teacher_grad):
    call = LOSSES[name][0]
    s, t = pair()
    t.requires_grad_(teacher_grad)
    inputs = (s, t) if teacher_grad else (s,)
    with OpLog() as log:
        torch.autograd.grad(call(s, t), inputs)
        torch.autograd.grad(fastkd.kl_div(s, t, labels=torch.tensor([3, -100, 7, 1]), reduction="sum"), inputs)
    big = log.allocations(N * V)
    assert len(big) == 2 * len(inputs) and all(op.startswith("aten.empty") for op, _ in big), big
    assert log.host_syncs() == []


def test_oplog_sees_syncs_and_allocations():
    """The checks above can fail: an eager KL allocates [N, V] temporaries and .item() syncs."""
    s, t = pair()
    with OpLog() as log:
        fastkd.reference.kl_div(s, t).item()
    assert len(log.allocations(N * V)) >= 4
    assert log.host_syncs()
