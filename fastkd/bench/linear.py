"""The fused-linear ops: JSD (beta = 0.5, T = 1, where fastkd's, TRL's and Liger's definitions coincide) from the
student's and the teacher's hidden states and output weights, forward + backward.

Implementations: fastkd.linear_jsd (chunked, never a [tokens, V] tensor), the unchunked composition
F.linear + fastkd.jsd, and Liger-Kernel's LigerFusedLinearJSD where importable.  Matmul-bound, so the
table gives time and peak memory above the inputs, not bandwidth.
"""
import math

import torch
import torch.nn.functional as F

from .losses import rel_err

NAME = "linear_jsd"
HIDDEN = 4096
BETA = 0.5


def linear_inputs(rows, V, H, dtype, device, seed=0):
    """Student hidden states and weight (requiring grad), teacher hidden states and weight, drawn on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    return (draw(rows, H).requires_grad_(), draw(V, H, scale=H**-0.5).requires_grad_(), draw(rows, H),
            draw(V, H, scale=H**-0.5))


def liger_peer():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=BETA)
    return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt, None)


def implementations(chunk_size=None):
    import fastkd
    from fastkd.linear import linear_jsd

    impls = {
        "fastkd": lambda hs, ws, ht, wt: linear_jsd(hs, ws, ht, wt, beta=BETA, chunk_size=chunk_size),
        "unchunked": lambda hs, ws, ht, wt: fastkd.jsd(F.linear(hs, ws), F.linear(ht, wt), BETA),
    }
    liger = liger_peer()
    if liger is not None:
        impls["liger"] = liger
    return impls


def step(fn, hs, ws, ht, wt):
    """Loss and the gradients of the student's hidden states and weight."""
    loss = fn(hs, ws, ht, wt)
    return (loss.detach(), *torch.autograd.grad(loss, (hs, ws)))


def errors(fn, dtype, device, rows=64, V=1000, H=64):
    """Norm-wise relative errors against fp64 (the reference jsd): (loss, the larger of the two gradients')."""
    from fastkd import reference

    inputs = linear_inputs(rows, V, H, dtype, device, seed=7)
    got = step(fn, *inputs)
    hs, ws, ht, wt = (x.detach().double().requires_grad_(x.requires_grad) for x in inputs)
    want = step(lambda hs, ws, ht, wt: reference.jsd(F.linear(hs, ws), F.linear(ht, wt), BETA), hs, ws, ht, wt)
    return rel_err(got[0], want[0]), max(rel_err(a, b) for a, b in zip(got[1:], want[1:]))


def time_linear(rows, vocabs, dtype, reps, progress, hidden=HIDDEN):
    """Rows of the timing table for the fused-linear JSD (forward + backward, CUDA events, median of reps)."""
    from . import timing

    results = []
    for V in progress(vocabs):
        inputs = linear_inputs(rows, V, hidden, dtype, timing.DEVICE)
        for impl, fn in implementations().items():
            row = {"loss": NAME, "rows": rows, "V": V, "dtype": str(dtype).replace("torch.", ""), "impl": impl,
                   "mode": "forward+backward", "hidden": hidden, "gbps": math.nan, "pct_of_copy": math.nan}
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                row["ms"] = timing.median_ms(lambda *x: step(fn, *x), [inputs], reps)
                row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            except torch.OutOfMemoryError:
                row.update(ms=math.nan, peak_mb=math.nan, error="oom")
            torch.cuda.empty_cache()
            row["max_rel_err"] = max(errors(fn, dtype, timing.DEVICE))
            results.append(row)
        del inputs
        torch.cuda.empty_cache()
    return results


def validate_linear():
    """The CPU check (interpreter), fp32: the chunked path (4 chunks of 16 rows) against fp64; a validation row."""
    loss_err, grad_err = errors(implementations(chunk_size=16)["fastkd"], torch.float32, "cpu")
    return {"loss": NAME, "dtype": "float32", "rel_err_out": loss_err, "rel_err_grad": grad_err}
