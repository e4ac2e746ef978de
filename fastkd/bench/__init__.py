"""`python -m fastkd.bench` (also `fastkd-bench`): validate the fused kernels, count their bytes, time them.

On a machine without a GPU (the default a new user meets first) it runs every fused kernel under
the Triton interpreter on small shapes, checks it against the fp64 eager reference, and reports
the bytes each moves per logit element (counted) beside what the eager reference moves (counted
with a dispatch mode).  Timings need a GPU: with one, it times fastkd and the eager reference on
the same inputs (CUDA events, median, rotating input buffers) and reports GB/s against a
device-to-device copy measured in the same run.  Results go to stdout and, with --out, to CSV/JSON.
"""
import argparse
import csv
import json
import os
import sys
import time

import torch

# name: (fused call, eager call, model bytes per logit element for forward + backward)
LOSSES = {
    "softmax": ("softmax", {}, 5.0),
    "log_softmax": ("log_softmax", {}, 5.0),
    "kl": ("kl_div", {}, 5.0),
    "reverse_kl": ("kl_div", {"reverse": True}, 5.0),
    "jsd": ("jsd", {"beta": 0.5}, 7.0),
    "dkd": ("dkd", {"alpha": 1.0, "beta": 8.0}, 5.0),
    "dist": ("dist", {"beta": 1.0, "gamma": 1.0}, 9.0),
}
# Largest norm-wise relative errors accepted against fp64 (output or loss, gradient).  A bf16 softmax
# gradient comes from the bf16 output, as torch's does: torch's own bf16 softmax is ~3% off here too.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}
SOFTMAX_BF16_TOLERANCE = (1e-2, 5e-2)
CPU_SHAPES = [(3, 2), (5, 37), (4, 4096), (2, 9000)]  # rows, V: tiny (DKD needs 2), odd, one block, several blocks
GPU_VOCABS = (32000, 128256, 262144)


def _call(name, module, x, y, temperature=2.0):
    fn_name, kwargs, _ = LOSSES[name]
    fn = getattr(module, fn_name)
    if "softmax" in name:
        return fn(x, temperature)
    if name == "dkd":  # a fixed target per row
        target = torch.arange(x.shape[0], device=x.device) * 7919 % x.shape[-1]
        return fn(x, y, target, temperature=temperature, **kwargs)
    return fn(x, y, temperature=temperature, **kwargs)


