"""The fused API (also exported at the top level).  Student first, teacher second, raw logits.

Each call checks its arguments, then runs the fused Triton kernels or the eager reference
(`fastkd.backend`).  Leading dims are flattened into rows; losses are float32 (float64 for
float64 inputs); gradients reach the student, and the teacher too when it requires grad.
"""
import math

from . import _checks, _dist, ops, reference
from ._reduce import reduce_rows
from .backend import resolve


def _softmax(x, temperature, log):
    _checks.check_logits(x, "x")
    temperature = _checks.check_temperature(temperature)
    if resolve(x) == "reference":
        return (reference.log_softmax if log else reference.softmax)(x, temperature)
    return ops.softmax(x, temperature, log)


def softmax(x, temperature=1.0):
    """softmax(x / T) along the last dim, in the dtype of x."""
    return _softmax(x, temperature, False)


def log_softmax(x, temperature=1.0):
    """log_softmax(x / T) along the last dim, in the dtype of x."""
    return _softmax(x, temperature, True)


def _check_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index, reduction):
    _checks.check_pair(student_logits, teacher_logits)
    _checks.check_labels(labels, student_logits)
    _checks.check_ignore_index(ignore_index)
    _checks.check_reduction(reduction)
    return _checks.check_temperature(temperature)


def kl_div(student_logits, teacher_logits, temperature=1.0, *, reverse=False, labels=None, ignore_index=-100,
           reduction="batchmean"):
    """T^2 KL(p_t || p_s) per row, p = softmax(logits / T); reverse=True: T^2 KL(p_s || p_t).

    labels: optional [...] integer tensor; rows equal to ignore_index count for nothing (zero loss
    and gradient).  reduction: 'batchmean' (sum / counted rows, 0 when none count), 'sum', 'none'.
    """
    temperature = _check_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index, reduction)
    if resolve(student_logits) == "reference":
        return reference.kl_div(student_logits, teacher_logits, temperature, reverse=reverse, labels=labels,
                                ignore_index=ignore_index, reduction=reduction)
    p, q = (student_logits, teacher_logits) if reverse else (teacher_logits, student_logits)
    rows, _ = ops.kl_div_rows(p, q, temperature, labels, ignore_index)
    return reduce_rows(rows, labels, ignore_index, reduction, student_logits.shape[:-1])


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, *, labels=None, ignore_index=-100,
        reduction="batchmean"):
    """Generalized JSD, TRL's convention: T^2 [beta KL(p_t || m) + (1 - beta) KL(p_s || m)],
    m = (1 - beta) p_s + beta p_t; beta = 0 is forward KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t)."""
    temperature = _check_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index, reduction)
    beta = _checks.check_number(beta, "beta", 0.0, 1.0)
    if beta in (0.0, 1.0):
        return kl_div(student_logits, teacher_logits, temperature, reverse=beta == 1.0, labels=labels,
                      ignore_index=ignore_index, reduction=reduction)
    if resolve(student_logits) == "reference":
        return reference.jsd(student_logits, teacher_logits, beta, temperature, labels=labels,
                             ignore_index=ignore_index, reduction=reduction)
    rows, _ = ops.jsd_rows(student_logits, teacher_logits, beta, temperature, labels, ignore_index)
    return reduce_rows(rows, labels, ignore_index, reduction, student_logits.shape[:-1])


def dkd(student_logits, teacher_logits, target, alpha=1.0, beta=2.0, temperature=1.0, *, ignore_index=-100,
        reduction="batchmean"):
    """Decoupled KD (Zhao et al. 2022): T^2 (alpha TCKD + beta NCKD) per row, the target class removed exactly.

    target: hard labels of the leading shape (rows equal to ignore_index count for nothing), or a
    [..., V] soft target reduced by argmax.  A target outside [0, V) is refused on the CPU and gives
    a NaN row on a GPU (checking there would cost a host sync).
    """
    temperature = _check_loss_args(student_logits, teacher_logits, temperature, None, ignore_index, reduction)
    alpha = _checks.check_number(alpha, "alpha", -math.inf, math.inf)
    beta = _checks.check_number(beta, "beta", -math.inf, math.inf)
    target = _checks.dkd_target(target, student_logits, ignore_index)
    if resolve(student_logits) == "reference":
        return reference.dkd(student_logits, teacher_logits, target, alpha, beta, temperature,
                             ignore_index=ignore_index, reduction=reduction)
    rows, _ = ops.dkd_rows(student_logits, teacher_logits, target, alpha, beta, temperature, ignore_index)
    return reduce_rows(rows, target, ignore_index, reduction, student_logits.shape[:-1])


