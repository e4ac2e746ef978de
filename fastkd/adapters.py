"""Drop-in losses for TRL and torchtune, on fastkd's fused kernels (neither package is imported).

`generalized_jsd_loss` matches TRL's `GKDTrainer.generalized_jsd_loss` (trl/trainer/gkd_trainer.py: the
version with `labels`); `ForwardKLLoss` and `ForwardKLWithChunkedOutputLoss` match torchtune's
(torchtune/modules/loss/kd_losses.py).  Same signatures, defaults and values; where they differ on
purpose (an empty batch, masked logits, dtypes) the docstrings say so.  To use them:

    GKDTrainer.generalized_jsd_loss = staticmethod(fastkd.adapters.generalized_jsd_loss)   # TRL
    kd_loss: {_component_: fastkd.adapters.ForwardKLWithChunkedOutputLoss, num_output_chunks: 8}  # torchtune config
"""
import math

import torch
from torch import nn

from . import _checks, functional


# -- TRL ----------------------------------------------------------------------------------------------

def _trl_elementwise(student_logits, teacher_logits, beta, temperature):
    """TRL's per-element generalized JSD [..., V] (eager, in fp32 / fp64): the terms of
    beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t (beta 0 / 1: forward / reverse KL)."""
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    log_ps = (student_logits.to(acc) / temperature).log_softmax(-1)
    log_pt = (teacher_logits.to(acc) / temperature).log_softmax(-1)

    def kl_terms(log_p, log_q):  # p (log p - log q), 0 where p = 0 (both logs zeroed there: no NaN gradient)
        kept = log_p > -math.inf
        log_p, log_q = torch.where(kept, log_p, 0.0), torch.where(kept, log_q, 0.0)
        return torch.where(kept, log_p.exp() * (log_p - log_q), 0.0)

    if beta == 0.0:
        return kl_terms(log_pt, log_ps)
    if beta == 1.0:
        return kl_terms(log_ps, log_pt)
    log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
    return beta * kl_terms(log_pt, log_m) + (1 - beta) * kl_terms(log_ps, log_m)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", *, ignore_index=-100, scale_by_t2=False):
    """TRL's GKDTrainer.generalized_jsd_loss on the fused kernels: the generalized JSD of the temperature
    softmaxes, beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = (1 - beta) p_s + beta p_t (beta = 0 forward
    KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t): fastkd.jsd's convention, which is TRL's).

    TRL's normalisation, no T^2 factor: scale_by_t2=True multiplies by T^2 (Hinton et al.'s scaling,
    fastkd.jsd's).  Tokens whose label is ignore_index (TRL: -100) are left out.  reduction:
      'batchmean': sum / counted tokens; without labels sum / (logits.shape[0] * logits.shape[1]), TRL's
                   expression (batch x sequence for [B, T, V] logits; for 2-D [N, V] logits that is N x V, kept);
      'sum'; 'mean': sum / (counted tokens x V), TRL's elementwise mean;
      'none': TRL's elementwise [..., V] terms, eagerly (that output is itself a [tokens, V] tensor), with
              labels only the counted tokens' rows ([counted, V], boolean indexing: a host sync, as in TRL).
    Differences kept on purpose: with labels and no counted token 'batchmean' and 'mean' give 0 (TRL: 0/0 =
    NaN); a masked (-inf) logit contributes 0 (TRL's p * (log p - log q) gives NaN there); the loss is fp32
    (fp64 for fp64 inputs) whatever the logits' dtype (TRL computes in the logits' dtype).  Gradients reach
    the student, and the teacher when it requires grad, as in TRL.
    """
    _checks.check_pair(student_logits, teacher_logits)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must have shape [batch, seq, vocab] (or [tokens, vocab]), got "
                         f"{tuple(student_logits.shape)}")
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got {reduction!r}")
    beta = _checks.check_number(beta, "beta", 0.0, 1.0)
    temperature = _checks.check_temperature(temperature)
    _checks.check_labels(labels, student_logits)
    _checks.check_ignore_index(ignore_index)
    scale = 1.0 if scale_by_t2 else 1.0 / temperature**2  # fastkd.jsd carries T^2
    if reduction == "none":
        terms = _trl_elementwise(student_logits, teacher_logits, beta, temperature)
        terms = terms if labels is None else terms[labels != ignore_index]
        return terms * (temperature**2 if scale_by_t2 else 1.0)
    total = functional.jsd(student_logits, teacher_logits, beta, temperature, labels=labels,
                           ignore_index=ignore_index, reduction="sum") * scale
    if reduction == "sum":
        return total
    V = student_logits.shape[-1]
    if labels is None:
        rows = math.prod(student_logits.shape[:2]) if reduction == "batchmean" else student_logits.numel()
        return total / rows
    counted = (labels != ignore_index).sum().clamp_min(1)
    return total / (counted if reduction == "batchmean" else counted * V)


