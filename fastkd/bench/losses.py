"""The losses the bench runs, one calling convention for fastkd, the eager reference and their peers."""
import torch

# name: (function name, keyword arguments, model bytes per logit element: forward, backward)
# The model is DESIGN.md's floor for the [N, V] streams (e = 1 element size): the student gradient only.
LOSSES = {
    "softmax": ("softmax", {}, (2.0, 3.0)),
    "log_softmax": ("log_softmax", {}, (2.0, 3.0)),
    "kl": ("kl_div", {}, (2.0, 3.0)),
    "reverse_kl": ("kl_div", {"reverse": True}, (2.0, 3.0)),
    "jsd": ("jsd", {"beta": 0.5}, (4.0, 3.0)),
    "dkd": ("dkd", {"alpha": 1.0, "beta": 8.0}, (2.0, 3.0)),
    "dist": ("dist", {"beta": 1.0, "gamma": 1.0}, (4.0, 5.0)),
    # top-k teacher (K = TOP_K log-probs, tail bucket): the student row only
    "sparse_kl": ("sparse_kl_div", {}, (1.0, 2.0)),
}
TEMPERATURE = 2.0
TOP_K = 64


def model_bytes(name, mode):
    fwd, bwd = LOSSES[name][2]
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def target_of(x):
    """DKD's fixed per-row target."""
    return torch.arange(x.shape[0], device=x.device) * 7919 % x.shape[-1]


def call(name, module, s, t):
    """The loss `name` from `module` (fastkd, fastkd.reference, or a peer with the same functions)."""
    fn_name, kwargs, _ = LOSSES[name]
    fn = getattr(module, fn_name)
    if "softmax" in name:
        return fn(s, TEMPERATURE)
    if name == "dkd":
        return fn(s, t, target_of(s), temperature=TEMPERATURE, **kwargs)
    if name == "sparse_kl":
        return fn(s, *t, temperature=TEMPERATURE, **kwargs)
    return fn(s, t, temperature=TEMPERATURE, **kwargs)


def inputs(rows, V, dtype, device, seed=0, name=None):
    """Student logits (requiring grad) and the teacher: logits, or for sparse_kl the (ids, log-probs at T) of
    its top TOP_K (prepared here, outside any timing)."""
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(rows, V, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    t = (2 * torch.randn(rows, V, generator=g)).to(device=device, dtype=dtype)
    if name == "sparse_kl":
        values, ids = torch.log_softmax(t.float() / TEMPERATURE, -1).topk(min(TOP_K, V), -1)
        return s, (ids, values.to(dtype))
    return s, t


def to_fp64(t):
    """The teacher input for the fp64 reference."""
    return (t[0], t[1].double()) if isinstance(t, tuple) else t.double()


def weight_of(out, dtype):
    """Fixed weights for the outputs' sum (the same for every dtype: rounded to the input's first)."""
    return torch.linspace(0.5, 1.5, out.numel(), device=out.device).to(dtype).to(out.dtype).view(out.shape)


def forward_backward(name, module, s, t):
    out = call(name, module, s, t)
    (grad,) = torch.autograd.grad((out * weight_of(out, s.dtype)).sum(), s)
    return out.detach(), grad


def rel_err(a, b):
    """Norm-wise relative error, as the tests measure it."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-9))
