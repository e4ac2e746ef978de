"""Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019).

Default, `form="embedding"`: the code RepDistiller ships (HobbitLong/RepDistiller distiller_zoo/CC.py
`Correlation`, code the paper's authors sent; its training script embeds both penultimate features with a
trainable LinearEmbed to feat_dim = 128 and weights the loss by 0.02, `-b 0.02`).  On embeddings f_s, f_t [N, D]:
    delta_i = |f_s[i] - f_t[i]|,   loss = 1/(N-1) * sum_{i=0}^{N-2} <delta_i, delta_{i+1}>
(a correlation of consecutive samples' errors; N >= 2).
Variant, `form="taylor"`: the paper's correlation congruence with the Gaussian RBF kernel expanded to order P,
as in Knowledge-Distillation-Zoo (AberHu, kd_losses/cc.py; gamma = 0.4, P = 2 are its defaults).  With the rows
L2-normalised (torch's F.normalize, eps 1e-12) and S = f f^T their cosines, exp(-gamma ||f_i - f_j||^2) =
exp(-2 gamma) exp(2 gamma S_ij) is approximated by
    K_ij = exp(-2 gamma) * sum_{p=0}^{P} (2 gamma)^p / p! * S_ij^p,    loss = mean_{i,j} (K^s_ij - K^t_ij)^2
(the student and teacher dims may differ).  A list of stages gives the sum over stages.

Eager by design: the embedding form is a few elementwise passes over two [N, feat_dim] embeddings (feat_dim 128:
kilobytes, launch-bound) and the Taylor form is an [N, D] x [D, N] GEMM (cuBLAS) plus O(N^2) elementwise work on
matrices far smaller than the features: no fused kernel could win there.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from ._checks import check_pair, stages, upcast

FORMS = ("embedding", "taylor")


def _check_options(form, gamma, order):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    check_number(gamma, "gamma", 0.0, math.inf, low_open=True)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1 (the Taylor expansion's P), got {order!r}")


def _check(f_s, f_t, form, gamma, order):
    _check_options(form, gamma, order)
    pairs = stages(f_s, f_t)
    for s, t in zip(*pairs):
        check_pair(s, t, ranks=(2,), same=(1,) if form == "embedding" else ())
        if form == "embedding" and s.shape[0] < 2:
            raise ValueError(f"the embedding form correlates consecutive samples: f_s needs N >= 2, got "
                             f"{tuple(s.shape)}")
    return pairs


def _taylor_coefficients(gamma, order):
    """exp(-2 gamma) (2 gamma)^p / p! for p = 0..order."""
    return [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]


def cc_loss_reference(f_s, f_t, *, form="embedding", gamma=0.4, order=2):
    """The definition, one sample (embedding form) or one row of the kernel matrices (Taylor form) at a time."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, form, gamma, order)):
        s, t = upcast(s), upcast(t)
        n = s.shape[0]
        if form == "embedding":
            delta = [(s[i] - t[i]).abs() for i in range(n)]
            total = total + torch.stack([(delta[i] * delta[i + 1]).sum() for i in range(n - 1)]).sum() / (n - 1)
            continue
        coeffs = _taylor_coefficients(gamma, order)
        unit_s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit_t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rows = []
        for i in range(n):
            cos_s, cos_t = (unit_s * unit_s[i]).sum(1), (unit_t * unit_t[i]).sum(1)
            k_s = sum(c * cos_s**p for p, c in enumerate(coeffs))
            k_t = sum(c * cos_t**p for p, c in enumerate(coeffs))
            rows.append(((k_s - k_t) ** 2).sum())
        total = total + torch.stack(rows).sum() / n**2
    return total


def _kernel(f, coeffs):
    """K = sum_p coeffs[p] * S^p (elementwise powers of the cosine matrix S), by Horner's rule."""
    unit = F.normalize(upcast(f), dim=1)
    cos = unit @ unit.T
    k = torch.full_like(cos, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        k = k * cos + c
    return k


def cc_loss(f_s, f_t, *, form="embedding", gamma=0.4, order=2):
    """Correlation congruence of student and teacher embeddings f_s, f_t ([N, D] tensors or equally long lists):
    form="embedding" (default, RepDistiller's code) or "taylor" (the paper's RBF kernel to order `order` with
    `gamma`; ignored by the embedding form).  Returns a 0-dim fp32 loss (fp64 for fp64 inputs)."""
    total = 0
    for s, t in zip(*_check(f_s, f_t, form, gamma, order)):
        if form == "embedding":
            delta = (upcast(s) - upcast(t)).abs()
            total = total + (delta[:-1] * delta[1:]).sum(1).mean()
        else:
            coeffs = _taylor_coefficients(gamma, order)
            total = total + F.mse_loss(_kernel(s, coeffs), _kernel(t, coeffs))
    return total


class CC(nn.Module):
    """Correlation congruence with RepDistiller's set-up: `CC(s_dim, t_dim, feat_dim=128, form="embedding",
    gamma=0.4, order=2, weight=0.02)` owns two trainable linear embeddings (student s_dim -> feat_dim, teacher
    t_dim -> feat_dim, inputs flattened to [N, -1] first, as RepDistiller's LinearEmbed); with s_dim = t_dim = None
    the features go in as they are (a [N, D] pair).  `forward(f_s, f_t)` returns
    weight * cc_loss(embed_s(f_s), embed_t(f_t), ...); weight 0.02 is RepDistiller's `-b 0.02` for CC."""

    def __init__(self, s_dim=None, t_dim=None, feat_dim=128, *, form="embedding", gamma=0.4, order=2, weight=0.02):
        super().__init__()
        _check_options(form, gamma, order)
        self.weight = check_number(weight, "weight", 0.0, math.inf)
        if (s_dim is None) != (t_dim is None):
            raise ValueError("s_dim and t_dim must both be given (trainable embeddings) or both be None")
        self.embed_s = nn.Identity() if s_dim is None else nn.Sequential(nn.Flatten(), nn.Linear(s_dim, feat_dim))
        self.embed_t = nn.Identity() if t_dim is None else nn.Sequential(nn.Flatten(), nn.Linear(t_dim, feat_dim))
        self.form, self.gamma, self.order = form, gamma, order

    def forward(self, f_s, f_t):
        loss = cc_loss(self.embed_s(f_s), self.embed_t(f_t), form=self.form, gamma=self.gamma, order=self.order)
        return self.weight * loss
