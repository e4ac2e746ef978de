"""Fused-linear distillation: the student's logits are made, used and dropped a chunk of rows at a time.

    loss = reduce_r D(softmax(t_r / T), softmax(s_r / T)),   s = h W^T + b,   t = teacher logits (or h_t W_t^T + b_t)

The forward loops over chunks of `chunk_size` rows.  For each chunk it computes the student logits
s_c = h_c W^T + b (one matmul in the input dtype; cuBLAS accumulates in fp32), the teacher's (a slice
of the given logits, or h_t,c W_t^T + b_t), the per-row losses with the fused kernels, and, since the
reduction's row weights w_r are known up front ('sum': 1, 'batchmean': 1 / counted rows, a tensor,
no host sync), the logits' gradient G_c = w_r dD_r/ds_c from the kernels' backward.  It then folds G_c
into the parameter gradients at once:

    dL/dh_c = G_c W            (written into a preallocated [tokens, H] tensor, input dtype)
    dL/dW  += G_c^T h_c        (fp32 [V, H] accumulator, in place)
    dL/db  += sum_r G_c,r      (fp32 [V])

and drops s_c, t_c and G_c.  The backward only scales these by the incoming gradient and casts them
to the parameters' dtypes (into fresh tensors, so a second backward with retain_graph=True works).
No [tokens, V] tensor exists at any time: the extra memory is the three gradients (the size of h, W
and b; twice that while the backward writes the scaled copies) plus O(chunk_size x V) per chunk.

reduction='none' has per-row weights that only the backward knows (its incoming gradient): its
forward computes the row losses chunk by chunk, and its backward runs the same loop again with those
weights (twice the matmuls and kernel passes of the other reductions, the same memory).

Only the student (hidden states, weight, bias) gets gradients: the teacher is a constant here, as in
every fused-linear KD loss (it would need its own [V, H_t] gradient).  First-order gradients only.
Under the 'reference' backend the same chunk loop runs the eager reference on each chunk (its logits'
gradient from torch.autograd.grad), so the memory profile keeps its shape.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, ops, reference
from ._reduce import reduce_rows
from .backend import resolve

CPU_BUDGET = 256 << 20  # bytes of per-chunk buffers on the CPU
GPU_BUDGET = 1 << 30  # at most this many bytes of per-chunk buffers on a GPU ...
GPU_FREE_SHARE = 4  # ... and at most a quarter of the free memory


def default_chunk_size(V, dtype, device):
    """Rows per chunk when chunk_size=None: the largest power of two whose per-chunk buffers fit a budget.

    A chunk holds V x (3 e + 4) bytes per row (e = element size): the student's logits, the teacher's
    logits (when made from hidden states) and the logits' gradient in the input dtype, plus an fp32
    copy of the gradient where the weight-gradient matmul cannot write fp32 from half inputs.  The
    budget is min(free memory / 4, 1 GiB) on a GPU (torch.cuda.mem_get_info), 256 MiB on the CPU.
    E.g. bf16, V = 128256, 40 GiB free: 1 GiB / (128256 x 10 B) -> 512 rows; fp32, V = 32768 on the CPU: 512.
    """
    row_bytes = V * (3 * dtype.itemsize + 4)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // GPU_FREE_SHARE, GPU_BUDGET)
    else:
        budget = CPU_BUDGET
    return 1 << max(budget // row_bytes, 1).bit_length() - 1


# -- one loss family as the chunk loop needs it ----------------------------------------------------

class _Divergence:
    """`fused(s, t, labels, weights)` -> (row losses [c], dL/ds [c, V] for row weights `weights`, or None
    when weights is None), with the kernels; `eager(s, t, labels)` -> differentiable row losses, reference."""

    def __init__(self, fused, eager):
        self.fused, self.eager = fused, eager

    def chunk(self, backend, s, t, labels, weights):
        if backend == "triton":
            return self.fused(s, t, labels, weights)
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(weights is not None)
            rows = self.eager(leaf, t.detach(), labels)
            grad = torch.autograd.grad(rows, leaf, weights)[0] if weights is not None else None
        return rows.detach(), grad


def _kl(temperature, reverse, ignore_index):
    def fused(s, t, labels, weights):
        p, q = (s, t) if reverse else (t, s)  # the kernels compute KL(P || Q)
        rows, stats = ops.kl_div_rows(p, q, temperature, labels, ignore_index)
        if weights is None:
            return rows, None
        gp, gq = ops.kl_div_rows_backward(weights, p, q, stats, temperature, labels, ignore_index, reverse,
                                          not reverse)
        return rows, gp if reverse else gq

    def eager(s, t, labels):
        return reference.kl_div(s, t, temperature, reverse=reverse, labels=labels, ignore_index=ignore_index,
                                reduction="none")

    return _Divergence(fused, eager)


def _jsd(beta, temperature, ignore_index):
    if beta in (0.0, 1.0):  # the endpoints are forward and reverse KL (TRL's convention)
        return _kl(temperature, beta == 1.0, ignore_index)

    def fused(s, t, labels, weights):
        rows, stats = ops.jsd_rows(s, t, beta, temperature, labels, ignore_index)
        if weights is None:
            return rows, None
        return rows, ops.jsd_rows_backward(weights, s, t, stats, beta, temperature, labels, ignore_index, True,
                                           False)[0]

    def eager(s, t, labels):
        return reference.jsd(s, t, beta, temperature, labels=labels, ignore_index=ignore_index, reduction="none")

    return _Divergence(fused, eager)


def _dkd(alpha, beta, temperature, ignore_index):
    def fused(s, t, target, weights):
        rows, stats = ops.dkd_rows(s, t, target, alpha, beta, temperature, ignore_index)
        if weights is None:
            return rows, None
        return rows, ops.dkd_rows_backward(weights, s, t, stats, target, alpha, beta, temperature, ignore_index,
                                           True, False)[0]

    def eager(s, t, target):
        return reference.dkd(s, t, target, alpha, beta, temperature, ignore_index=ignore_index, reduction="none")

    return _Divergence(fused, eager)


# -- the chunk loop ---------------------------------------------------------------------------------

_MIXED_ADDMM = {}  # (device type, input dtype) -> whether torch.addmm(..., out_dtype=fp32) runs there


def _add_matmul(acc, a, b):
    """acc += a @ b, acc in fp32 (fp64), a and b in the input dtype, with no [V, H] temporary.

    Half inputs: cuBLAS writes the fp32 accumulator directly (torch.addmm's out_dtype, torch >= 2.8 on
    CUDA); where that is unavailable (the CPU, older torch) the chunk's operands are upcast first, an
    O(chunk x V) temporary.  Which one runs is found by trying once per device type and dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (acc.device.type, a.dtype)
    if _MIXED_ADDMM.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _MIXED_ADDMM[key] = True
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _MIXED_ADDMM[key] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _sweep(div, backend, chunk, hidden, weight, bias, teacher, teacher_weight, teacher_bias, labels, weights, needs):
    """Row losses [N] and, for row weights `weights` ([N], or None for none), the gradients (dL/dh in the input
    dtype, dL/dW and dL/db in fp32 / fp64) of the inputs flagged in `needs`, one chunk of rows at a time."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_h, want_w, want_b = (weights is not None and need for need in needs)
    rows = torch.empty(N, dtype=acc, device=hidden.device)
    grad_h = torch.empty(N, H, dtype=hidden.dtype, device=hidden.device) if want_h else None
    grad_w = torch.zeros(V, H, dtype=acc, device=hidden.device) if want_w else None
    grad_b = torch.zeros(V, dtype=acc, device=hidden.device) if want_b else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]
        s = F.linear(h, weight, bias)
        t = teacher[start:end] if teacher_weight is None else F.linear(teacher[start:end], teacher_weight,
                                                                       teacher_bias)
        lab = labels[start:end] if labels is not None else None
        chunk_rows, grad_s = div.chunk(backend, s, t, lab, weights[start:end] if weights is not None else None)
        rows[start:end] = chunk_rows
        if want_h:
            torch.mm(grad_s, weight, out=grad_h[start:end])
        if want_w:
            _add_matmul(grad_w, grad_s.t(), h)
        if want_b:
            grad_b.add_(grad_s.sum(0, dtype=acc))
    return rows, (grad_h, grad_w, grad_b)


class _LinearDivergence(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias, teacher logits [N, V] or hidden [N, H_t], teacher weight, bias,
    labels [N], ...) -> the reduced loss, or the row losses [N] for 'none'; gradients to the student only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, teacher_weight, teacher_bias, labels, div, backend, chunk,
                reduction, ignore_index, needs):
        inputs = (hidden, weight, bias, teacher, teacher_weight, teacher_bias, labels)
        ctx.loop, ctx.reduction, ctx.needs = (div, backend, chunk), reduction, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if reduction == "none":
            rows, _ = _sweep(div, backend, chunk, *inputs, None, needs)
            ctx.save_for_backward(*inputs)
            return rows
        N = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if reduction == "sum" or labels is None:
            count = torch.full((), 1 if reduction == "sum" else max(N, 1), dtype=acc, device=hidden.device)
        else:
            count = (labels != ignore_index).sum().clamp_min(1).to(acc)
        rows, grads = _sweep(div, backend, chunk, *inputs, (1.0 / count).expand(N), needs)
        ctx.save_for_backward(*grads)
        return reduce_rows(rows, labels, ignore_index, reduction, (N,))

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":  # the row weights are grad_out: run the loop again with them
            _, grads = _sweep(*ctx.loop, *ctx.saved_tensors, grad_out, ctx.needs)
            scale = None
        else:
            grads, scale = ctx.saved_tensors, grad_out
        return (*[_scaled(g, scale, dtype) for g, dtype in zip(grads, ctx.dtypes)], *[None] * 10)


def _scaled(grad, scale, dtype):
    """grad x scale in `dtype`: one op, rounded once, into a fresh tensor (None passes through)."""
    if grad is None or scale is None:
        return grad.to(dtype) if grad is not None else None
    return torch.mul(grad, scale, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


# -- argument checks --------------------------------------------------------------------------------

def _check_tensor(x, name, dims=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if (dims is not None and x.dim() != dims) or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape {'[V, H]' if dims == 2 else '[V]' if dims == 1 else '[..., H]'} "
                         f"with a last dim >= 1, got {tuple(x.shape)}")


def _check_projection(hidden, weight, bias, who):
    """hidden [..., H], weight [V, H], bias [V] or None: shapes, dtypes and devices agree."""
    _check_tensor(hidden, f"{who}_hidden")
    _check_tensor(weight, f"{who}_weight", 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{who}_weight must have shape [V, {hidden.shape[-1]}] ({who}_hidden's last dim), got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        _check_tensor(bias, f"{who}_bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{who}_bias must have shape [{weight.shape[0]}] (V), got {tuple(bias.shape)}")
    for x, name in ((weight, f"{who}_weight"), (bias, f"{who}_bias")):
        if x is not None and (x.dtype != hidden.dtype or x.device != hidden.device):
            raise ValueError(f"{name} must have {who}_hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                             f"got {x.dtype}, {x.device}")


def _check_inputs(hidden, weight, bias, teacher, teacher_weight, teacher_bias, chunk_size):
    _check_projection(hidden, weight, bias, "student")
    lead, V = hidden.shape[:-1], weight.shape[0]
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias needs teacher_weight (the teacher then comes as hidden states)")
        _check_tensor(teacher, "teacher")
        if teacher.shape != (*lead, V):
            raise ValueError(f"teacher logits must have shape {(*lead, V)} (student_hidden's leading dims, V), got "
                             f"{tuple(teacher.shape)}")
    else:
        _check_projection(teacher, teacher_weight, teacher_bias, "teacher")
        if teacher.shape[:-1] != lead or teacher_weight.shape[0] != V:
            raise ValueError(f"the teacher's hidden states must have student_hidden's leading dims {tuple(lead)} and "
                             f"its weight V = {V} rows, got {tuple(teacher.shape)} and {tuple(teacher_weight.shape)}")
    if teacher.device != hidden.device:
        raise ValueError(f"teacher must be on student_hidden's device {hidden.device}, got {teacher.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _linear_loss(div, hidden, weight, teacher, teacher_weight, bias, teacher_bias, labels, ignore_index, chunk_size,
                 reduction):
    H, lead = hidden.shape[-1], hidden.shape[:-1]
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias))
    out = _LinearDivergence.apply(
        hidden.reshape(-1, H), weight, bias, teacher.reshape(-1, teacher.shape[-1]), teacher_weight, teacher_bias,
        labels.reshape(-1) if labels is not None else None, div, resolve(hidden), chunk, reduction, ignore_index,
        needs)
    return out.view(lead) if reduction == "none" else out


def _common_checks(hidden, weight, teacher, teacher_weight, bias, teacher_bias, temperature, labels, ignore_index,
                   chunk_size, reduction, labels_name="labels"):
    _check_inputs(hidden, weight, bias, teacher, teacher_weight, teacher_bias, chunk_size)
    _checks.check_labels(labels, hidden, labels_name)
    _checks.check_ignore_index(ignore_index)
    _checks.check_reduction(reduction)
    return _checks.check_temperature(temperature)


# -- public API -------------------------------------------------------------------------------------

def linear_kl_div(student_hidden, student_weight, teacher, teacher_weight=None, *, student_bias=None,
                  teacher_bias=None, temperature=1.0, reverse=False, labels=None, ignore_index=-100, chunk_size=None,
                  reduction="batchmean"):
    """fastkd.kl_div(student_hidden @ student_weight^T + student_bias, teacher_logits, ...) without ever holding
    the [tokens, V] logits: T^2 KL(p_t || p_s) per row (reverse=True: T^2 KL(p_s || p_t)).

    student_hidden [..., H], student_weight [V, H] (an nn.Linear's weight), student_bias [V] or None.
    teacher: the teacher's logits [..., V] (read a chunk of rows at a time; leading dims that cannot be
    flattened without a copy, e.g. x[:, :-1] of a 3-D tensor, are copied once: pass them contiguous); or,
    with teacher_weight [V, H_t] (and teacher_bias), its hidden states [..., H_t], projected chunk by chunk too.
    labels, ignore_index, reduction as in fastkd.kl_div.
    chunk_size: rows per chunk; None picks one from V, the dtype and the free memory (`default_chunk_size`).
    Gradients reach student_hidden, student_weight and student_bias (fp32 accumulation, cast to their dtypes);
    the teacher is a constant.  See the module docstring for the memory and the 'none' reduction.
    """
    temperature = _common_checks(student_hidden, student_weight, teacher, teacher_weight, student_bias, teacher_bias,
                                 temperature, labels, ignore_index, chunk_size, reduction)
    return _linear_loss(_kl(temperature, bool(reverse), ignore_index), student_hidden, student_weight, teacher,
                        teacher_weight, student_bias, teacher_bias, labels, ignore_index, chunk_size, reduction)


def linear_jsd(student_hidden, student_weight, teacher, teacher_weight=None, *, student_bias=None, teacher_bias=None,
               beta=0.5, temperature=1.0, labels=None, ignore_index=-100, chunk_size=None, reduction="batchmean"):
    """fastkd.jsd (TRL's beta convention: 0 forward KL, 1 reverse KL) on the logits student_hidden @ W^T + b,
    a chunk of rows at a time; arguments as in `linear_kl_div`."""
    temperature = _common_checks(student_hidden, student_weight, teacher, teacher_weight, student_bias, teacher_bias,
                                 temperature, labels, ignore_index, chunk_size, reduction)
    beta = _checks.check_number(beta, "beta", 0.0, 1.0)
    return _linear_loss(_jsd(beta, temperature, ignore_index), student_hidden, student_weight, teacher,
                        teacher_weight, student_bias, teacher_bias, labels, ignore_index, chunk_size, reduction)


def linear_dkd(student_hidden, student_weight, teacher, teacher_weight=None, *, target, student_bias=None,
               teacher_bias=None, alpha=1.0, beta=2.0, temperature=1.0, ignore_index=-100, chunk_size=None,
               reduction="batchmean"):
    """fastkd.dkd on the logits student_hidden @ W^T + b, a chunk of rows at a time.

    target: the label per token (for LLMs the next-token labels) of student_hidden's leading shape; rows
    equal to ignore_index count for nothing.  Soft [..., V] targets are not taken (they would be a
    [tokens, V] tensor).  Other arguments as in `linear_kl_div`.
    """
    if target is None:
        raise TypeError("linear_dkd needs target= (the label per token), got None")
    temperature = _common_checks(student_hidden, student_weight, teacher, teacher_weight, student_bias, teacher_bias,
                                 temperature, target, ignore_index, chunk_size, reduction, "target")
    alpha = _checks.check_number(alpha, "alpha", -math.inf, math.inf)
    beta = _checks.check_number(beta, "beta", -math.inf, math.inf)
    _checks.dkd_classes(student_weight.shape[0])
    _checks.target_range(target, student_weight.shape[0], ignore_index)
    return _linear_loss(_dkd(alpha, beta, temperature, ignore_index), student_hidden, student_weight, teacher,
                        teacher_weight, student_bias, teacher_bias, target, ignore_index, chunk_size, reduction)


class LinearKLDiv(nn.Module):
    """`linear_kl_div` as a module: forward(student_hidden, student_weight, teacher, teacher_weight=None, *,
    student_bias=None, teacher_bias=None, labels=None)."""

    def __init__(self, temperature=1.0, reverse=False, ignore_index=-100, reduction="batchmean", chunk_size=None):
        super().__init__()
        self.temperature, self.reverse, self.ignore_index = temperature, reverse, ignore_index
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student_hidden, student_weight, teacher, teacher_weight=None, *, student_bias=None,
                teacher_bias=None, labels=None):
        return linear_kl_div(student_hidden, student_weight, teacher, teacher_weight, student_bias=student_bias,
                             teacher_bias=teacher_bias, temperature=self.temperature, reverse=self.reverse,
                             labels=labels, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                             reduction=self.reduction)


class LinearJSD(nn.Module):
    """`linear_jsd` as a module: forward(student_hidden, student_weight, teacher, teacher_weight=None, *,
    student_bias=None, teacher_bias=None, labels=None)."""

    def __init__(self, beta=0.5, temperature=1.0, ignore_index=-100, reduction="batchmean", chunk_size=None):
        super().__init__()
        self.beta, self.temperature, self.ignore_index = beta, temperature, ignore_index
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student_hidden, student_weight, teacher, teacher_weight=None, *, student_bias=None,
                teacher_bias=None, labels=None):
        return linear_jsd(student_hidden, student_weight, teacher, teacher_weight, student_bias=student_bias,
                          teacher_bias=teacher_bias, beta=self.beta, temperature=self.temperature, labels=labels,
                          ignore_index=self.ignore_index, chunk_size=self.chunk_size, reduction=self.reduction)


class LinearDKD(nn.Module):
    """`linear_dkd` as a module: forward(student_hidden, student_weight, teacher, teacher_weight=None, *, target,
    student_bias=None, teacher_bias=None)."""

    def __init__(self, alpha=1.0, beta=2.0, temperature=1.0, ignore_index=-100, reduction="batchmean",
                 chunk_size=None):
        super().__init__()
        self.alpha, self.beta, self.temperature, self.ignore_index = alpha, beta, temperature, ignore_index
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student_hidden, student_weight, teacher, teacher_weight=None, *, target, student_bias=None,
                teacher_bias=None):
        return linear_dkd(student_hidden, student_weight, teacher, teacher_weight, target=target,
                          student_bias=student_bias, teacher_bias=teacher_bias, alpha=self.alpha, beta=self.beta,
                          temperature=self.temperature, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                          reduction=self.reduction)