def dist(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, *, eps=1e-8, labels=None,
         ignore_index=-100, group=None):
    """DIST (Huang et al. 2022): T^2 (beta (1 - mean_rows rho(p_s, p_t)) + gamma (1 - mean_cols rho)), rho the
    Pearson correlation with eps added to the product of the centred norms (the official code).  Returns a scalar.

    Rows whose label is ignore_index are left out of both terms.  With a single counted row the
    intra-class correlations are 0 (the official code's value: centred columns are 0, so 0 / eps).
    group: a torch.distributed group; the intra-class term then covers the global batch (each rank's
    per-class moments gathered and merged), every rank returns the global loss, and each rank's rows get
    world_size x dL_global/dx (what DDP's gradient averaging expects).  Eager only.
    """
    temperature = _check_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index, "sum")
    beta = _checks.check_number(beta, "beta", -math.inf, math.inf)
    gamma = _checks.check_number(gamma, "gamma", -math.inf, math.inf)
    eps = _checks.check_number(eps, "eps", 0.0, math.inf)
    if student_logits.shape[-1] < 2:
        raise ValueError(f"dist needs V >= 2 classes (a Pearson correlation over one class is undefined), got V = "
                         f"{student_logits.shape[-1]}")
    if resolve(student_logits) == "reference":
        if group is not None:
            raise ValueError("group= needs the triton backend (the reference computes the per-rank term)")
        return reference.dist(student_logits, teacher_logits, beta, gamma, temperature, eps=eps, labels=labels,
                              ignore_index=ignore_index)
    if group is not None:
        return _dist.GlobalDIST.apply(ops._kernels(), student_logits, teacher_logits, labels, beta, gamma,
                                      temperature, eps, ignore_index, group)
    return ops.dist(student_logits, teacher_logits, labels, beta, gamma, temperature, eps, ignore_index)[0]


def _sparse(student_logits, teacher_ids, teacher_values, beta, values, missing, temperature, labels, ignore_index,
            reduction):
    temperature = _check_loss_args(student_logits, student_logits, temperature, labels, ignore_index, reduction)
    _checks.sparse_teacher(teacher_ids, teacher_values, student_logits, values, missing)
    if resolve(student_logits) == "reference":
        return reference._sparse(student_logits, teacher_ids, teacher_values, beta, values, missing, temperature,
                                 labels, ignore_index, reduction)
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    rows, _ = ops.sparse_kl_rows(student_logits, teacher_ids, teacher_values, mode, beta, temperature,
                                 missing == "tail", values == "logits", labels, ignore_index)
    return reduce_rows(rows, labels, ignore_index, reduction, student_logits.shape[:-1])


def sparse_kl_div(student_logits, teacher_ids, teacher_values, *, values="logprobs", missing="tail", temperature=1.0,
                  reverse=False, labels=None, ignore_index=-100, reduction="batchmean"):
    """T^2 KL(Q || P) per row (reverse=True: KL(P || Q)) against a teacher known at K ids per row (top-k).

    teacher_ids [..., K] (int32/int64) and teacher_values [..., K]: the teacher's log-probs (values='logprobs',
    taken as given: log-probs at the distillation temperature) or logits (values='logits', divided by T).
    A pair whose value is -inf is padding (its id is never read; pad with any id).  Ids must be distinct
    otherwise.  missing='tail': one more bucket holds the mass outside the K ids on both sides (student:
    1 - sum of its softmax over the ids; teacher: 1 - sum exp(log-probs)); missing='renormalize': both
    distributions renormalised over the K ids (the student's other logits get zero gradient).  The student
    logits are the full rows [..., V] and get the gradient; the teacher is a constant.  An id outside
    [0, V) with a finite value is refused on the CPU and gives a NaN row on a GPU.
    """
    return _sparse(student_logits, teacher_ids, teacher_values, 1.0 if reverse else 0.0, values, missing, temperature,
                   labels, ignore_index, reduction)


def sparse_jsd(student_logits, teacher_ids, teacher_values, beta=0.5, *, values="logprobs", missing="tail",
               temperature=1.0, labels=None, ignore_index=-100, reduction="batchmean"):
    """T^2 JSD_beta (jsd's convention, M = (1 - beta) P + beta Q) against a top-k teacher, over the same
    buckets as sparse_kl_div (the K ids, plus the tail or renormalised)."""
    beta = _checks.check_number(beta, "beta", 0.0, 1.0)
    return _sparse(student_logits, teacher_ids, teacher_values, beta, values, missing, temperature, labels,
                   ignore_index, reduction)
