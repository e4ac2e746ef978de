"""On a GPU: fastkd and its peers on the same inputs, timed with CUDA events.

Peers: the eager reference (the seed's code, `fastkd.reference`), `torch.compile` of it, and
Liger-Kernel where it is importable (its KL and JSD take log-probabilities, so the peer is torch's
log_softmax followed by Liger's op).  Each measurement is the median of `reps` calls after a warm-up,
cycling through input buffers so that small problems do not run from L2.  Bandwidth is the
performance model's bytes (DESIGN.md section 4) over the time, and its share of a device-to-device
copy measured in the same run.  Errors are measured on the first rows against the fp64 reference.
"""
import functools

import torch

from .losses import LOSSES, TEMPERATURE, call, inputs, model_bytes, rel_err, to_fp64, weight_of

MODES = ("forward", "backward", "forward+backward")
ERROR_ROWS = 32
DEVICE = "cuda"  # the timed device (the tests run this code on the CPU with a stand-in clock)
L2_SAFE_BYTES = 256 * 2**20  # inputs above this size are not L2-resident anyway: one buffer suffices


def liger_peer(name):
    """log_softmax + Liger-Kernel's KL / JSD for the losses it has, else None."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    T = TEMPERATURE
    if name in ("kl", "reverse_kl"):
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def run(s, t):
            log_s, log_t = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
            return T * T * (kl(log_s, log_t) if name == "kl" else kl(log_t, log_s))
        return run
    if name == "jsd":
        jsd = LigerJSD(beta=LOSSES["jsd"][1]["beta"])
        return lambda s, t: T * T * jsd(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1))
    return None


def implementations(name, compiled):
    import fastkd
    from fastkd import reference

    impls = {"fastkd": functools.partial(call, name, fastkd), "eager": functools.partial(call, name, reference)}
    if compiled:
        impls["compile"] = torch.compile(functools.partial(call, name, reference), dynamic=False)
    liger = liger_peer(name)
    if liger is not None:
        impls["liger"] = liger
    return impls


def median_ms(fn, buffers, reps):
    """Median time of fn(*buffer) over reps calls cycling through the buffers, after a warm-up."""
    for i in range(3):
        fn(*buffers[i % len(buffers)])
    torch.cuda.synchronize()
    events = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*buffers[i % len(buffers)])
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in events)[reps // 2]


def copy_gbps(nbytes, reps):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), [()], reps)
    return 2 * nbytes / ms / 1e6


def _step(fn, mode):
    """A callable(s, t) for one mode: forward under no_grad, backward of a prepared graph, or both."""
    def forward(s, t):
        with torch.no_grad():
            return fn(s, t)

    def forward_backward(s, t):
        out = fn(s, t)
        return torch.autograd.grad((out * weight_of(out, s.dtype)).sum(), s)

    return {"forward": forward, "forward+backward": forward_backward}[mode]


def measure(name, impl, fn, buffers, mode, reps, nbytes, copy):
    """One row of the timing table (or its error: out of memory)."""
    row = {"loss": name, "impl": impl, "mode": mode}
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if mode == "backward":  # graphs built outside the timing, each backward keeps its graph
            graphs = []
            for s, t in buffers:
                out = fn(s, t)
                graphs.append(((out * weight_of(out, s.dtype)).sum(), s))
            ms = median_ms(lambda loss, s: torch.autograd.grad(loss, s, retain_graph=True), graphs, reps)
        else:
            ms = median_ms(_step(fn, mode), buffers, reps)
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        row.update(ms=float("nan"), gbps=float("nan"), pct_of_copy=float("nan"), peak_mb=float("nan"), error="oom")
        return row
    gbps = model_bytes(name, mode) * nbytes / ms / 1e6
    row.update(ms=ms, gbps=gbps, pct_of_copy=100 * gbps / copy)
    return row


def max_error(name, fn, dtype):
    """Norm-wise relative error of the loss and student gradient on ERROR_ROWS rows against fp64."""
    from fastkd import reference

    s, t = inputs(ERROR_ROWS, 4096, dtype, DEVICE, seed=7, name=name)
    out = fn(s, t)
    (grad,) = torch.autograd.grad((out * weight_of(out, s.dtype)).sum(), s)
    s64 = s.detach().double().requires_grad_()
    ref = call(name, reference, s64, to_fp64(t))
    (ref_grad,) = torch.autograd.grad((ref * weight_of(ref, s.dtype)).sum(), s64)
    return max(rel_err(out.detach(), ref), rel_err(grad, ref_grad))


def time_all(shapes, dtype, reps, compile_losses, progress):
    """shapes: [(loss, rows, V)]; returns (rows of the table, copy GB/s)."""
    results, copy = [], None
    for name, rows, V in progress(shapes):
        nbytes = rows * V * torch.finfo(dtype).bits // 8
        copy = copy_gbps(max(2 * nbytes, 2**28), reps)
        count = 3 if 2 * nbytes < L2_SAFE_BYTES else 1
        buffers = [inputs(rows, V, dtype, DEVICE, seed, name) for seed in range(count)]
        for impl, fn in implementations(name, name in compile_losses).items():
            err = max_error(name, fn, dtype)
            for mode in MODES:
                row = measure(name, impl, fn, buffers, mode, reps, nbytes, copy)
                results.append({"loss": name, "rows": rows, "V": V, "dtype": str(dtype).replace("torch.", ""),
                                "copy_gbps": copy, **row, "max_rel_err": err})
        del buffers
        torch.cuda.empty_cache()
    return results
