"""`python -m fastkd.bench` (also `fastkd-bench`): validate the fused kernels, count their bytes, time them.

On a machine without a GPU (the default a new user meets first) it runs every fused kernel under
the Triton interpreter on small shapes, checks it against the fp64 eager reference, and reports the
bytes each moves per logit element (counted) beside what the eager reference moves (counted with a
dispatch mode).  Timings need a GPU: with one, it times fastkd, the eager reference, torch.compile of
it and Liger-Kernel (where importable) in forward, backward and forward + backward, and reports
GB/s, % of a device-to-device copy, peak memory and the error against fp64.  Tables go to stdout;
CSV, JSON and PNG plots to --out.
"""
import argparse
import csv
import json
import os
import sys
import time
import warnings

import torch

from .linear import NAME as LINEAR
from .losses import LOSSES

GPU_VOCABS = (32000, 128256, 262144)
VISION = {"rows": 256, "vocabs": (100, 1000), "losses": ("dkd", "dist")}


def _progress(items):
    """tqdm's bar where installed, else a count on stderr."""
    items = list(items)
    try:
        from tqdm import tqdm

        return tqdm(items, file=sys.stderr, leave=False)
    except ImportError:
        return _counting(items)


def _counting(items):
    for i, item in enumerate(items, 1):
        print(f"  [{i}/{len(items)}] {item}", file=sys.stderr, flush=True)
        yield item


def _print_table(rows):
    keys = list(rows[0])
    cells = [[f"{r.get(k, ''):.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def _environment():
    import triton

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"}


def _write(rows, out, stem):
    os.makedirs(out, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"environment": _environment(), "rows": rows}, f, indent=1)
    return [os.path.join(out, f"{stem}.{ext}") for ext in ("csv", "json")]


def gpu_shapes(rows, vocabs, losses, quick):
    shapes = [(name, rows, V) for name in losses for V in vocabs]
    shapes += [(name, VISION["rows"], V) for name in VISION["losses"] if name in losses
               for V in (VISION["vocabs"][-1:] if quick else VISION["vocabs"])]
    return shapes


def parse(argv):
    parser = argparse.ArgumentParser(prog="fastkd-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the CSV, JSON and PNG results")
    parser.add_argument("--quick", action="store_true",
                        help="a short GPU run: 4096 rows, V in {32000, 128256}, 10 reps, torch.compile for kl only")
    parser.add_argument("--rows", type=int, help="rows (tokens) on a GPU (default 8192; --quick 4096)")
    parser.add_argument("--vocab", type=int, nargs="+", help=f"vocabulary sizes on a GPU (default {GPU_VOCABS})")
    names = [*LOSSES, LINEAR]
    parser.add_argument("--loss", nargs="+", choices=names, default=names,
                        help=f"losses to run ({LINEAR}: hidden states + output weights, chunked)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--reps", type=int, help="timed calls per measurement, median (default 30; --quick 10)")
    parser.add_argument("--cpu", action="store_true", help="validate under the interpreter even if a GPU is present")
    args = parser.parse_args(argv)
    for name in ("rows", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.vocab and min(args.vocab) < 2:
        parser.error("--vocab sizes must be at least 2")
    args.rows = args.rows or (4096 if args.quick else 8192)
    args.reps = args.reps or (10 if args.quick else 30)
    args.vocab = args.vocab or list(GPU_VOCABS[:2] if args.quick else GPU_VOCABS)
    return parser, args


def run_cpu(args):
    from .plots import bytes_plot, try_plot
    from .validate import validate, within_tolerance

    print("No GPU in use: timings need a GPU.  Checking every fused kernel under the Triton interpreter")
    print("against the fp64 eager reference, and counting the bytes each moves per logit element")
    print("(forward + backward, student gradient, 8 x 4096: 'stream' counts the [N, V] logits and gradient")
    print("only, 'fused' adds the per-row and per-column statistics; 'model' is DESIGN.md's floor for the")
    print("streams, 'eager' the reference's ops).  linear_jsd, the fused-linear path (hidden states and output")
    print("weights, chunked), is matmul-bound: errors only.\n")
    start = time.time()
    rows = validate([n for n in args.loss if n in LOSSES], _progress)
    if LINEAR in args.loss:
        from .linear import validate_linear

        rows.append(validate_linear())
    _print_table(rows)
    print(f"\n{len(rows)} checks in {time.time() - start:.0f} s.")
    if args.out:
        print("wrote", ", ".join(_write(rows, args.out, "validation")))
        print(try_plot(bytes_plot, rows, args.out, "bytes.png"))
    failed = [f"{r['loss']}/{r['dtype']}" for r in rows if not within_tolerance(r)]
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


def run_gpu(args):
    from .plots import timing_plot, try_plot
    from .timing import time_all

    dtype = getattr(torch, args.dtype)
    env = _environment()
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}: {args.dtype}, median of {args.reps};")
    print("gbps and pct_of_copy use DESIGN.md's bytes for each mode; peak_mb is above the inputs; max_rel_err")
    print("is against fp64 on 32 rows.  Liger takes log-probs: its peer is torch's log_softmax + Liger's op.")
    print(f"{LINEAR}: hidden size 4096, beta 0.5, T 1, against F.linear + fastkd.jsd ('unchunked') and Liger's")
    print("LigerFusedLinearJSD; forward+backward time and peak memory (no bandwidth: matmul-bound).\n")
    shapes = gpu_shapes(args.rows, args.vocab, [n for n in args.loss if n in LOSSES], args.quick)
    rows = time_all(shapes, dtype, args.reps, {"kl"} if args.quick else set(LOSSES), _progress)
    if LINEAR in args.loss:
        from .linear import time_linear

        rows += time_linear(args.rows, args.vocab, dtype, args.reps, _progress)
    _print_table(rows)
    if args.out:
        print("wrote", ", ".join(_write(rows, args.out, "timings")))
        print(try_plot(timing_plot, rows, args.out, "timings.png"))
    return 0


def main(argv=None):
    parser, args = parse(argv)
    if args.cpu or not torch.cuda.is_available():
        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            parser.error("triton was imported before TRITON_INTERPRET could be set; run as `python -m fastkd.bench`")
        os.environ["TRITON_INTERPRET"] = "1"
        # the interpreter evaluates masked-off lanes too (-inf - -inf, log 0); the kernels mask them
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        return run_cpu(args)
    return run_gpu(args)
