"""Every kernel compiles for Hopper (sm_90) and Ampere (sm_80) at V = 131072 without a GPU:
no register spills, and 128-bit global loads for bf16 rows whose length is a multiple of 8 (the kernels
that cannot have them by nature are marked in codegen_report.CASES)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "codegen_report.py")], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def test_every_kernel_compiles_without_spills_with_128bit_loads(report):
    from codegen_report import ARCHS, CASES

    assert sorted(report) == sorted(f"{name}@sm_{arch}" for name in CASES for arch in ARCHS)
    for name, r in report.items():
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} bytes of local memory (spills)"
        assert r["ldg128"] or not r["ldg128_expected"], f"{name}: no 128-bit global loads"
        assert 0 < r["registers"] <= 255, name
