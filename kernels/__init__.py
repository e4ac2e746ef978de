"""Triton device code for fastkd, installed as `fastkd.kernels`: one file per loss family."""
from .dist import dist_grad, dist_stats
from .dkd import dkd_rows, dkd_rows_backward
from .jsd import jsd_rows, jsd_rows_backward
from .kl import kl_div_rows, kl_div_rows_backward
from .softmax import softmax_backward, softmax_forward
from .sparse_kl import sparse_kl_rows, sparse_kl_rows_backward

__all__ = ["dist_grad", "dist_stats", "dkd_rows", "dkd_rows_backward", "jsd_rows", "jsd_rows_backward", "kl_div_rows", "kl_div_rows_backward", "softmax_backward", "softmax_forward",
           "sparse_kl_rows", "sparse_kl_rows_backward"]
