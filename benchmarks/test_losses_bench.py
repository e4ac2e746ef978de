"""Forward + backward of every fastkd loss against the eager reference and torch.compile of it
(pytest-benchmark, GPU only; `python -m fastkd.bench` gives the full table with bandwidth and memory).

    pytest benchmarks --benchmark-only
"""
import pytest
import torch

from fastkd.bench.losses import LOSSES, inputs
from fastkd.bench.timing import implementations

ROWS, VOCABS = 8192, [32000, 128256]


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("impl", ["fastkd", "eager", "compile"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_forward_backward(benchmark, loss, impl, V):
    fn = implementations(loss, compiled=impl == "compile")[impl]
    s, t = inputs(ROWS, V, torch.bfloat16, "cuda", name=loss)

    def step():
        torch.autograd.grad(fn(s, t).sum(), s)
        torch.cuda.synchronize()

    step()  # compile and warm up outside the timing
    benchmark(step)