def _inputs(rows, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(rows, V, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    t = (2 * torch.randn(rows, V, generator=g)).to(device=device, dtype=dtype)
    return s, t


def _forward_backward(name, module, s, t):
    out = _call(name, module, s, t)
    # the same weights for every dtype: rounded to the input's dtype first
    weight = torch.linspace(0.5, 1.5, out.numel(), device=out.device).to(s.dtype).to(out.dtype).view(out.shape)
    (grad,) = torch.autograd.grad((out * weight).sum(), s)
    return out.detach(), grad


def _rel_err(a, b):
    """Norm-wise relative error, as the tests measure it."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-9))


def validate_on_cpu():
    """Interpreter run: errors against the fp64 reference and bytes per logit element."""
    import fastkd
    from fastkd import reference
    from fastkd.interpreter import round_bf16
    from fastkd.traffic import EagerBytes, count_bytes

    round_bf16()
    rows = []
    for name in LOSSES:
        for dtype in (torch.float32, torch.bfloat16):
            worst_out = worst_grad = 0.0
            for n, V in CPU_SHAPES:
                s, t = _inputs(n, V, dtype, "cpu")
                out, grad = _forward_backward(name, fastkd, s, t)
                s64 = s.detach().double().requires_grad_()
                ref_out, ref_grad = _forward_backward(name, reference, s64, t.double())
                if dtype == torch.bfloat16 and "softmax" in name:
                    ref_out = ref_out.to(dtype)  # the output itself is rounded to bf16
                worst_out = max(worst_out, _rel_err(out, ref_out))
                worst_grad = max(worst_grad, _rel_err(grad, ref_grad))
            s, t = _inputs(8, 4096, dtype, "cpu")
            elems = s.numel() * s.element_size()
            with count_bytes(stream_numel=s.numel()) as traffic:
                _forward_backward(name, fastkd, s, t)
            with EagerBytes() as eager:
                _forward_backward(name, reference, s, t)
            rows.append({
                "loss": name, "dtype": str(dtype).replace("torch.", ""),
                "rel_err_out": worst_out, "rel_err_grad": worst_grad,
                "fused_bytes_per_elem": (traffic.read + traffic.written) / elems,
                "fused_stream_bytes_per_elem": traffic.streams / elems,
                "model_bytes_per_elem": LOSSES[name][2], "eager_bytes_per_elem": eager.total / elems,
            })
    return rows


def _within_tolerance(row):
    dtype = getattr(torch, row["dtype"])
    out_tol, grad_tol = SOFTMAX_BF16_TOLERANCE if "softmax" in row["loss"] and dtype == torch.bfloat16 \
        else TOLERANCE[dtype]
    return row["rel_err_out"] <= out_tol and row["rel_err_grad"] <= grad_tol


def _median_ms(fn, inputs, reps):
    """Median time of fn over reps calls, cycling through `inputs` so that no call finds its data in L2."""
    for i in range(3):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in times)[reps // 2]


def time_on_gpu(rows, vocabs, dtype, reps):
    """Forward + backward time of fastkd and of the eager reference; GB/s against a copy's."""
    import fastkd
    from fastkd import reference

    results = []
    for V in vocabs:
        buffers = [_inputs(rows, V, dtype, "cuda", seed) for seed in range(3)]
        elems = rows * V * torch.finfo(dtype).bits // 8
        src = torch.empty(rows * V * 2, dtype=dtype, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = _median_ms(lambda a, b: b.copy_(a), [(src, dst)], reps)
        copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
        del src, dst
        for name in LOSSES:
            row = {"loss": name, "rows": rows, "V": V, "dtype": str(dtype).replace("torch.", "")}
            for impl, module in (("fastkd", fastkd), ("eager", reference)):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = _median_ms(lambda s, t: _forward_backward(name, module, s, t), buffers, reps)
                row[f"{impl}_ms"] = ms
                row[f"{impl}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["fastkd_gbps"] = LOSSES[name][2] * elems / row["fastkd_ms"] / 1e6
            row["fastkd_pct_of_copy"] = 100 * row["fastkd_gbps"] / copy_gbps
            row["speedup_vs_eager"] = row["eager_ms"] / row["fastkd_ms"]
            results.append(row)
        del buffers
    return results


def _print_table(rows):
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def _write(rows, out, stem):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"}
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastkd-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the CSV and JSON results")
    parser.add_argument("--rows", type=int, default=8192, help="rows (tokens) on a GPU (default 8192)")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(GPU_VOCABS), help="vocabulary sizes on a GPU")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement (median)")
    parser.add_argument("--cpu", action="store_true", help="validate under the interpreter even if a GPU is present")
    args = parser.parse_args(argv)

    if args.cpu or not torch.cuda.is_available():
        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            parser.error("triton was imported before TRITON_INTERPRET could be set; run as `python -m fastkd.bench`")
        os.environ["TRITON_INTERPRET"] = "1"
        print("No GPU in use: timings need a GPU.  Checking every fused kernel under the Triton interpreter")
        print("against the fp64 eager reference, and counting the bytes each moves per logit element")
        print("(forward + backward, student gradient, 8 x 4096: 'stream' counts the [N, V] logits and gradient")
        print("only, 'fused' adds the per-row and per-column statistics; 'model' is DESIGN.md's floor for the")
        print("streams, 'eager' the reference's ops).\n")
        start = time.time()
        rows = validate_on_cpu()
        _print_table(rows)
        print(f"\n{len(rows)} checks in {time.time() - start:.0f} s.")
        failed = [r for r in rows if not _within_tolerance(r)]
        stem = "validation"
    else:
        dtype = getattr(torch, args.dtype)
        print(f"{torch.cuda.get_device_name()}: forward + backward, {args.rows} rows, {args.dtype}, "
              f"median of {args.reps}\n")
        rows = time_on_gpu(args.rows, args.vocab, dtype, args.reps)
        _print_table(rows)
        failed = []
        stem = "timings"
    if args.out:
        _write(rows, args.out, stem)
        print(f"wrote {os.path.join(args.out, stem)}.csv and .json")
    if failed:
        print(f"FAILED: {[r['loss'] + '/' + r['dtype'] for r in failed]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
