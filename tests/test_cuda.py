"""GPU-only checks (benchmarks/gpu_check.sh runs them): offsets past 2^31 elements, and a CUDA-graph
capture and replay of a forward + backward (which fails on any host sync)."""
import pytest
import torch

import fastkd
from fastkd import reference
from helpers import logits, rel_err

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("loss", ["kl", "dkd"])
def test_rows_times_vocabulary_past_int32(loss):
    """8200 x 262144 bf16 logits (2.15e9 elements > 2^31): the last rows, beyond int32 offsets, match
    the reference computed on those rows alone."""
    N, V = 8200, 262144
    assert N * V > 2**31
    s = torch.empty(N, V, dtype=torch.bfloat16).normal_().requires_grad_()
    t = torch.empty(N, V, dtype=torch.bfloat16).normal_()
    target = torch.arange(N) * 7919 % V
    call = {"kl": lambda a, b, y: fastkd.kl_div(a, b, 2.0, reduction="none"),
            "dkd": lambda a, b, y: fastkd.dkd(a, b, y, temperature=2.0, reduction="none")}[loss]
    ref = {"kl": lambda a, b, y: reference.kl_div(a, b, 2.0, reduction="none"),
           "dkd": lambda a, b, y: reference.dkd(a, b, y, temperature=2.0, reduction="none")}[loss]
    rows = call(s, t, target)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    tail = slice(N - 3, N)
    s_tail = s[tail].detach().double().requires_grad_()
    ref_rows = ref(s_tail, t[tail].double(), target[tail])
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), s_tail)
    assert rel_err(rows[tail], ref_rows) <= 1e-5
    assert rel_err(grad[tail], ref_grad) <= 1e-2


@pytest.mark.parametrize("loss", ["kl", "jsd", "dkd", "dist"])
def test_cuda_graph_capture_and_replay(loss):
    N, V = 64, 32000
    s = logits((N, V), torch.bfloat16).requires_grad_()
    t = logits((N, V), torch.bfloat16, seed=1)
    y = torch.arange(N) % V
    call = {"kl": lambda: fastkd.kl_div(s, t, 2.0), "jsd": lambda: fastkd.jsd(s, t, 0.3, 2.0),
            "dkd": lambda: fastkd.dkd(s, t, y, temperature=2.0), "dist": lambda: fastkd.dist(s, t)}[loss]

    def step():
        out = call()
        return out, torch.autograd.grad(out, s)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grad = step()
    with torch.no_grad():
        s.copy_(logits((N, V), torch.bfloat16, seed=2))
        t.copy_(logits((N, V), torch.bfloat16, seed=3))
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grad = step()
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)
