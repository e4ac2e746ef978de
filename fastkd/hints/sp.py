"""Similarity-preserving distillation (Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

Follows RepDistiller (HobbitLong/RepDistiller distiller_zoo/SP.py `Similarity`, "verified by original author") and
mdistiller (distillers/SP.py `sp_loss`), which agree.  Per stage, with Q the features flattened to [N, -1]:
    G = Q Q^T,  each row divided by its L2 norm (torch's F.normalize, eps 1e-12),
    loss = ||G_t - G_s||_F^2 / N^2,
summed over the stages of a list.  Student and teacher may differ in every dim but the batch.  The authors' scripts
apply it to one stage (the last block's output) with weight 3000 (RepDistiller `-b 3000`, mdistiller
SP.LOSS.FEAT_WEIGHT 3000): the module's default weight; the functional is unweighted.
Variant, `normalize="matrix"`: G divided by its Frobenius norm (clamped at 1e-12) instead of row by row: the
form RepDistiller's code kept commented out (`G_s / G_s.norm(2)`).

Eager by design: the cost is the [N, CHW] x [CHW, N] GEMM per stage (cuBLAS), reading each feature map once; the
rest is O(N^2) work on the Gram matrices: no fused kernel could beat that.  A channels_last map is flattened in
its memory order (G does not depend on the order of the columns), so no copy is made.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from ._checks import check_pair, stages, upcast

NORMALIZE = ("row", "matrix")


def _check_options(normalize):
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def _check(f_s, f_t, normalize):
    _check_options(normalize)
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, ranks=(2, 3, 4))
    return pairs


def sp_loss_reference(f_s, f_t, *, normalize="row"):
    """The definition, one row of the Gram matrices at a time, on the features flattened in logical order."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, normalize)):
        n = s.shape[0]
        grams = []
        for f in (upcast(s).reshape(n, -1), upcast(t).reshape(n, -1)):
            g = torch.stack([(f * f[i]).sum(1) for i in range(n)])
            scale = g.pow(2).sum(1, keepdim=True).sqrt() if normalize == "row" else g.pow(2).sum().sqrt()
            grams.append(g / scale.clamp_min(1e-12))
        total = total + sum(((grams[1][i] - grams[0][i]) ** 2).sum() for i in range(n)) / n**2
    return total


def _gram(f, normalize):
    f = upcast(f)
    if f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last):
        f = f.permute(0, 2, 3, 1)  # contiguous [N, H, W, C]: the same Gram matrix, flattened without a copy
    rows = f.reshape(f.shape[0], -1)
    g = rows @ rows.T
    return F.normalize(g, dim=1) if normalize == "row" else g / torch.linalg.matrix_norm(g).clamp_min(1e-12)


def sp_loss(f_s, f_t, *, normalize="row"):
    """SP loss of student and teacher features f_s, f_t (tensors [N, ...] with the same N, any other dims; or
    equally long lists): sum over stages of ||G_t - G_s||_F^2 / N^2, G normalised row by row (default) or,
    normalize="matrix", as a whole.  Returns a 0-dim fp32 loss (fp64 for fp64 inputs)."""
    return sum(F.mse_loss(_gram(s, normalize), _gram(t, normalize)) for s, t in zip(*_check(f_s, f_t, normalize)))


class SP(nn.Module):
    """SP with the authors' defaults: `SP(normalize="row", weight=3000.0)`; `forward(f_s, f_t)` = weight * sp_loss.
    No trainable state."""

    def __init__(self, normalize="row", weight=3000.0):
        super().__init__()
        _check_options(normalize)
        self.weight = check_number(weight, "weight", 0.0, math.inf)
        self.normalize = normalize

    def forward(self, f_s, f_t):
        return self.weight * sp_loss(f_s, f_t, normalize=self.normalize)
