"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

Default, mode="code": the authors' code (szagoruyko/attention-transfer utils.py), as mdistiller
(distillers/AT.py) and RepDistiller (distiller_zoo/AT.py) copy it.  Per stage and sample n:
    a(f)[n] = q / max(||q||_2, 1e-12),  q = mean over channels of f^p   (torch's pow: f^p, NaN for f < 0 when p
                                                                          is not an integer; F.normalize)
    stage loss = mean over n and the H W positions of (a(f_s) - a(f_t))^2
and the loss of a list of stages is their sum.  p = 2.
Variant mode="paper", Eq. (2) of the paper: q = sum over channels of |f|^p, stage loss = mean over the batch of
||a(f_s)[n] - a(f_t)[n]||_2 (the distance, not squared; torchdistill's ATLoss mode="paper" computes this for p = 2).
Eq. (2) weights the stage distances by beta / 2: pass that as the module's weight.

Student and teacher may differ in channels.  When their spatial sizes differ, the larger map is adaptive-average
pooled to the smaller's (H, W) (mdistiller and RepDistiller pool the map with the larger H to the other's
(H, H), i.e. they support square maps; this is the same on those and extends to H != W); a pair where neither map
is at least as large as the other in both H and W is refused.  On the fused path the pooling is eager torch code
in the input dtype (its output is smaller than its input).

Module `AT(p=2.0, mode="code", weight=1000.0)`: weight * at_loss, mdistiller's AT.LOSS.FEAT_WEIGHT (RepDistiller's
`-b 1000` for attention).

Fused path (kernels/at.py): one pass over each feature map makes the channel-pooled map q [N, H W] (fp32; fp64
for fp64), a per-sample kernel normalises and compares the two maps; the backward reads each feature map once more
and writes its gradient.  Besides the gradients, it allocates [N, H W] maps and per-sample statistics (and the
pooled map where sizes differ; a copy of a map whose H and W do not collapse into one stride).
"""
import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_number
from ..backend import resolve
from ._checks import acc_dtype, check_pair, stages, upcast

MODES = ("code", "paper")
EPS = 1e-12  # F.normalize's


def _kernels():
    return importlib.import_module("fastkd.kernels.at")


def _check(f_s, f_t, p, mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = check_number(p, "p", 0.0, math.inf, low_open=True)
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t)
        _pool_target(s, t)
    return pairs, p


def _pool_target(s, t):
    """Which map to pool ('s', 't' or None) so that both have the smaller one's spatial size."""
    (hs, ws), (ht, wt) = s.shape[2:], t.shape[2:]
    if (hs, ws) == (ht, wt):
        return None
    if hs >= ht and ws >= wt:
        return "s"
    if hs <= ht and ws <= wt:
        return "t"
    raise ValueError(f"f_s and f_t must have spatial sizes where one is at least the other in both H and W (the "
                     f"larger is pooled to the smaller), got {tuple(s.shape)} and {tuple(t.shape)}")


def _aligned(s, t):
    which = _pool_target(s, t)
    if which == "s":
        s = F.adaptive_avg_pool2d(s, t.shape[2:])
    elif which == "t":
        t = F.adaptive_avg_pool2d(t, s.shape[2:])
    return s, t


def _attention(f, p, mode):
    q = f.abs().pow(p).sum(1) if mode == "paper" else f.pow(p).mean(1)
    return F.normalize(q.flatten(1), eps=EPS)


def at_loss_reference(f_s, f_t, *, p=2.0, mode="code"):
    """Eager attention-transfer loss from the definition (see the module docstring), in fp32 (fp64 for fp64)."""
    pairs, p = _check(f_s, f_t, p, mode)
    total = 0
    for s, t in zip(*pairs):
        s, t = _aligned(upcast(s), upcast(t))
        diff = _attention(s, p, mode) - _attention(t, p, mode)
        total = total + (diff.norm(dim=1).mean() if mode == "paper" else diff.pow(2).mean())
    return total


def _power(p, mode):
    """How the kernels compute f^p (kernels/at.py POWERS): x^2, |x|^p, sign(x) |x|^p or x^p (NaN for x < 0)."""
    if p == 2.0:
        return "square"
    if mode == "paper" or (p.is_integer() and int(p) % 2 == 0):
        return "abs"
    return "odd" if p.is_integer() else "real"


