"""Temperature softmax and log-softmax along the last dim.

Forward, per row: y = softmax(x / T) or y = x / T - lse(x / T).  A row that fits in one block is
read once and written once (2 element sizes per element); a longer row is read twice (an online
pass for max and sum, then the write pass).
Backward, per row, from the saved output y and the incoming dy:
    softmax:     dx = y (dy - sum(dy y)) / T
    log_softmax: dx = (dy - exp(y) sum(dy)) / T
It reads y and dy (twice when the row does not fit in one block) and writes dx.
"""
import torch
import triton
import triton.language as tl

from .common import as_rows, block_config, load_scaled, online_lse_update, row_offsets, tl_acc_dtype


@triton.jit
def softmax_forward_kernel(
    x_ptr, y_ptr, V, stride_x, stride_xc, temperature: tl.float64,
    LOG: tl.constexpr, UNIT_X: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads x (once if V <= BLOCK, else twice); writes y, contiguous."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    m = tl.full((), float("-inf"), ACC)
    z = tl.zeros((), ACC)
    if V <= BLOCK:
        cols = tl.arange(0, BLOCK)
        x = load_scaled(x_ptr, row, stride_x, cols, stride_xc, cols < V, inv_t, UNIT_X, ACC)
        m, z, _, e = online_lse_update(m, z, x)
        if LOG:
            y = (x - m) - tl.log(z)
        else:
            y = e / z
        tl.store(y_ptr + row * V + cols, y.to(y_ptr.dtype.element_ty), mask=cols < V)
    else:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m, z, _, _ = online_lse_update(m, z, load_scaled(x_ptr, row, stride_x, cols, stride_xc, cols < V, inv_t,
                                                             UNIT_X, ACC))
        log_z = tl.log(z)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            y = (load_scaled(x_ptr, row, stride_x, cols, stride_xc, cols < V, inv_t, UNIT_X, ACC) - m) - log_z
            if not LOG:
                y = tl.exp(y)
            tl.store(y_ptr + row * V + cols, y.to(y_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _softmax_grad_block(y, dy, total, inv_t, LOG: tl.constexpr):
    if LOG:
        return (dy - tl.exp(y) * total) * inv_t
    else:
        return y * (dy - total) * inv_t


@triton.jit
def softmax_backward_kernel(
    y_ptr, dy_ptr, dx_ptr, V, stride_dy, stride_dyc, temperature: tl.float64,
    LOG: tl.constexpr, UNIT_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads y (contiguous) and dy (once if V <= BLOCK, else twice); writes dx, contiguous."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    if V <= BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < V
        y = tl.load(y_ptr + row * V + cols, mask=mask, other=float("-inf") if LOG else 0.0).to(ACC)
        dy = tl.load(dy_ptr + row_offsets(row, stride_dy, cols, stride_dyc, UNIT_DY), mask=mask, other=0.0).to(ACC)
        total = tl.sum(dy, 0) if LOG else tl.sum(dy * y, 0)
        dx = _softmax_grad_block(y, dy, total, inv_t, LOG)
        tl.store(dx_ptr + row * V + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros((), ACC)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            dy = tl.load(dy_ptr + row_offsets(row, stride_dy, cols, stride_dyc, UNIT_DY), mask=mask, other=0.0).to(ACC)
            if LOG:
                total += tl.sum(dy, 0)
            else:
                total += tl.sum(dy * tl.load(y_ptr + row * V + cols, mask=mask, other=0.0).to(ACC), 0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            y = tl.load(y_ptr + row * V + cols, mask=mask, other=float("-inf") if LOG else 0.0).to(ACC)
            dy = tl.load(dy_ptr + row_offsets(row, stride_dy, cols, stride_dyc, UNIT_DY), mask=mask, other=0.0).to(ACC)
            dx = _softmax_grad_block(y, dy, total, inv_t, LOG)
            tl.store(dx_ptr + row * V + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def softmax_forward(x, temperature, log):
    """softmax(x / T) (or its log) along the last dim; output contiguous, dtype of x."""
    x2 = as_rows(x)
    N, V = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N and V:
        block, num_warps = block_config(V, x.dtype)
        softmax_forward_kernel[(N,)](
            x2, y, V, x2.stride(0), x2.stride(1), float(temperature),
            LOG=log, UNIT_X=x2.stride(1) == 1, ACC=tl_acc_dtype(x.dtype), BLOCK=block, num_warps=num_warps,
        )
    return y


def softmax_backward(y, dy, temperature, log):
    """Gradient of softmax / log_softmax with respect to x, from the output y (contiguous) and dy."""
    dy2 = as_rows(dy)
    N, V = dy2.shape
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if N and V:
        block, num_warps = block_config(V, y.dtype)
        softmax_backward_kernel[(N,)](
            y, dy2, dx, V, dy2.stride(0), dy2.stride(1), float(temperature),
            LOG=log, UNIT_DY=dy2.stride(1) == 1, ACC=tl_acc_dtype(y.dtype), BLOCK=block, num_warps=num_warps,
        )
    return dx
