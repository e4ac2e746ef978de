"""The fused kernels as torch.library custom ops, with fake (meta) implementations and autograd.

Each loss op returns per-row losses and the per-row statistics its backward needs; the reduction
is plain torch code on top (so `batchmean` reaches the backward as an expanded [N] gradient).
Being custom ops, they are opaque to torch.compile: a compiled training step runs them with no
graph break.  Triton is imported at the first kernel launch, not with fastkd, so that a program
(or `python -m fastkd.bench`) can still choose TRITON_INTERPRET after `import fastkd`.
"""
import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import _dist

_EMPTY = ()


def _rows(x):
    return math.prod(x.shape[:-1])


def _acc(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _kernels():
    return importlib.import_module("fastkd.kernels")


def _grad_or_empty(grad, like):
    return grad if grad is not None else like.new_empty(_EMPTY)


# -- softmax / log_softmax ------------------------------------------------------------------------

@torch.library.custom_op("fastkd::softmax", mutates_args=())
def softmax(x: Tensor, temperature: float, log: bool) -> Tensor:
    return _kernels().softmax_forward(x, temperature, log)


@softmax.register_fake
def _(x, temperature, log):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastkd::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, grad_y: Tensor, temperature: float, log: bool) -> Tensor:
    return _kernels().softmax_backward(y.contiguous(), grad_y, temperature, log)


@softmax_backward.register_fake
def _(y, grad_y, temperature, log):
    return y.new_empty(y.shape)


def _softmax_setup(ctx, inputs, output):
    _, ctx.temperature, ctx.log = inputs
    ctx.save_for_backward(output)


