"""fastkd: fused Triton kernels for knowledge-distillation losses.

Functional API (`fastkd.functional`): softmax, log_softmax, kl_div, jsd.  Modules: KLDiv, JSD.
Eager references with the same signatures: `fastkd.reference`.  Backend choice: `fastkd.use_backend`.
"""
from . import reference
from .backend import use_backend
from .functional import jsd, kl_div, log_softmax, softmax
from .modules import JSD, KLDiv

__version__ = "0.1.0"
__all__ = ["JSD", "KLDiv", "jsd", "kl_div", "log_softmax", "reference", "softmax", "use_backend"]
