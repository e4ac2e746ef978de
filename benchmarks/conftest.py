"""pytest-benchmark suites time compiled kernels: they need a CUDA GPU and skip cleanly without one."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks time compiled Triton kernels: they need a CUDA GPU")
        for item in items:
            item.add_marker(skip)