def _softmax_grad(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return softmax_backward(y, grad_y, ctx.temperature, ctx.log), None, None


softmax.register_autograd(_softmax_grad, setup_context=_softmax_setup)


# -- KL(P || Q) -----------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::kl_div_rows", mutates_args=())
def kl_div_rows(p: Tensor, q: Tensor, temperature: float, labels: Optional[Tensor],
                ignore_index: int) -> tuple[Tensor, Tensor]:
    """Row losses T^2 KL(softmax(p/T) || softmax(q/T)) and row statistics (m_p, log z_p, m_q, log z_q, KL)."""
    return _kernels().kl_div_rows(p, q, temperature, labels, ignore_index)


@kl_div_rows.register_fake
def _(p, q, temperature, labels, ignore_index):
    n = _rows(p)
    return p.new_empty(n, dtype=_acc(p, q)), p.new_empty(n, 5, dtype=_acc(p, q))


@torch.library.custom_op("fastkd::kl_div_rows_backward", mutates_args=())
def kl_div_rows_backward(grad_loss: Tensor, p: Tensor, q: Tensor, stats: Tensor, temperature: float,
                         labels: Optional[Tensor], ignore_index: int, grad_p: bool,
                         grad_q: bool) -> tuple[Tensor, Tensor]:
    gp, gq = _kernels().kl_div_rows_backward(grad_loss, p, q, stats, temperature, labels, ignore_index, grad_p, grad_q)
    return _grad_or_empty(gp, p), _grad_or_empty(gq, q)


@kl_div_rows_backward.register_fake
def _(grad_loss, p, q, stats, temperature, labels, ignore_index, grad_p, grad_q):
    return p.new_empty(p.shape if grad_p else _EMPTY), q.new_empty(q.shape if grad_q else _EMPTY)


def _kl_setup(ctx, inputs, output):
    p, q, ctx.temperature, labels, ctx.ignore_index = inputs
    ctx.save_for_backward(p, q, output[1], labels)


def _kl_grad(ctx, grad_loss, _grad_stats):
    p, q, stats, labels = ctx.saved_tensors
    need_p, need_q = ctx.needs_input_grad[:2]
    gp, gq = kl_div_rows_backward(grad_loss, p, q, stats, ctx.temperature, labels, ctx.ignore_index, need_p, need_q)
    return (gp if need_p else None), (gq if need_q else None), None, None, None


kl_div_rows.register_autograd(_kl_grad, setup_context=_kl_setup)


# -- generalized JSD ------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::jsd_rows", mutates_args=())
def jsd_rows(s: Tensor, t: Tensor, beta: float, temperature: float, labels: Optional[Tensor],
             ignore_index: int) -> tuple[Tensor, Tensor]:
    """Row losses T^2 JSD_beta (0 < beta < 1) and row statistics (m_s, log z_s, m_t, log z_t, KL(p_s||m),
    KL(p_t||m))."""
    return _kernels().jsd_rows(s, t, beta, temperature, labels, ignore_index)


@jsd_rows.register_fake
def _(s, t, beta, temperature, labels, ignore_index):
    n = _rows(s)
    return s.new_empty(n, dtype=_acc(s, t)), s.new_empty(n, 6, dtype=_acc(s, t))


@torch.library.custom_op("fastkd::jsd_rows_backward", mutates_args=())
def jsd_rows_backward(grad_loss: Tensor, s: Tensor, t: Tensor, stats: Tensor, beta: float, temperature: float,
                      labels: Optional[Tensor], ignore_index: int, grad_s: bool,
                      grad_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = _kernels().jsd_rows_backward(grad_loss, s, t, stats, beta, temperature, labels, ignore_index,
                                       grad_s, grad_t)
    return _grad_or_empty(gs, s), _grad_or_empty(gt, t)


@jsd_rows_backward.register_fake
def _(grad_loss, s, t, stats, beta, temperature, labels, ignore_index, grad_s, grad_t):
    return s.new_empty(s.shape if grad_s else _EMPTY), t.new_empty(t.shape if grad_t else _EMPTY)


def _jsd_setup(ctx, inputs, output):
    s, t, ctx.beta, ctx.temperature, labels, ctx.ignore_index = inputs
    ctx.save_for_backward(s, t, output[1], labels)


def _jsd_grad(ctx, grad_loss, _grad_stats):
    s, t, stats, labels = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    gs, gt = jsd_rows_backward(grad_loss, s, t, stats, ctx.beta, ctx.temperature, labels, ctx.ignore_index,
                               need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None


jsd_rows.register_autograd(_jsd_grad, setup_context=_jsd_setup)


# -- DKD ------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::dkd_rows", mutates_args=())
def dkd_rows(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float,
             ignore_index: int) -> tuple[Tensor, Tensor]:
    """Row losses T^2 (alpha TCKD + beta NCKD) and row statistics (9 per row, see kernels/dkd.py)."""
    return _kernels().dkd_rows(s, t, target, alpha, beta, temperature, ignore_index)


@dkd_rows.register_fake
def _(s, t, target, alpha, beta, temperature, ignore_index):
    n = _rows(s)
    return s.new_empty(n, dtype=_acc(s, t)), s.new_empty(n, 9, dtype=_acc(s, t))


@torch.library.custom_op("fastkd::dkd_rows_backward", mutates_args=())
def dkd_rows_backward(grad_loss: Tensor, s: Tensor, t: Tensor, stats: Tensor, target: Tensor, alpha: float,
                      beta: float, temperature: float, ignore_index: int, grad_s: bool,
                      grad_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = _kernels().dkd_rows_backward(grad_loss, s, t, stats, target, alpha, beta, temperature, ignore_index,
                                          grad_s, grad_t)
    return _grad_or_empty(gs, s), _grad_or_empty(gt, t)


@dkd_rows_backward.register_fake
def _(grad_loss, s, t, stats, target, alpha, beta, temperature, ignore_index, grad_s, grad_t):
    return s.new_empty(s.shape if grad_s else _EMPTY), t.new_empty(t.shape if grad_t else _EMPTY)


def _dkd_setup(ctx, inputs, output):
    s, t, target, ctx.alpha, ctx.beta, ctx.temperature, ctx.ignore_index = inputs
    ctx.save_for_backward(s, t, output[1], target)


def _dkd_grad(ctx, grad_loss, _grad_stats):
    s, t, stats, target = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    gs, gt = dkd_rows_backward(grad_loss, s, t, stats, target, ctx.alpha, ctx.beta, ctx.temperature,
                               ctx.ignore_index, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None, None


dkd_rows.register_autograd(_dkd_grad, setup_context=_dkd_setup)


# -- DIST -----------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::dist", mutates_args=())
def dist(s: Tensor, t: Tensor, labels: Optional[Tensor], beta: float, gamma: float, temperature: float, eps: float,
         ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The DIST loss (a scalar) and its statistics: rows [N, 7], columns [V, 5], the counted rows."""
    return _dist.forward(_kernels(), s, t, labels, beta, gamma, temperature, eps, ignore_index)


@dist.register_fake
def _(s, t, labels, beta, gamma, temperature, eps, ignore_index):
    acc = _acc(s, t)
    return (s.new_empty((), dtype=acc), s.new_empty(_rows(s), 7, dtype=acc), s.new_empty(s.shape[-1], 5, dtype=acc),
            s.new_empty((), dtype=acc))


@torch.library.custom_op("fastkd::dist_backward", mutates_args=())
def dist_backward(grad: Tensor, s: Tensor, t: Tensor, labels: Optional[Tensor], row_stats: Tensor,
                  col_stats: Tensor, count: Tensor, beta: float, gamma: float, temperature: float, eps: float,
                  ignore_index: int, grad_s: bool, grad_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = _dist.backward(_kernels(), grad, s, t, labels, row_stats, col_stats, count, beta, gamma, temperature,
                            eps, ignore_index, grad_s, grad_t)
    return _grad_or_empty(gs, s), _grad_or_empty(gt, t)


@dist_backward.register_fake
def _(grad, s, t, labels, row_stats, col_stats, count, beta, gamma, temperature, eps, ignore_index, grad_s, grad_t):
    return s.new_empty(s.shape if grad_s else _EMPTY), t.new_empty(t.shape if grad_t else _EMPTY)


def _dist_setup(ctx, inputs, output):
    s, t, labels, *ctx.args = inputs
    ctx.save_for_backward(s, t, labels, *output[1:])


def _dist_grad(ctx, grad, *_grad_stats):
    s, t, labels, row_stats, col_stats, count = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    gs, gt = dist_backward(grad, s, t, labels, row_stats, col_stats, count, *ctx.args, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None, None, None


dist.register_autograd(_dist_grad, setup_context=_dist_setup)


# -- KL / JSD against a sparse (top-k) teacher ----------------------------------------------------

@torch.library.custom_op("fastkd::sparse_kl_rows", mutates_args=())
def sparse_kl_rows(s: Tensor, ids: Tensor, values: Tensor, mode: int, beta: float, temperature: float, tail: bool,
                   logits: bool, labels: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor]:
    """Row losses T^2 D(P, Q) over the teacher's K ids (+ the tail bucket) and row statistics (5 per row, see
    kernels/sparse_kl.py); mode 0 forward KL, 1 reverse KL, 2 JSD(beta)."""
    return _kernels().sparse_kl_rows(s, ids, values, (mode, beta, temperature, tail, logits), labels, ignore_index)


@sparse_kl_rows.register_fake
def _(s, ids, values, mode, beta, temperature, tail, logits, labels, ignore_index):
    n = _rows(s)
    return s.new_empty(n, dtype=_acc(s, values)), s.new_empty(n, 5, dtype=_acc(s, values))


@torch.library.custom_op("fastkd::sparse_kl_rows_backward", mutates_args=())
def sparse_kl_rows_backward(grad_loss: Tensor, s: Tensor, ids: Tensor, values: Tensor, stats: Tensor, mode: int,
                            beta: float, temperature: float, tail: bool, logits: bool, labels: Optional[Tensor],
                            ignore_index: int) -> Tensor:
    return _kernels().sparse_kl_rows_backward(grad_loss, s, ids, values, stats, (mode, beta, temperature, tail, logits),
                                              labels, ignore_index)


@sparse_kl_rows_backward.register_fake
def _(grad_loss, s, ids, values, stats, mode, beta, temperature, tail, logits, labels, ignore_index):
    return s.new_empty(s.shape)


def _sparse_setup(ctx, inputs, output):
    s, ids, values, *ctx.config, labels, ctx.ignore_index = inputs
    ctx.save_for_backward(s, ids, values, output[1], labels)


def _sparse_grad(ctx, grad_loss, _grad_stats):
    s, ids, values, stats, labels = ctx.saved_tensors
    gs = sparse_kl_rows_backward(grad_loss, s, ids, values, stats, *ctx.config, labels, ctx.ignore_index)
    return (gs,) + (None,) * 9


sparse_kl_rows.register_autograd(_sparse_grad, setup_context=_sparse_setup)
