"""A rank of the global-batch DIST test (tests/test_dist.py): spawned with the gloo backend on the CPU."""
import os

import torch
import torch.distributed as dist


def batch(sizes, V, seed=0):
    """The global batch: logits, teacher logits and labels (some ignored), split into the ranks' rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    s = torch.randn(n, V, generator=g, dtype=torch.float64)
    t = torch.randn(n, V, generator=g, dtype=torch.float64)
    labels = torch.arange(n)
    labels[::4] = -100
    return s, t, labels


def run(rank, sizes, V, port, out_dir):
    import fastkd

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(sizes))
    try:
        s, t, labels = batch(sizes, V)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        s_local = s[lo:hi].clone().requires_grad_()
        t_local = t[lo:hi].clone().requires_grad_()
        loss = fastkd.dist(s_local, t_local, 1.0, 2.0, 2.0, labels=labels[lo:hi], group=dist.group.WORLD)
        gs, gt = torch.autograd.grad(loss, (s_local, t_local))
        torch.save({"loss": loss.detach(), "gs": gs, "gt": gt}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
