"""Peak extra CPU memory of fastkd.linear_kl_div (chunked) against F.linear + fastkd.kl_div (unchunked),
forward + backward (student hidden states, weight and bias get gradients; the teacher's logits are given).

The bytes are counted with torch.profiler's memory events: every allocation and free of the CPU
allocator, in order; the peak of their running sum is the peak extra memory of the call (its inputs,
made before, are not counted; the gradients it leaves in .grad are).  That tracker is independent of
the backend.  The default backend is 'reference' (the eager loss on each chunk): the Triton
interpreter is far too slow at the default size.  The eager reference holds several fp32 temporaries
of each chunk's [chunk, V] (of the whole [tokens, V] when unchunked), so under it both figures are
larger than with the fused kernels, in the same proportion.

    python benchmarks/linear_memory.py [--tokens 4096] [--hidden 512] [--vocab 32768] [--dtype float32]
                                       [--chunk-size N] [--backend reference|triton]
"""
import argparse
import gc

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastkd
from fastkd.linear import default_chunk_size, linear_kl_div


def peak_extra_bytes(step):
    """Peak of the running sum of the CPU allocator's allocations minus frees while `step()` runs."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: fastkd's rule (default_chunk_size)")
    parser.add_argument("--backend", choices=["reference", "triton"], default="reference")
    args = parser.parse_args(argv)
    N, H, V, dtype = args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(V, dtype=dtype, requires_grad=True)
    teacher = torch.randn(N, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    chunk = args.chunk_size or default_chunk_size(V, dtype, hidden.device)

    def chunked():
        linear_kl_div(hidden, weight, teacher, student_bias=bias, labels=labels, chunk_size=chunk).backward()

    def unchunked():
        fastkd.kl_div(F.linear(hidden, weight, bias), teacher, labels=labels).backward()

    results = {}
    with fastkd.use_backend(args.backend):
        for name, step in (("chunked", chunked), ("unchunked", unchunked)):
            results[name] = peak_extra_bytes(step)
            grads = [x.grad.clone() for x in (hidden, weight, bias)]
            for x in (hidden, weight, bias):
                x.grad = None
            results[name + "_grads"] = grads
    agree = max(float((a.double() - b.double()).norm() / b.double().norm())
                for a, b in zip(results["chunked_grads"], results["unchunked_grads"]))
    mib = 1 << 20
    print(f"tokens={N} H={H} V={V} {args.dtype}, backend {args.backend}, bytes from torch.profiler memory events")
    print(f"one [tokens, V] {args.dtype} tensor: {N * V * dtype.itemsize / mib:.1f} MiB; gradients of hidden, weight, "
          f"bias: {(N * H + V * H + V) * dtype.itemsize / mib:.1f} MiB")
    print(f"linear_kl_div, chunk {chunk}: peak extra {results['chunked'] / mib:.1f} MiB")
    print(f"F.linear + fastkd.kl_div:     peak extra {results['unchunked'] / mib:.1f} MiB")
    print(f"ratio {results['unchunked'] / results['chunked']:.1f}x; gradients agree to {agree:.1e} (relative)")


if __name__ == "__main__":
    main()
