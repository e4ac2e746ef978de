"""Test set-up: the real Triton kernels run on CPU tensors under the Triton interpreter.

FASTKD_TEST_DEVICE=cuda runs the same tests on a GPU with compiled kernels (benchmarks/gpu_check.sh).
TRITON_INTERPRET must be set before triton is imported, hence here, before anything else.
"""
import os
import sys

DEVICE = os.environ.get("FASTKD_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# torch.compile's on-disk caches do not key on a custom op's fake implementation: always compile afresh
os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

if DEVICE == "cpu":
    from fastkd.interpreter import round_bf16

    round_bf16()  # round to bf16 as the GPU does, not by truncation
else:
    torch.set_default_device(DEVICE)  # tensors the tests make land on the GPU; kernels compile for real


def pytest_collection_modifyitems(config, items):
    """`interpreter` tests count the interpreter's loads and stores or need CPU tensors: CPU only;
    `cuda` tests need a GPU (huge tensors, CUDA graphs): GPU only."""
    for item in items:
        if DEVICE != "cpu" and "interpreter" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs the Triton interpreter (CPU tensors)"))
        if DEVICE == "cpu" and "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a GPU: run benchmarks/gpu_check.sh there"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float tensor from torch.empty starts as NaN, so an element a kernel fails to write shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
