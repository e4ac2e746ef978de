"""ReviewKD's hierarchical context loss (HCL; Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021).

Follows the authors' code (dvlab-research/ReviewKD: CIFAR-100/model/reviewkd.py `hcl`), which mdistiller copies
(distillers/ReviewKD.py `hcl_loss`).  Per stage, for f_s, f_t of the same shape [N, C, H, W]:
    loss = [ mse(f_s, f_t) + sum over l in (4, 2, 1) with l < H of cnt_l mse(pool_l(f_s), pool_l(f_t)) ] / tot
pool_l = adaptive_avg_pool2d(., (l, l)) (to l x l whatever W is, as the code does), mse the mean over all
elements, cnt halving at each level used (0.5, 0.25, 0.125 when all three are), tot = 1 + sum of the cnt used;
a list of stages gives the sum over stages.  There is no variant; ReviewKD's attention-based fusion (ABF) that makes
the student's features is the model's business, not the loss's.

Module `HCL(weight=1.0)`: weight * hcl_loss (mdistiller's REVIEWKD.REVIEWKD_WEIGHT; ReviewKD's epoch warm-up factor
min(epoch / 20, 1) is the training loop's).

Fused path (kernels/hcl.py): pooling is linear, so one pass over d = f_s - f_t gives sum d^2 and every window sum of
every level; the per-(n, c) window means of d (21 values at most) are saved for the backward when that buffer is no
larger than the inputs (else recomputed there), and the backward writes dL/df_s = -dL/df_t in one more pass.
"""
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import resolve
from ._checks import check_pair, stages

LEVELS = (4, 2, 1)


def _kernels():
    return importlib.import_module("fastkd.kernels.hcl")


def _check(f_s, f_t):
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, same=(1, 2, 3))
    return pairs


def hcl_loss_reference(f_s, f_t):
    """Eager HCL from the definition (see the module docstring), in fp32 (fp64 for fp64 inputs)."""
    total = 0
    for s, t in zip(*_check(f_s, f_t)):
        acc = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        s, t = s.to(acc), t.to(acc)
        loss, cnt, tot = F.mse_loss(s, t), 1.0, 1.0
        for level in LEVELS:
            if level < s.shape[2]:
                cnt /= 2.0
                loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
                tot += cnt
        total = total + loss / tot
    return total


def hcl_loss(f_s, f_t):
    """ReviewKD's HCL: f_s, f_t [N, C, H, W] of the same shape, or equally long lists of such pairs (summed).
    Returns a 0-dim fp32 loss (fp64 for fp64 inputs); gradients reach f_s, and f_t when it requires grad."""
    pairs = _check(f_s, f_t)
    if resolve(pairs[0][0]) == "reference":
        return hcl_loss_reference(f_s, f_t)
    return sum(hcl_stage(s, t)[0] for s, t in zip(*pairs))


class HCL(nn.Module):
    """ReviewKD's HCL: forward(f_s, f_t) = weight * hcl_loss(f_s, f_t) (tensors or lists of stages)."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, f_s, f_t):
        return self.weight * hcl_loss(f_s, f_t)


# -- custom ops -----------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::hcl_stage", mutates_args=())
def hcl_stage(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """One stage's HCL (0-dim) and the window means of f_s - f_t saved for the backward ([N, C, K] or [0])."""
    return _kernels().hcl_forward(f_s, f_t)


@hcl_stage.register_fake
def _(f_s, f_t):
    N, C, H, _ = f_s.shape
    k = _kernels()
    acc = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32
    pooled = (N, C, k.N_WINDOWS - k.first_slot(H)) if k.saves_pooled(f_s, f_t) else (0,)
    return f_s.new_empty((), dtype=acc), f_s.new_empty(pooled, dtype=acc)


@torch.library.custom_op("fastkd::hcl_stage_backward", mutates_args=())
def hcl_stage_backward(grad_loss: Tensor, f_s: Tensor, f_t: Tensor, pooled: Tensor, grad_s: bool,
                       grad_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = _kernels().hcl_backward(grad_loss, f_s, f_t, pooled, grad_s, grad_t)
    return (gs if grad_s else f_s.new_empty(())), (gt if grad_t else f_t.new_empty(()))


@hcl_stage_backward.register_fake
def _(grad_loss, f_s, f_t, pooled, grad_s, grad_t):
    return (torch.empty_like(f_s) if grad_s else f_s.new_empty(())), (torch.empty_like(f_t) if grad_t else
                                                                       f_t.new_empty(()))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zeros for the statistics' (unused) gradients
    ctx.save_for_backward(*inputs, output[1])


def _grad(ctx, grad_loss, _grad_pooled):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None
    f_s, f_t, pooled = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad
    gs, gt = hcl_stage_backward(grad_loss, f_s, f_t, pooled, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None)


hcl_stage.register_autograd(_grad, setup_context=_setup)
