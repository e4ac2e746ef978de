"""fastkd: fused Triton kernels for knowledge-distillation losses.

Functional API (`fastkd.functional`): softmax, log_softmax, kl_div, jsd, dkd, dist, sparse_kl_div, sparse_jsd.
Modules: KLDiv, JSD, DKD, DIST.  Chunked fused-linear losses (`fastkd.linear`): linear_kl_div, linear_jsd,
linear_dkd and their modules.  Hint (feature) losses: `fastkd.hints`.  Drop-ins for TRL and torchtune: `fastkd.adapters`.
Eager references with the same signatures: `fastkd.reference`.  Backend choice: `fastkd.use_backend`.
"""
import os as _os

# Installed, the Triton code is the subpackage fastkd.kernels; in a source checkout used without
# installing (PYTHONPATH=., as on a GPU box with no network) it is kernels/ beside fastkd/.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)

from . import reference  # noqa: E402
from .backend import use_backend  # noqa: E402
from .functional import dist, dkd, jsd, kl_div, log_softmax, softmax, sparse_jsd, sparse_kl_div  # noqa: E402
from .modules import DIST, DKD, JSD, KLDiv  # noqa: E402
from .linear import LinearDKD, LinearJSD, LinearKLDiv, linear_dkd, linear_jsd, linear_kl_div  # noqa: E402
from . import adapters, hints  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DIST", "DKD", "JSD", "KLDiv", "LinearDKD", "LinearJSD", "LinearKLDiv", "adapters", "dist", "dkd", "hints",
           "jsd", "kl_div", "linear_dkd", "linear_jsd", "linear_kl_div", "log_softmax", "reference", "softmax",
           "sparse_jsd", "sparse_kl_div", "use_backend"]
