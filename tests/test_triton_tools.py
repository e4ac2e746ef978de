"""Self-test of triton_tools on a toy row-copy kernel. Run with TRITON_INTERPRET=1."""
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from fastkd.traffic import count_bytes  # noqa: E402
from triton_tools import compile_report  # noqa: E402

COPY_SIGNATURE = {"src": "*bf16", "dst": "*bf16", "stride": "i32", "n_cols": "i32"}


@triton.jit
def _identity(x):
    return x


@triton.jit
def copy_rows(src, dst, stride, n_cols, BLOCK: tl.constexpr):
    """Copy row ``program_id(0)`` of ``src`` to ``dst``, BLOCK columns at a time."""
    row = tl.program_id(0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(src + row * stride + cols, mask=mask)
        tl.store(dst + row * stride + cols, _identity(x), mask=mask)


@triton.jit
def copy_first(src, dst):
    """Scalar load and store of one element."""
    tl.store(dst, tl.load(src))


interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@interpret
def test_count_bytes_copy():
    src = torch.randn(3, 1000, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    with count_bytes() as traffic:
        copy_rows[(3, )](src, dst, src.stride(0), src.shape[1], BLOCK=256)
    assert torch.equal(src, dst)
    assert traffic.read == traffic.written == 3 * 1000 * 2  # 4 * 256 lanes per row, 24 masked off
    assert traffic.by_kernel["copy_rows"].read == 3 * 1000 * 2


@interpret
def test_count_bytes_scalar_and_restore():
    src = torch.arange(4, dtype=torch.float32)
    dst = torch.zeros(4, dtype=torch.float32)
    with count_bytes() as traffic:
        copy_first[(1, )](src, dst)
    assert (traffic.read, traffic.written) == (4, 4)
    copy_first[(1, )](src, dst)  # runs outside the context are not counted
    assert (traffic.read, traffic.written) == (4, 4)


def test_compile_report_sm90():
    # Row length a multiple of 8 bf16 (16 bytes): both the row starts and the mask are 16-byte granular.
    report = compile_report(copy_rows, COPY_SIGNATURE, {"BLOCK": 256}, arch=90, num_warps=1,
                            divisibility={"stride": 8, "n_cols": 8})
    assert report.registers > 0
    assert report.spill_bytes == 0
    assert report.has_128bit_loads and report.has_128bit_stores


def test_compile_report_sm80_without_hints():
    report = compile_report(copy_rows, COPY_SIGNATURE, {"BLOCK": 256}, arch=80, num_warps=1)
    assert report.registers > 0
    assert not report.has_128bit_loads  # rows may start, and the mask flip, at any element