def at_loss(f_s, f_t, *, p=2.0, mode="code"):
    """Attention-transfer loss.  f_s [N, Cs, Hs, Ws], f_t [N, Ct, Ht, Wt] (channels may differ; the larger spatial
    size is pooled to the smaller), or equally long lists of such pairs (the stage losses are summed).
    mode="code" (default, the authors' code) or "paper" (Eq. 2); p > 0.  Returns a 0-dim fp32 loss (fp64 for
    fp64 inputs); gradients reach f_s, and f_t when it requires grad."""
    pairs, p = _check(f_s, f_t, p, mode)
    if resolve(pairs[0][0]) == "reference":
        return at_loss_reference(f_s, f_t, p=p, mode=mode)
    power, paper = _power(p, mode), mode == "paper"
    total = 0
    for s, t in zip(*pairs):
        s, t = _aligned(s, t)
        N, L = s.shape[0], s.shape[2] * s.shape[3]
        q_s = at_map(s, p, power, 1.0 if paper else 1.0 / s.shape[1])
        q_t = at_map(t, p, power, 1.0 if paper else 1.0 / t.shape[1])
        if q_s.dtype != q_t.dtype:  # one fp64 input: compare in fp64
            q_s, q_t = q_s.double(), q_t.double()
        rows, _ = at_distance(q_s, q_t, EPS, 1.0 / N if paper else 1.0 / (N * L), paper)
        total = total + rows.sum()
    return total


class AT(nn.Module):
    """Attention transfer with mdistiller's defaults: forward(f_s, f_t) = weight * at_loss(f_s, f_t, p=p, mode=mode)
    (tensors or lists of stages)."""

    def __init__(self, p=2.0, mode="code", weight=1000.0):
        super().__init__()
        self.p, self.mode, self.weight = p, mode, weight

    def forward(self, f_s, f_t):
        return self.weight * at_loss(f_s, f_t, p=self.p, mode=self.mode)


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("fastkd::at_map", mutates_args=())
def at_map(f: Tensor, p: float, power: str, scale: float) -> Tensor:
    """q [N, H W] = scale * sum over channels of pow(f), f [N, C, H, W] (fp32; fp64 for fp64 f); `power` names
    how f^p is computed (kernels/at.py POWERS)."""
    return _kernels().at_map(f, p, power, scale)


@at_map.register_fake
def _(f, p, power, scale):
    return f.new_empty(f.shape[0], f.shape[2] * f.shape[3], dtype=acc_dtype(f))


@torch.library.custom_op("fastkd::at_map_backward", mutates_args=())
def at_map_backward(grad_q: Tensor, f: Tensor, p: float, power: str, scale: float) -> Tensor:
    return _kernels().at_map_grad(f, grad_q, p, power, scale)


@at_map_backward.register_fake
def _(grad_q, f, p, power, scale):
    return torch.empty_like(f)


def _map_setup(ctx, inputs, output):
    f, ctx.p, ctx.power, ctx.scale = inputs
    ctx.save_for_backward(f)


def _map_grad(ctx, grad_q):
    (f,) = ctx.saved_tensors
    return at_map_backward(grad_q, f, ctx.p, ctx.power, ctx.scale), None, None, None


at_map.register_autograd(_map_grad, setup_context=_map_setup)


@torch.library.custom_op("fastkd::at_distance", mutates_args=())
def at_distance(q_s: Tensor, q_t: Tensor, eps: float, scale: float, paper: bool) -> tuple[Tensor, Tensor]:
    """Per-sample losses [N] (scale * sum of squared differences of the normalised maps, or of their distance if
    paper) and statistics [N, 5] of two attention maps [N, L]."""
    return _kernels().at_distance(q_s, q_t, eps, scale, paper)


@at_distance.register_fake
def _(q_s, q_t, eps, scale, paper):
    return q_s.new_empty(q_s.shape[0]), q_s.new_empty(q_s.shape[0], 5)


@torch.library.custom_op("fastkd::at_distance_backward", mutates_args=())
def at_distance_backward(grad_loss: Tensor, q_s: Tensor, q_t: Tensor, stats: Tensor, eps: float, scale: float,
                         paper: bool, grad_s: bool, grad_t: bool) -> tuple[Tensor, Tensor]:
    dq_s, dq_t = _kernels().at_distance_grad(grad_loss, q_s, q_t, stats, eps, scale, paper, grad_s, grad_t)
    return (dq_s if grad_s else q_s.new_empty(())), (dq_t if grad_t else q_t.new_empty(()))


@at_distance_backward.register_fake
def _(grad_loss, q_s, q_t, stats, eps, scale, paper, grad_s, grad_t):
    return q_s.new_empty(q_s.shape if grad_s else ()), q_t.new_empty(q_t.shape if grad_t else ())


def _distance_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zeros for the statistics' (unused) gradients
    q_s, q_t, ctx.eps, ctx.scale, ctx.paper = inputs
    ctx.save_for_backward(q_s, q_t, output[1])


def _distance_grad(ctx, grad_loss, _grad_stats):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None
    q_s, q_t, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    dq_s, dq_t = at_distance_backward(grad_loss, q_s, q_t, stats, ctx.eps, ctx.scale, ctx.paper, need_s, need_t)
    return (dq_s if need_s else None), (dq_t if need_t else None), None, None, None


at_distance.register_autograd(_distance_grad, setup_context=_distance_setup)
