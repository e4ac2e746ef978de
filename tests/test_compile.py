"""torch.library registration: torch.compile(fullgraph=True) through the ops, and opcheck."""
import pytest
import torch

import fastkd
from fastkd import ops
from helpers import randn, rel_err


def inputs(V=40, dtype=torch.float32):
    s = randn((2, 3, V), seed=0, dtype=dtype)
    t = randn((2, 3, V), seed=1, dtype=dtype)
    labels = torch.tensor([[1, -100, 3], [0, 2, -100]])
    return s, t, labels


def kd_loss(weight, s, t, labels):
    """A student head, then KD losses through every fused op."""
    student = s @ weight
    return (fastkd.kl_div(student, t, 2.0, labels=labels) + fastkd.jsd(student, t, 0.3, labels=labels)
            + fastkd.kl_div(student, t, reverse=True, reduction="sum")
            + fastkd.log_softmax(student, 2.0).mean() + fastkd.softmax(student).square().sum())


def training_step(loss_fn, weight, s, t, labels):
    loss = loss_fn(weight, s, t, labels)
    loss.backward()  # AOTAutograd compiled the backward graph with the forward
    grad, weight.grad = weight.grad, None
    return loss.detach(), grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    s, t, labels = inputs()
    weight = torch.eye(40).add_(0.01 * randn((40, 40), seed=2, dtype=torch.float32))
    weight.requires_grad_()
    eager = training_step(kd_loss, weight, s, t, labels)
    compiled = training_step(torch.compile(kd_loss, backend=backend, fullgraph=True), weight, s, t, labels)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-6


def _opcheck_cases():
    """(op, args): the forward ops with inputs that require grad, the backward ops (first order only) without."""
    s, t, labels = inputs(V=9, dtype=torch.float64)
    _, stats = ops.kl_div_rows(s, t, 1.5, labels, -100)
    _, jstats = ops.jsd_rows(s, t, 0.3, 1.5, None, -100)
    g = torch.rand(6, dtype=torch.float64)
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    return [
        (ops.softmax, (sg, 1.5, False)),
        (ops.softmax, (sg, 0.5, True)),
        (ops.softmax_backward, (s.softmax(-1), t, 1.5, False)),
        (ops.kl_div_rows, (sg, tg, 1.5, labels, -100)),
        (ops.kl_div_rows, (sg, t, 2.0, None, -100)),
        (ops.kl_div_rows_backward, (g, s, t, stats, 1.5, labels, -100, True, False)),
        (ops.jsd_rows, (sg, tg, 0.3, 1.5, labels, -100)),
        (ops.jsd_rows_backward, (g, s, t, jstats, 0.3, 1.5, None, -100, True, True)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
