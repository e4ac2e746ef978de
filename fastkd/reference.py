"""Eager PyTorch references: the oracle for every test and the CPU fallback.

Same signatures and semantics as the fused API (`fastkd.functional`).  They compute in float32
(float64 for float64 inputs) with plain torch ops, each a full pass over [N, V]: correct, not fast.
`dkd` and `dist` keep the seed's formulation (DKD's -1000 target offset, DIST's eps on the
product of the norms) so users can compare the fused kernels with the code they came from.
"""
import torch
import torch.nn.functional as F

from ._reduce import reduce_rows


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x, temperature):
    """Logits as [N, V] in the accumulation dtype, divided by the temperature."""
    return x.reshape(-1, x.shape[-1]).to(_acc_dtype(x)) / temperature


def _row_mask(labels, ignore_index, n, device):
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels.reshape(-1) != ignore_index


def _finish(rows, labels, ignore_index, reduction, lead_shape):
    rows = torch.where(_row_mask(labels, ignore_index, rows.numel(), rows.device), rows, 0.0)
    return reduce_rows(rows, labels, ignore_index, reduction, lead_shape)


def softmax(x, temperature=1.0):
    """softmax(x / T) along the last dim, in the dtype of x."""
    return (x.to(_acc_dtype(x)) / temperature).softmax(-1).to(x.dtype)


def log_softmax(x, temperature=1.0):
    """log_softmax(x / T) along the last dim, in the dtype of x."""
    return (x.to(_acc_dtype(x)) / temperature).log_softmax(-1).to(x.dtype)


def _kl_rows(log_p, log_q):
    """Per-row KL(p || q) from log-probabilities; p = 0 terms are 0 (masked vocabulary entries)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_div(student_logits, teacher_logits, temperature=1.0, *, reverse=False, labels=None,
           ignore_index=-100, reduction="batchmean"):
    """T^2 KL(p_t || p_s) per row (reverse=True: T^2 KL(p_s || p_t)), reduced."""
    log_ps = F.log_softmax(_acc(student_logits, temperature), -1)
    log_pt = F.log_softmax(_acc(teacher_logits, temperature), -1)
    rows = _kl_rows(log_ps, log_pt) if reverse else _kl_rows(log_pt, log_ps)
    return _finish(rows * temperature**2, labels, ignore_index, reduction, student_logits.shape[:-1])


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, *, labels=None, ignore_index=-100,
        reduction="batchmean"):
    """T^2 [beta KL(p_t || m) + (1 - beta) KL(p_s || m)], m = (1 - beta) p_s + beta p_t (TRL's convention:
    beta = 0 is forward KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t))."""
    if beta == 0 or beta == 1:
        return kl_div(student_logits, teacher_logits, temperature, reverse=beta == 1, labels=labels,
                      ignore_index=ignore_index, reduction=reduction)
    log_ps = F.log_softmax(_acc(student_logits, temperature), -1)
    log_pt = F.log_softmax(_acc(teacher_logits, temperature), -1)
    log_m = torch.logsumexp(torch.stack([log_ps + torch.log1p(torch.tensor(-beta, dtype=log_ps.dtype)),
                                         log_pt + torch.log(torch.tensor(beta, dtype=log_ps.dtype))]), 0)
    rows = beta * _kl_rows(log_pt, log_m) + (1 - beta) * _kl_rows(log_ps, log_m)
    return _finish(rows * temperature**2, labels, ignore_index, reduction, student_logits.shape[:-1])


def dkd(student_logits, teacher_logits, target, alpha=1.0, beta=2.0, temperature=1.0, *, ignore_index=-100,
        reduction="batchmean"):
    """Decoupled KD (Zhao et al. 2022) in the seed's formulation: T^2 (alpha TCKD + beta NCKD) per row.

    TCKD is the KL between the binary [p_target, 1 - p_target] of teacher and student; NCKD the KL
    between the non-target distributions, the target removed by the seed's -1000 logit offset.
    A 2-D target of shape [N, V] (mixup, label smoothing) is reduced by argmax, as in the seed.
    """
    V = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    if target.dim() == student_logits.dim() and target.shape[-1] == V and target.dtype.is_floating_point:
        target = target.argmax(-1)
    s = _acc(student_logits, temperature)
    t = _acc(teacher_logits, temperature)
    counted = _row_mask(target, ignore_index, s.shape[0], s.device)
    gt = F.one_hot(torch.where(counted, target.reshape(-1), 0).long(), V).bool()
    ps, pt = s.softmax(-1), t.softmax(-1)
    bs = torch.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
    bt = torch.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="none").sum(-1)
    nckd = F.kl_div(F.log_softmax(s - 1000.0 * gt, -1), F.softmax(t - 1000.0 * gt, -1), reduction="none").sum(-1)
    rows = temperature**2 * (alpha * tckd + beta * nckd)
    return _finish(rows, target, ignore_index, reduction, lead_shape)


def _pearson_rows(a, b, eps):
    """Pearson correlation of matching rows of a and b, eps added to the product of the centred norms (official DIST)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, *, eps=1e-8, labels=None,
         ignore_index=-100):
    """DIST (Huang et al. 2022), the seed's code: T^2 (beta (1 - mean_rows rho) + gamma (1 - mean_cols rho)).

    Rows whose label is ignore_index are left out of both terms.  Returns a scalar.
    """
    ps = _acc(student_logits, temperature).softmax(-1)
    pt = _acc(teacher_logits, temperature).softmax(-1)
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        ps, pt = ps[keep], pt[keep]
    inter = 1 - _pearson_rows(ps, pt, eps).mean()
    intra = 1 - _pearson_rows(ps.t(), pt.t(), eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _safe_log(x):
    """log x with log 0 = -inf and a zero (not NaN) gradient there."""
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, 1.0)), float("-inf"))


