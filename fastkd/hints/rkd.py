"""Relational knowledge distillation (Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019).

Follows mdistiller (distillers/RKD.py `rkd_loss`, defaults from engine/cfg.py), the same code as RepDistiller
(distiller_zoo/RKD.py) and the authors' lenscloth/RKD (metric/loss.py RkdDistance, RKdAngle; its examples
weight them 1 and 2, the same 1:2 ratio).  On embeddings e [N, D] (feature maps are flattened; student and
teacher dims may differ):
  distance: d_ij = sqrt(max(||e_i - e_j||^2, eps)) (`squared=True`: without the sqrt), d_ii = 0, divided by
            the mean of the positive entries; loss_d = smooth_l1(d_s, d_t), mean over the N^2 entries
  angle:    cos(i; j, k) = <u_ij, u_ik>, u_ij = (e_j - e_i) / max(||e_j - e_i||, 1e-12) (F.normalize);
            loss_a = smooth_l1(cos_s, cos_t), mean over all N^3 triplets (j == i gives cosine 0)
  loss = distance_weight * loss_d + angle_weight * loss_a, weights 25 and 50.
The mean of the positive distances is a sum over a count on the device (the code's `d[d > 0].mean()` waits
for the host).  The teacher is a constant in the code (torch.no_grad); here it gets gradients when it
requires grad (mutual learning), and is a constant otherwise - the usual case, identical to the code.

Fused path: the squared distances R [N, N] are computed by a Triton kernel from the row differences (exact
for rows with a large common offset, 0 for duplicate rows, where a Gram matrix would cancel); the distance
loss is eager on R; the angle loss is computed from R_s, R_t by the law of cosines over all triplets in
Triton tiles, so that no [N, N, D] difference tensor or [N, N, N] cosine tensor is ever formed (the code
forms both, for the student and the teacher, and keeps them for the backward).  The eager code below
(`rkd_loss_reference`) is the code's own formulation.
"""
import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from .._checks import check_number
from ._checks import acc_dtype, check_pair

_EMPTY = ()


def _kernels():
    return importlib.import_module("fastkd.kernels.rkd")


# -- custom ops: squared distances and the angle loss ------------------------------------------------

@torch.library.custom_op("fastkd::rkd_sqdist", mutates_args=())
def rkd_sqdist(e: Tensor) -> Tensor:
    """R[a, b] = ||e_a - e_b||^2 for the rows of e [N, D] -> [N, N] fp64 (see kernels/rkd.py: the angles
    subtract squared distances)."""
    return _kernels().sqdist(e)


@rkd_sqdist.register_fake
def _(e):
    return e.new_empty(e.shape[0], e.shape[0], dtype=torch.float64)


@torch.library.custom_op("fastkd::rkd_sqdist_backward", mutates_args=())
def rkd_sqdist_backward(e: Tensor, grad_r: Tensor) -> Tensor:
    return _kernels().sqdist_backward(e, grad_r)


@rkd_sqdist_backward.register_fake
def _(e, grad_r):
    return e.new_empty(e.shape)


def _sqdist_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sqdist_grad(ctx, grad_r):
    (e,) = ctx.saved_tensors
    return rkd_sqdist_backward(e, grad_r)


rkd_sqdist.register_autograd(_sqdist_grad, setup_context=_sqdist_setup)


@torch.library.custom_op("fastkd::rkd_angle", mutates_args=())
def rkd_angle(r_s: Tensor, r_t: Tensor, dtype: torch.dtype) -> Tensor:
    """The angle loss (mean over the N^3 triplets, before the weight) from fp64 squared-distance matrices,
    computed and returned in `dtype` (float32, or float64 for float64 features)."""
    return _kernels().angle_loss(r_s, r_t, dtype)


@rkd_angle.register_fake
def _(r_s, r_t, dtype):
    return r_s.new_empty((), dtype=dtype)


