"""Hint-based (intermediate-feature) distillation losses: one file per method.

Each file holds the method's eager reference (written from its definition; also the CPU fallback, and
re-exported as `fastkd.reference.<method>_loss`), its functional form (argument checks, then the fused
Triton kernels where they pay, or eager torch where cuBLAS or one MSE pass is the whole cost), and a thin
nn.Module with the authors' defaults (loss weight included).

    fused:  at_loss / AT, hcl_loss / HCL, ickd_loss / ICKD, rkd_loss / RKD (angle term), crd_loss / CRD
    eager:  fitnet_loss / FitNet (ConvReg), cc_loss / CC, pkt_loss / PKT, sp_loss / SP
"""
from .at import AT, at_loss
from .cc import CC, cc_loss
from .crd import CRD, Embed, crd_loss, crd_normaliser
from .fitnet import ConvReg, FitNet, fitnet_loss
from .hcl import HCL, hcl_loss
from .ickd import ICKD, ickd_loss
from .pkt import PKT, pkt_loss
from .rkd import RKD, rkd_loss
from .sp import SP, sp_loss

__all__ = ["AT", "CC", "CRD", "ConvReg", "Embed", "FitNet", "HCL", "ICKD", "PKT", "RKD", "SP", "at_loss", "cc_loss",
           "crd_loss", "crd_normaliser", "fitnet_loss", "hcl_loss", "ickd_loss", "pkt_loss", "rkd_loss", "sp_loss"]
