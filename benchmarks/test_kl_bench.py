"""Forward + backward of fastkd's KL/JSD against the eager reference (pytest-benchmark, GPU only).

    pytest benchmarks --benchmark-only
"""
import pytest
import torch

import fastkd
from fastkd import reference

ROWS = 8192
VOCABS = [32000, 128256]


def _step(fn, s, t, **kw):
    fn(s, t, **kw).backward()
    s.grad = None
    torch.cuda.synchronize()


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("impl", ["fastkd", "eager"])
@pytest.mark.parametrize("loss", ["kl_div", "jsd"])
def test_forward_backward(benchmark, loss, impl, V):
    s = torch.randn(ROWS, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(ROWS, V, device="cuda", dtype=torch.bfloat16)
    fn = getattr(fastkd if impl == "fastkd" else reference, loss)
    benchmark(_step, fn, s, t, temperature=2.0)
