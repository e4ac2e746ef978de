"""Probabilistic knowledge transfer (Passalis and Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018).

Follows the authors' code (passalis/probabilistic_kt nn/pkt.py `cosine_similarity_loss`), which RepDistiller
(distiller_zoo/PKT.py) and mdistiller (distillers/PKT.py `pkt_loss`) copy.  On features f [N, D] (the penultimate,
pooled features in both repositories; student and teacher dims may differ):
    u_i = f_i / (||f_i|| + eps)   (NaN entries set to 0, as the code does; eps = 1e-7)
    P_ij = (u_i . u_j + 1) / 2,   q_{j|i} = P_ij / sum_j P_ij        (cosine kernel, scaled to [0, 1])
    loss = mean_{i,j} q^t_{j|i} * log((q^t_{j|i} + eps) / (q^s_{j|i} + eps))
The module `PKT` multiplies it by the authors' weight, 30000 (RepDistiller `-b 30000`, mdistiller
PKT.LOSS.FEAT_WEIGHT 30000); the functional is unweighted.
Variant, `reduction="batchmean"`: the sum over j divided by N only, i.e. the mean over samples of the KL
divergence of each sample's conditional distribution, as the paper writes it; it is N times the default
`reduction="mean"` (the code's mean over the N x N entries), so its scale does not shrink with the batch size.
A list of stages gives the sum over stages.  One deliberate difference: the norm's gradient at an all-zero row is
0 here (torch's vector_norm) where the code's sqrt(sum f^2) gives NaN.

Eager by design: the cost is two [N, D] x [D, N] GEMMs (cuBLAS) plus O(N^2) elementwise work on matrices far
smaller than the features: no fused kernel could beat that.
"""
import math

import torch
from torch import nn

from .._checks import check_number
from ._checks import check_pair, stages, upcast

REDUCTIONS = ("mean", "batchmean")


def _check_options(eps, reduction):
    check_number(eps, "eps", 0.0, math.inf)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check(f_s, f_t, eps, reduction):
    _check_options(eps, reduction)
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, ranks=(2,))
    return pairs


def _reduce(kl_sum, n, reduction):
    return kl_sum / (n * n if reduction == "mean" else n)


def pkt_loss_reference(f_s, f_t, *, eps=1e-7, reduction="mean"):
    """The definition from the raw Gram matrix: cos_ij = (f_i . f_j) / ((||f_i|| + eps)(||f_j|| + eps)), one row
    of the conditional distributions at a time."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, eps, reduction)):
        n = s.shape[0]
        q = []
        for f in (upcast(s), upcast(t)):
            scale = f.pow(2).sum(1).sqrt() + eps
            rows = []
            for i in range(n):
                cos = (f * f[i]).sum(1) / (scale * scale[i])
                p = (torch.where(torch.isnan(cos), 0.0, cos) + 1) / 2
                rows.append(p / p.sum())
            q.append(rows)
        kl = [(q_t * torch.log((q_t + eps) / (q_s + eps))).sum() for q_s, q_t in zip(*q)]
        total = total + _reduce(torch.stack(kl).sum(), n, reduction)
    return total


def _conditional(f, eps):
    """q_{j|i}: the cosine kernel of the rows of f, scaled to [0, 1], rows normalised to sum 1."""
    f = upcast(f)
    unit = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), 0.0, unit)
    p = (unit @ unit.T + 1) / 2
    return p / p.sum(1, keepdim=True)


def pkt_loss(f_s, f_t, *, eps=1e-7, reduction="mean"):
    """PKT loss of student and teacher features f_s, f_t ([N, Ds] and [N, Dt] tensors, or equally long lists):
    the authors' code with `eps`; reduction "mean" (default, the code: mean over the N x N entries) or "batchmean"
    (divided by N only).  Returns a 0-dim fp32 loss (fp64 for fp64 inputs)."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, eps, reduction)):
        q_s, q_t = _conditional(s, eps), _conditional(t, eps)
        kl = q_t * torch.log((q_t + eps) / (q_s + eps))
        total = total + _reduce(kl.sum(), s.shape[0], reduction)
    return total


class PKT(nn.Module):
    """PKT with the authors' defaults: `PKT(eps=1e-7, reduction="mean", weight=30000.0)`; `forward(f_s, f_t)` =
    weight * pkt_loss.  No trainable state (the repositories apply it to the penultimate features directly)."""

    def __init__(self, eps=1e-7, reduction="mean", weight=30000.0):
        super().__init__()
        _check_options(eps, reduction)
        self.weight = check_number(weight, "weight", 0.0, math.inf)
        self.eps, self.reduction = eps, reduction

    def forward(self, f_s, f_t):
        return self.weight * pkt_loss(f_s, f_t, eps=self.eps, reduction=self.reduction)
