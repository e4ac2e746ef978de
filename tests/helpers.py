"""Test inputs on the test device, and comparison helpers: fp64 oracles and norm-wise relative errors."""
import os

import torch

DEVICE = os.environ.get("FASTKD_TEST_DEVICE", "cpu")


def randn(shape, seed=0, dtype=torch.float64):
    """Standard normal values drawn on the CPU from `seed` (the same on every device), on DEVICE."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64, device="cpu").to(device=DEVICE, dtype=dtype)


def randint(high, shape, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, high, shape, generator=g, device="cpu").to(DEVICE)


def logits(shape, dtype=torch.float32, scale=2.0, seed=0):
    """Logits scale * N(0, 1), drawn in fp64 and rounded to dtype."""
    return (scale * randn(shape, seed)).to(dtype)


def rel_err(a, b, floor=1e-9):
    """Norm-wise relative error of a against the reference b; absolute where |b| < floor (exact zeros)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), floor))


def leaf(x, requires_grad=True):
    return x.detach().clone().requires_grad_(requires_grad)


def loss_and_grads(fn, s, t, *args, **kwargs):
    """fn's loss and the gradients of its sum (or of a fixed random weighting for 'none') w.r.t. s and t."""
    loss = fn(s, t, *args, **kwargs)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    inputs = [x for x in (s, t) if x.requires_grad]
    grads = torch.autograd.grad((loss * weight).sum(), inputs)
    return loss.detach(), [g.detach() for g in grads]


def compare_to_reference(fn, ref, s, t, *args, loss_tol, grad_tol, **kwargs):
    """Run fn on (s, t) and ref on their fp64 copies; assert losses and gradients agree."""
    s64, t64 = leaf(s.double(), s.requires_grad), leaf(t.double(), t.requires_grad)
    loss, grads = loss_and_grads(fn, s, t, *args, **kwargs)
    ref_loss, ref_grads = loss_and_grads(ref, s64, t64, *args, **kwargs)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, ref_loss) <= loss_tol, (float(loss.sum()), float(ref_loss.sum()))
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == s.dtype and g.shape == s.shape
        assert rel_err(g, rg) <= grad_tol, rel_err(g, rg)
    return loss, ref_loss


def check_hint_loss(loss_fn, reference, f_s, f_t, loss_tol=1e-5, grad_tol=1e-5, **kwargs):
    """A hint loss on the fused path (backend 'triton') against its reference on fp64 copies: the loss and the
    gradients of every student and teacher stage (f_s, f_t: tensors or lists of stages) -> (loss, reference loss)."""
    import fastkd

    one = isinstance(f_s, torch.Tensor)
    f_s, f_t = ([f_s], [f_t]) if one else (f_s, f_t)
    s, t = [leaf(x) for x in f_s], [leaf(x) for x in f_t]
    s64, t64 = [leaf(x.double()) for x in f_s], [leaf(x.double()) for x in f_t]
    with fastkd.use_backend("triton"):
        loss = loss_fn(s[0] if one else s, t[0] if one else t, **kwargs)
    ref = reference(s64[0] if one else s64, t64[0] if one else t64, **kwargs)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert rel_err(loss, ref) <= loss_tol, (float(loss), float(ref))
    grads = torch.autograd.grad(loss, s + t)
    ref_grads = torch.autograd.grad(ref, s64 + t64)
    for x, g, rg in zip(s + t, grads, ref_grads):
        assert g.shape == x.shape and g.dtype == x.dtype and torch.isfinite(g).all()
        assert rel_err(g, rg) <= grad_tol, rel_err(g, rg)
    return loss, ref


def check_compiled_matches_eager(loss_fn, *inputs):
    """loss_fn(*inputs) on the fused path, compiled with fullgraph AOTAutograd, equals eager: loss and gradients
    (fp64 inputs: rtol 1e-12).  Checks the custom ops' fake implementations and autograd registration."""
    import fastkd

    torch._dynamo.reset()
    eager, compiled = [leaf(x) for x in inputs], [leaf(x) for x in inputs]
    with fastkd.use_backend("triton"):
        loss = loss_fn(*eager)
        compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*compiled)
    assert torch.allclose(compiled_loss, loss, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(compiled_loss, compiled), torch.autograd.grad(loss, eager)):
        assert torch.allclose(a, b, rtol=1e-12)