# -- torchtune ------------------------------------------------------------------------------------------

def _cross_entropy_sum(student_logits, teacher_logits, labels, ignore_index):
    """sum over counted rows of -sum_j p_t,j log p_s,j (T = 1) = KL(p_t || p_s) + H(p_t), with no [N, V] temporary.

    H(p_t) = log V - KL(p_t || uniform); the uniform distribution is a stride-0 row of zero logits, so
    both terms run on the fused KL kernel (and its backward gives the teacher's exact gradient too).
    """
    uniform = teacher_logits.new_zeros(()).expand(teacher_logits.shape)
    kl = functional.kl_div(student_logits, teacher_logits, labels=labels, ignore_index=ignore_index, reduction="none")
    kl_uniform = functional.kl_div(uniform, teacher_logits, labels=labels, ignore_index=ignore_index,
                                   reduction="none")
    counted = labels != ignore_index
    return (kl - kl_uniform + counted.to(kl.dtype) * math.log(student_logits.shape[-1])).sum()


def _check_torchtune(student_logits, teacher_logits, labels):
    _checks.check_pair(student_logits, teacher_logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    lead = student_logits.shape[:-1]
    if labels.numel() != math.prod(lead):
        raise ValueError(f"labels must have one entry per row of the logits ({math.prod(lead)}), got shape "
                         f"{tuple(labels.shape)}")
    labels = labels.reshape(lead)
    _checks.check_labels(labels, student_logits)
    return labels


class ForwardKLLoss(nn.Module):
    """torchtune's ForwardKLLoss on the fused kernels: the cross-entropy -sum_j p_t,j log p_s,j per token (T = 1;
    torchtune calls it forward KL, it has no teacher-entropy term), summed over tokens whose label is not
    ignore_index and divided by their count (0 when none count) with normalize=True, the plain sum without.

    Logits [..., V]; labels with one entry per row (any shape).  Loss in fp32 (fp64 for fp64 logits), as
    torchtune.  Difference kept: where a student logit is -inf and the teacher puts mass on that entry
    torchtune drops the term (its isinf mask) and fastkd returns +inf, the true cross-entropy; an entry that
    is -inf in both contributes 0 in both.  The teacher gets the cross-entropy's gradient when it requires grad.
    """

    def __init__(self, ignore_index=-100):
        super().__init__()
        _checks.check_ignore_index(ignore_index)
        self.ignore_index = ignore_index

    def forward(self, student_logits, teacher_logits, labels, normalize=True):
        labels = _check_torchtune(student_logits, teacher_logits, labels)
        total = _cross_entropy_sum(student_logits, teacher_logits, labels, self.ignore_index)
        if not normalize:
            return total
        return total / (labels != self.ignore_index).sum().clamp_min(1)


class ForwardKLWithChunkedOutputLoss(nn.Module):
    """torchtune's ForwardKLWithChunkedOutputLoss on the fused kernels: lists of logit chunks [B, T_i, V] (the
    model's output split along the sequence), labels [B, T]; the cross-entropy of `ForwardKLLoss` summed over
    all chunks and divided by the count of tokens whose label is not ignore_index (0 when none count).

    The labels are split along T at the chunks' own lengths, which is torchtune's split whenever its chunks
    line up with its labels.  Chunk lists whose length is not num_output_chunks, or whose lengths do not add
    up to T, are refused (torchtune would silently drop or misalign tokens).
    """

    def __init__(self, num_output_chunks=8, ignore_index=-100):
        super().__init__()
        if isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be an int >= 1, got {num_output_chunks!r}")
        _checks.check_ignore_index(ignore_index)
        self.num_output_chunks, self.ignore_index = num_output_chunks, ignore_index

    def forward(self, student_logits, teacher_logits, labels):
        chunks = (len(student_logits), len(teacher_logits))
        if chunks != (self.num_output_chunks,) * 2:
            raise ValueError(f"expected {self.num_output_chunks} student and teacher logit chunks, got {chunks}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(f"labels must be a [batch, seq] tensor, got {getattr(labels, 'shape', type(labels))}")
        for i, s in enumerate(student_logits):
            if not isinstance(s, torch.Tensor) or s.dim() != 3:
                raise ValueError(f"student_logits[{i}] must be a [batch, seq_chunk, vocab] tensor")
        lengths = [s.shape[1] for s in student_logits]
        if sum(lengths) != labels.shape[1]:
            raise ValueError(f"the chunks' sequence lengths {lengths} must add up to labels' {labels.shape[1]}")
        total = sum(_cross_entropy_sum(s, t, _check_torchtune(s, t, lab), self.ignore_index)
                    for s, t, lab in zip(student_logits, teacher_logits, labels.split(lengths, dim=1)))
        return total / (labels != self.ignore_index).sum().clamp_min(1)
