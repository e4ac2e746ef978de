"""ICKD-C (Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge Distillation",
ICCV 2021): inter-channel correlation of feature maps.

Follows the authors' code (ADLab-AutoDrive/ICKD: Cifar100/distiller_zoo/ICKD.py ICKDLoss).  Per stage, with F the
feature map of a sample viewed [C, H W]:
    G = F F^T,  A = G with each row L2-normalised (F.normalize(G, dim=2): row / max(||row||, 1e-12)),
    loss = sum over samples of ||A_s - A_t||_F^2 / divisor,  divisor = C N   (divisor="C*N", the default)
Variant divisor="C*N*N": C N^2, as the authors' ImageNet code (ImageNet/torchdistill/losses/single.py ChSimLoss)
divides.  A list of stages gives the sum over stages.  `ickd_loss` takes student and teacher maps of the same
shape; the authors' student embedding (a 1x1 convolution without bias to the teacher's channels, then BatchNorm2d)
belongs to the module.

Module `ICKD(s_channels, t_channels, weight=2.5, divisor="C*N")`: weight * ickd_loss(embed(f_s), f_t), the
authors' CIFAR-100 script weighting the loss by 2.5 (`-b 2.5`).

Fused path (kernels/ickd.py): per sample and block of channel rows, the Gram tiles are made twice (row norms, then
the distance) with no [N, C, C] matrix stored; the backward uses dL/dF = (dL/dG + dL/dG^T) F, with
dL/dG a row-scaled combination of the two Grams, storing one [N, C, C] fp32 matrix per gradient only when that
is no larger than an input (else recomputing its tiles).
"""
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import resolve
from ._checks import acc_dtype, check_pair, stages

DIVISORS = ("C*N", "C*N*N")
EPS = 1e-12  # F.normalize's


def _kernels():
    return importlib.import_module("fastkd.kernels.ickd")


def _check(f_s, f_t, divisor):
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor!r}")
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, same=(1, 2, 3))
    return pairs


def _scale(f, divisor):
    N, C = f.shape[:2]
    return 1.0 / (C * N * (N if divisor == "C*N*N" else 1))


def ickd_loss_reference(f_s, f_t, *, divisor="C*N"):
    """Eager ICKD-C from the definition (see the module docstring), in fp32 (fp64 for fp64 inputs)."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, divisor)):
        acc = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        grams = []
        for f in (s, t):
            f = f.to(acc).flatten(2)
            grams.append(F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2, eps=EPS))
        total = total + (grams[0] - grams[1]).pow(2).sum() * _scale(s, divisor)
    return total


def ickd_loss(f_s, f_t, *, divisor="C*N"):
    """ICKD-C loss: f_s, f_t [N, C, H, W] of the same shape (embed the student first, e.g. with ICKD), or equally
    long lists of such pairs (summed).  divisor: "C*N" (authors' CIFAR code) or "C*N*N" (their ImageNet code).
    Returns a 0-dim fp32 loss (fp64 for fp64 inputs); gradients reach f_s, and f_t when it requires grad."""
    pairs = _check(f_s, f_t, divisor)
    if resolve(pairs[0][0]) == "reference":
        return ickd_loss_reference(f_s, f_t, divisor=divisor)
    return sum(ickd_stage(s, t, _scale(s, divisor))[0] for s, t in zip(*pairs))


class ICKD(nn.Module):
    """ICKD-C with the authors' student embedding: forward(f_s, f_t) = weight * ickd_loss(embed(f_s), f_t),
    embed = Conv2d(s_channels, t_channels, 1, bias=False) then BatchNorm2d(t_channels); f_s, f_t single maps."""

    def __init__(self, s_channels, t_channels, weight=2.5, divisor="C*N"):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(t_channels))
        self.weight, self.divisor = weight, divisor

    def forward(self, f_s, f_t):
        return self.weight * ickd_loss(self.embed(f_s), f_t, divisor=self.divisor)


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("fastkd::ickd_stage", mutates_args=())
def ickd_stage(f_s: Tensor, f_t: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One stage's scale * sum ||A_s - A_t||^2 (0-dim) and the per-row backward coefficients [N, C, 3]."""
    return _kernels().ickd_forward(f_s, f_t, EPS, scale)


@ickd_stage.register_fake
def _(f_s, f_t, scale):
    acc = acc_dtype(f_s, f_t)
    return f_s.new_empty((), dtype=acc), f_s.new_empty(f_s.shape[0], f_s.shape[1], 3, dtype=acc)


@torch.library.custom_op("fastkd::ickd_stage_backward", mutates_args=())
def ickd_stage_backward(grad_loss: Tensor, f_s: Tensor, f_t: Tensor, coef: Tensor, scale: float, grad_s: bool,
                        grad_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = _kernels().ickd_backward(grad_loss, f_s, f_t, coef, scale, grad_s, grad_t)
    return (gs if grad_s else f_s.new_empty(())), (gt if grad_t else f_t.new_empty(()))


@ickd_stage_backward.register_fake
def _(grad_loss, f_s, f_t, coef, scale, grad_s, grad_t):
    return (torch.empty_like(f_s) if grad_s else f_s.new_empty(())), (torch.empty_like(f_t) if grad_t else
                                                                       f_t.new_empty(()))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zeros for the statistics' (unused) gradients
    f_s, f_t, ctx.scale = inputs
    ctx.save_for_backward(f_s, f_t, output[1])


def _grad(ctx, grad_loss, _grad_coef):
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None, None
    f_s, f_t, coef = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    gs, gt = ickd_stage_backward(grad_loss, f_s, f_t, coef, ctx.scale, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None


ickd_stage.register_autograd(_grad, setup_context=_setup)
