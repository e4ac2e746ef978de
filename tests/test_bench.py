"""The bench CLI's CPU side: argument handling, the validation run with its files and plot, the timing
plot's code path, and the GPU check script's dry run."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastkd import bench
from fastkd.bench import timing
from fastkd.bench.linear import time_linear
from fastkd.bench.plots import timing_plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arguments():
    _, args = bench.parse([])
    assert (args.rows, args.reps, args.vocab) == (8192, 30, [32000, 128256, 262144])
    _, quick = bench.parse(["--quick"])
    assert (quick.rows, quick.reps, quick.vocab) == (4096, 10, [32000, 128256])
    shapes = bench.gpu_shapes(quick.rows, quick.vocab, ["kl", "dkd"], quick=True)
    assert ("kl", 4096, 32000) in shapes and ("dkd", 256, 1000) in shapes and ("dkd", 256, 100) not in shapes
    assert ("dkd", 256, 100) in bench.gpu_shapes(8192, [32000], ["dkd"], quick=False)
    for bad in (["--rows", "0"], ["--vocab", "1"], ["--loss", "nope"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)


@pytest.mark.interpreter
def test_cpu_validation_writes_tables_and_plot(tmp_path, capsys):
    assert bench.main(["--cpu", "--loss", "kl", "dkd", "linear_jsd", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "timings need a GPU" in printed and "kl" in printed
    rows = json.loads((tmp_path / "validation.json").read_text())["rows"]
    assert [r["loss"] for r in rows] == ["kl", "kl", "dkd", "dkd", "linear_jsd"]
    assert all(r["fused_stream_bytes_per_elem"] <= 5.1 and r["eager_bytes_per_elem"] > 30 for r in rows[:4])
    assert rows[4]["rel_err_out"] <= 1e-5 and rows[4]["rel_err_grad"] <= 1e-5
    assert (tmp_path / "validation.csv").read_text().startswith("loss,dtype,")
    png = (tmp_path / "bytes.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_timing_plot_code_path(tmp_path):
    """The plot a GPU run draws, fed made-up rows (not results: this only exercises the code)."""
    rows = [{"loss": loss, "impl": impl, "mode": "forward+backward", "V": V, "ms": V / 1e4 * k, "pct_of_copy": 80 / k}
            for loss in ("kl", "jsd") for k, impl in ((1, "fastkd"), (3, "eager")) for V in (32000, 128256)]
    timing_plot(rows, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")


def test_gpu_check_dry_run():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    done = subprocess.run(["bash", script, "--dry-run"], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "FASTKD_TEST_DEVICE=cuda" in done.stdout and "fastkd.bench --quick" in done.stdout
    bad = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


class _Clock:
    """A stand-in for torch.cuda.Event: wall-clock milliseconds."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """The GPU timing code on the CPU: CPU tensors, a wall clock for CUDA events, no-op CUDA memory calls."""
    monkeypatch.setattr(timing, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: _Clock())
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)


@pytest.mark.interpreter
def test_gpu_timing_code_path(cpu_as_gpu, tmp_path):
    """Every row the GPU run writes, fastkd and eager in the three modes and the fused-linear JSD, on tiny CPU
    shapes (the times mean nothing; the errors are real), then its plot."""
    rows = timing.time_all([("kl", 4, 64), ("sparse_kl", 4, 100)], torch.float32, 2, set(), list)
    assert {(r["loss"], r["impl"], r["mode"]) for r in rows} == {
        (loss, impl, mode) for loss in ("kl", "sparse_kl") for impl in ("fastkd", "eager") for mode in timing.MODES}
    assert all(r["ms"] > 0 and r["max_rel_err"] <= 1e-5 and r["peak_mb"] == 0 for r in rows)
    linear = time_linear(8, [50], torch.float32, 2, list, hidden=16)
    assert [r["impl"] for r in linear] == ["fastkd", "unchunked"]
    assert all(r["ms"] > 0 and r["max_rel_err"] <= 1e-5 for r in linear)
    timing_plot(rows + linear, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