@torch.library.custom_op("fastkd::rkd_angle_backward", mutates_args=())
def rkd_angle_backward(grad_loss: Tensor, r_s: Tensor, r_t: Tensor, dtype: torch.dtype, grad_s: bool,
                       grad_t: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. r_s and r_t, correct for symmetric perturbations (G + G^T is dL/dR): the
    distance matrices are symmetric by construction and rkd_sqdist_backward symmetrises."""
    g_s, g_t = _kernels().angle_loss_backward(grad_loss, r_s, r_t, dtype, grad_s, grad_t)
    return (g_s if grad_s else r_s.new_empty(_EMPTY)), (g_t if grad_t else r_t.new_empty(_EMPTY))


@rkd_angle_backward.register_fake
def _(grad_loss, r_s, r_t, dtype, grad_s, grad_t):
    return r_s.new_empty(r_s.shape if grad_s else _EMPTY), r_t.new_empty(r_t.shape if grad_t else _EMPTY)


def _angle_setup(ctx, inputs, output):
    r_s, r_t, ctx.dtype = inputs
    ctx.save_for_backward(r_s, r_t)


def _angle_grad(ctx, grad_loss):
    r_s, r_t = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    g_s, g_t = rkd_angle_backward(grad_loss, r_s, r_t, ctx.dtype, need_s, need_t)
    return (g_s if need_s else None), (g_t if need_t else None), None


rkd_angle.register_autograd(_angle_grad, setup_context=_angle_setup)


# -- the loss -------------------------------------------------------------------------------------

def _embeddings(f_s, f_t, distance_weight, angle_weight, squared, eps):
    """Checked arguments -> the features as [N, D] rows (flattened; a view where the layout allows)."""
    check_pair(f_s, f_t, ranks=(2, 3, 4))
    if f_s.shape[0] < 2:
        raise ValueError(f"f_s and f_t must hold at least 2 samples (RKD relates pairs), got {f_s.shape[0]}")
    check_number(distance_weight, "distance_weight", 0.0, math.inf)
    check_number(angle_weight, "angle_weight", 0.0, math.inf)
    check_number(eps, "eps", 0.0, math.inf, low_open=True)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    return f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)


def _normalised_distances(r, squared, eps):
    """d = sqrt(max(R, eps)) (or max(R, eps)), zero diagonal, over the mean of its positive entries
    (a sum over a count: no host sync)."""
    d = r.clamp_min(eps)
    if not squared:
        d = d.sqrt()
    d = d.masked_fill(torch.eye(r.shape[0], dtype=torch.bool, device=r.device), 0.0)
    return d / (d.sum() / (d > 0).sum())


def _distance_loss(r_s, r_t, squared, eps):
    return F.smooth_l1_loss(_normalised_distances(r_s, squared, eps), _normalised_distances(r_t, squared, eps))


def _cosines_reference(e):
    """cos(i; j, k) for all triplets, as the code forms them: [N, N, D] differences, [N, N, N] cosines."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_loss_reference(f_s, f_t, *, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
    """The code's formulation, eager (fp32; fp64 for fp64 inputs): squared distances from the Gram matrix,
    angles from the normalised [N, N, D] differences."""
    e_s, e_t = _embeddings(f_s, f_t, distance_weight, angle_weight, squared, eps)
    e_s, e_t = e_s.to(acc_dtype(e_s, e_t)), e_t.to(acc_dtype(e_s, e_t))
    loss = e_s.new_zeros(())
    if distance_weight:
        r_s, r_t = ((e * e).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2 * e @ e.T for e in (e_s, e_t))
        loss = loss + distance_weight * _distance_loss(r_s, r_t, squared, eps)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_cosines_reference(e_s), _cosines_reference(e_t))
    return loss


def rkd_loss(f_s, f_t, *, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
    """RKD loss of student features f_s and teacher features f_t ([N, D], [N, C, L] or [N, C, H, W], flattened
    per sample; N >= 2) -> 0-dim float32 (float64 for float64 inputs).  `eps` clamps the squared distances
    (the code's pdist eps); the angle's normalisation uses F.normalize's 1e-12, as the code does."""
    e_s, e_t = _embeddings(f_s, f_t, distance_weight, angle_weight, squared, eps)
    if backend.resolve(e_s) != "triton":
        return rkd_loss_reference(f_s, f_t, distance_weight=distance_weight, angle_weight=angle_weight,
                                  squared=squared, eps=eps)
    dtype = acc_dtype(e_s, e_t)
    r_s, r_t = rkd_sqdist(e_s), rkd_sqdist(e_t)
    loss = r_s.new_zeros((), dtype=dtype)
    if distance_weight:
        loss = loss + distance_weight * _distance_loss(r_s.to(dtype), r_t.to(dtype), squared, eps)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle(r_s, r_t, dtype)
    return loss


class RKD(nn.Module):
    """RKD loss module with mdistiller's defaults: forward(f_s, f_t) -> distance_weight * loss_d +
    angle_weight * loss_a (see `rkd_loss`)."""

    def __init__(self, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.squared, self.eps = squared, eps

    def forward(self, f_s, f_t):
        return rkd_loss(f_s, f_t, distance_weight=self.distance_weight, angle_weight=self.angle_weight,
                        squared=self.squared, eps=self.eps)

    def extra_repr(self):
        return (f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, "
                f"squared={self.squared}, eps={self.eps}")
