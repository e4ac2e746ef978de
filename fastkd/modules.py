"""nn.Module wrappers with the seed's constructor names and call shape `forward(student, teacher, **kwargs)`."""
from torch import nn

from . import functional as F


class KLDiv(nn.Module):
    """Vanilla KD (Hinton et al. 2015): T^2 KL(p_t || p_s), 'batchmean' over rows by default."""

    def __init__(self, temp=1.0, reverse=False, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.temp, self.reverse, self.ignore_index, self.reduction = temp, reverse, ignore_index, reduction

    def forward(self, student_preds, teacher_preds, labels=None, **kwargs):
        return F.kl_div(student_preds, teacher_preds, self.temp, reverse=self.reverse, labels=labels,
                        ignore_index=self.ignore_index, reduction=self.reduction)


class JSD(nn.Module):
    """Generalized Jensen-Shannon divergence with TRL's beta convention (see `fastkd.jsd`)."""

    def __init__(self, beta=0.5, temp=1.0, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.beta, self.temp, self.ignore_index, self.reduction = beta, temp, ignore_index, reduction

    def forward(self, student_preds, teacher_preds, labels=None, **kwargs):
        return F.jsd(student_preds, teacher_preds, self.beta, self.temp, labels=labels,
                     ignore_index=self.ignore_index, reduction=self.reduction)


class DKD(nn.Module):
    """Decoupled KD (Zhao et al. 2022) with the seed's call: `forward(z_s, z_t, target=...)`."""

    def __init__(self, alpha=1.0, beta=2.0, temperature=1.0, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, z_s, z_t, **kwargs):
        if "target" not in kwargs:
            raise TypeError("DKD.forward needs the keyword argument target=")
        return F.dkd(z_s, z_t, kwargs["target"], self.alpha, self.beta, self.temperature,
                     ignore_index=self.ignore_index, reduction=self.reduction)


class DIST(nn.Module):
    """DIST (Huang et al. 2022) with the seed's constructor and call `forward(student_preds, teacher_preds)`."""

    def __init__(self, beta=1.0, gamma=1.0, temp=1.0, eps=1e-8, ignore_index=-100, group=None):
        super().__init__()
        self.beta, self.gamma, self.temp, self.eps = beta, gamma, temp, eps
        self.ignore_index, self.group = ignore_index, group

    def forward(self, student_preds, teacher_preds, labels=None, **kwargs):
        return F.dist(student_preds, teacher_preds, self.beta, self.gamma, self.temp, eps=self.eps, labels=labels,
                      ignore_index=self.ignore_index, group=self.group)