def _sparse_buckets(student_logits, teacher_ids, teacher_values, values, missing, temperature):
    """Student and teacher log-masses per bucket [N, K (+1 tail)]: full-vocabulary softmax, gather, and the tail
    as the exact sum over the ids outside the support (padding pairs, value -inf, are empty buckets)."""
    s = _acc(student_logits, temperature)
    N, V = s.shape
    ids = teacher_ids.reshape(N, -1).long()
    vals = teacher_values.reshape(N, -1).to(s.dtype)
    valid = vals != float("-inf")
    ids = torch.where(valid, ids, 0)
    if values == "logits":
        vals = vals / temperature
    if missing == "renormalize":
        a = torch.where(valid, s.gather(1, ids), float("-inf"))
        vals = torch.where(valid, vals, float("-inf"))
        some = valid.any(1, keepdim=True)  # an all-padding row has no support: both sides empty
        a, vals = torch.where(some, a, 0.0), torch.where(some, vals, 0.0)
        log_p = torch.where(valid, a - a.logsumexp(1, keepdim=True), float("-inf"))
        log_q = torch.where(valid, vals - vals.logsumexp(1, keepdim=True), float("-inf"))
        return log_p, log_q
    log_s = s.log_softmax(-1)
    in_support = torch.zeros_like(s).scatter_add_(1, ids, valid.to(s.dtype)) > 0
    log_p = torch.where(valid, log_s.gather(1, ids), float("-inf"))
    log_q = torch.where(valid, vals, float("-inf"))
    p_tail = torch.where(in_support, 0.0, log_s.exp()).sum(1, keepdim=True)
    q_tail = (1 - log_q.exp().sum(1, keepdim=True)).clamp_min(0.0)
    q_tail = torch.where(in_support.all(1, keepdim=True), 0.0, q_tail)  # no tail ids: nothing outside
    return torch.cat([log_p, _safe_log(p_tail)], 1), torch.cat([log_q, _safe_log(q_tail)], 1)


def _sparse(student_logits, teacher_ids, teacher_values, beta, values, missing, temperature, labels, ignore_index,
            reduction):
    log_p, log_q = _sparse_buckets(student_logits, teacher_ids, teacher_values, values, missing, temperature)
    if beta == 0:
        rows = _kl_rows(log_q, log_p)
    elif beta == 1:
        rows = _kl_rows(log_p, log_q)
    else:
        log_m = torch.logaddexp(log_p + torch.log1p(torch.tensor(-beta, dtype=log_p.dtype)),
                                log_q + torch.log(torch.tensor(beta, dtype=log_p.dtype)))
        rows = beta * _kl_rows(log_q, log_m) + (1 - beta) * _kl_rows(log_p, log_m)
    return _finish(rows * temperature**2, labels, ignore_index, reduction, student_logits.shape[:-1])


def sparse_kl_div(student_logits, teacher_ids, teacher_values, *, values="logprobs", missing="tail", temperature=1.0,
                  reverse=False, labels=None, ignore_index=-100, reduction="batchmean"):
    """T^2 KL(Q || P) (reverse: KL(P || Q)) over the teacher's K ids, plus a tail bucket or renormalised; see
    fastkd.sparse_kl_div."""
    return _sparse(student_logits, teacher_ids, teacher_values, 1.0 if reverse else 0.0, values, missing,
                   temperature, labels, ignore_index, reduction)


def sparse_jsd(student_logits, teacher_ids, teacher_values, beta=0.5, *, values="logprobs", missing="tail",
               temperature=1.0, labels=None, ignore_index=-100, reduction="batchmean"):
    """T^2 JSD_beta over the teacher's K ids, plus a tail bucket or renormalised; see fastkd.sparse_jsd."""
    return _sparse(student_logits, teacher_ids, teacher_values, beta, values, missing, temperature, labels,
                   ignore_index, reduction)


# The hint losses' references live beside their fused code, one file per method (fastkd/hints/).
from .hints.at import at_loss_reference as at_loss  # noqa: E402
from .hints.cc import cc_loss_reference as cc_loss  # noqa: E402
from .hints.crd import crd_loss_reference as crd_loss  # noqa: E402
from .hints.fitnet import fitnet_loss_reference as fitnet_loss  # noqa: E402
from .hints.hcl import hcl_loss_reference as hcl_loss  # noqa: E402
from .hints.ickd import ickd_loss_reference as ickd_loss  # noqa: E402
from .hints.pkt import pkt_loss_reference as pkt_loss  # noqa: E402
from .hints.rkd import rkd_loss_reference as rkd_loss  # noqa: E402
from .hints.sp import sp_loss_reference as sp_loss  # noqa: E402

__all__ = ["at_loss", "cc_loss", "crd_loss", "dist", "dkd", "fitnet_loss", "hcl_loss", "ickd_loss", "jsd", "kl_div",
           "log_softmax", "pkt_loss", "rkd_loss", "softmax", "sp_loss", "sparse_jsd", "sparse_kl_div"]
