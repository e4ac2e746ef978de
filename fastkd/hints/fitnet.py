"""FitNet hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

Follows the code of RepDistiller (HobbitLong/RepDistiller: distiller_zoo/FitNet.py HintLoss, models/util.py
ConvReg) and mdistiller (megvii-research/mdistiller: distillers/FitNet.py, distillers/_common.py ConvReg), which
agree: a convolutional regressor maps the student's hint layer onto the teacher's, and the hint loss is the mean
squared error (torch's MSELoss: the mean over all elements) between the regressed student map and the teacher map.

Loss per stage: mean((f_s - f_t)^2) over all N*C*H*W elements; a list of stages gives the sum over stages.
`fitnet_loss` takes features that already have the teacher's shape (the regressor is the module's business).

Regressor (`ConvReg`, as in both repositories), chosen from the student and teacher heights:
  Hs == 2 Ht: 3x3 convolution, stride 2, padding 1;  2 Hs == Ht: 4x4 transposed convolution, stride 2, padding 1;
  Hs >= Ht otherwise: a (1 + Hs - Ht) x (1 + Ws - Wt) convolution, no padding;
then BatchNorm2d over the teacher's channels and a ReLU.  Variant, by the named argument `use_relu=False`: BN
without the ReLU (RepDistiller's Connector uses ConvReg that way), for teacher hints that can be negative.
The module `FitNet(s_shape, t_shape, use_relu=True, weight=100.0)` returns weight * the hint loss, with the
authors' weight (mdistiller FITNET.LOSS.FEAT_WEIGHT 100, RepDistiller `-b 100`); the functional is unweighted.

Eager by design: the loss is a single elementwise pass (torch's mse_loss reads each input once; its backward is one
more pass), so no fused kernel could win there; the regressor's cost is a cuDNN convolution.  16-bit inputs are
upcast to fp32 first (a copy: the price of an fp32-accurate loss).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from ._checks import check_pair, stages, upcast

RANKS = (2, 3, 4)


def _check(f_s, f_t):
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, ranks=RANKS)
        if s.shape != t.shape:
            raise ValueError(f"f_s and f_t must have the same shape (regress the student onto the teacher's shape "
                             f"first, e.g. with fastkd.hints.FitNet), got {tuple(s.shape)} and {tuple(t.shape)}")
    return pairs


def fitnet_loss_reference(f_s, f_t):
    """Sum over stages of (1 / numel) * sum_i ||f_s[i] - f_t[i]||^2, one sample i at a time."""
    total = 0
    for s, t in zip(*_check(f_s, f_t)):
        squares = [((upcast(s[i]) - upcast(t[i])) ** 2).sum() for i in range(s.shape[0])]
        total = total + torch.stack(squares).sum() / s.numel()
    return total


def fitnet_loss(f_s, f_t):
    """FitNet hint loss: sum over stages of mean((f_s - f_t)^2); f_s, f_t: tensors of the same shape ([N, C, H, W],
    [N, C, L] or [N, D]) or equally long lists of them.  Returns a 0-dim fp32 loss (fp64 for fp64 inputs)."""
    return sum(F.mse_loss(upcast(s), upcast(t)) for s, t in zip(*_check(f_s, f_t)))


class ConvReg(nn.Module):
    """The authors' convolutional regressor from a student map of shape s_shape to the teacher's t_shape (both
    [N, C, H, W]; N is ignored): conv (see the module docstring for the three cases), BatchNorm2d, ReLU."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = _shape(s_shape, "s_shape"), _shape(t_shape, "t_shape")
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            out = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            out = (2 * s_h, 2 * s_w)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            out = (t_h, t_w)
        else:
            out = None
        if out != (t_h, t_w):
            raise ValueError(f"ConvReg cannot map a student map of H x W = {s_h} x {s_w} onto the teacher's "
                             f"{t_h} x {t_w}: it handles Hs = 2 Ht (with Wt = ceil(Ws / 2)), 2 Hs = Ht (with "
                             "Wt = 2 Ws), or Hs >= Ht and Ws >= Wt")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def _shape(shape, name):
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{name} must be a feature-map shape [N, C, H, W] of positive ints, got {tuple(shape)}")
    return tuple(shape)


def _is_shape(x):
    return all(isinstance(d, int) for d in x)


class FitNet(nn.Module):
    """FitNet hints with the authors' regressor and weight: `FitNet(s_shape, t_shape, use_relu=True, weight=100.0)`
    owns one ConvReg per stage (s_shape, t_shape: [N, C, H, W] shapes, or equally long lists of them);
    `forward(f_s, f_t)` returns weight * fitnet_loss(ConvReg(f_s), f_t), summed over stages.  The regressors train
    with the student."""

    def __init__(self, s_shape, t_shape, use_relu=True, weight=100.0):
        super().__init__()
        self.weight = check_number(weight, "weight", 0.0, math.inf)
        single = _is_shape(s_shape), _is_shape(t_shape)
        if single[0] != single[1]:
            raise TypeError("s_shape and t_shape must both be shapes or both be lists of shapes")
        s_shapes, t_shapes = ([s_shape], [t_shape]) if single[0] else (list(s_shape), list(t_shape))
        if len(s_shapes) != len(t_shapes) or not s_shapes:
            raise ValueError(f"s_shape and t_shape must list the same non-zero number of stages, got {len(s_shapes)} "
                             f"and {len(t_shapes)}")
        self.regressors = nn.ModuleList(ConvReg(s, t, use_relu) for s, t in zip(s_shapes, t_shapes))

    def forward(self, f_s, f_t):
        s_list, t_list = stages(f_s, f_t)
        if len(s_list) != len(self.regressors):
            raise ValueError(f"f_s must list {len(self.regressors)} stages (one per regressor), got {len(s_list)}")
        for reg, s, t in zip(self.regressors, s_list, t_list):
            check_pair(s, t, ranks=(4,))
            if s.shape[1] != reg.conv.in_channels:
                raise ValueError(f"f_s must have the {reg.conv.in_channels} channels of s_shape, got {tuple(s.shape)}")
        return self.weight * fitnet_loss([reg(s) for reg, s in zip(self.regressors, s_list)], t_list)
