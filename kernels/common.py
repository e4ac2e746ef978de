"""Pieces shared by every row kernel: the online-softmax update and the launch geometry.

A "row" is one distribution over the vocabulary: V logits read with a row stride and a column
stride (1 for contiguous rows; anything for sliced or transposed inputs).  Offsets are int64.
"""
import torch
import triton
import triton.language as tl

# Largest block of columns a program holds at once; longer rows loop over blocks.
MAX_BLOCK = 4096


@triton.jit
def row_offsets(row, stride_row, cols, stride_col, UNIT_COL: tl.constexpr):
    """int64 element offsets of `cols` in `row`; int32 column arithmetic when the columns are unit-stride."""
    if UNIT_COL:
        return row * stride_row + cols
    else:
        return row * stride_row + cols.to(tl.int64) * stride_col


@triton.jit
def expm1(x):
    """exp(x) - 1, accurate near 0: a Taylor polynomial for |x| < 0.1 (to fp32 or fp64 precision)."""
    # x (1 + x/2 (1 + x/3 (1 + ...))), to x^8 (truncation < 1e-12 relative) or x^13 for fp64
    p = tl.full(x.shape, 1.0, x.dtype)
    for k in tl.static_range(13 if x.dtype == tl.float64 else 8, 1, -1):
        p = 1.0 + x * p * (1.0 / k)
    return tl.where(tl.abs(x) < 0.1, x * p, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x), accurate near 0: a series for |x| < 0.1 (to fp32 or fp64 precision)."""
    # x - x^2/2 + x^3/3 - ..., to x^9 (truncation < 1e-10 relative) or x^17 for fp64
    p = tl.full(x.shape, 0.0, x.dtype)
    for k in tl.static_range(17 if x.dtype == tl.float64 else 9, 0, -1):
        p = (1.0 / k) - x * p
    return tl.where(tl.abs(x) < 0.1, x * p, tl.log(1.0 + x))


@triton.jit
def counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS: tl.constexpr):
    """Columns to read in `row`: V, or 0 when its label is ignore_index (the row counts for nothing)."""
    if HAS_LABELS:
        return tl.where(tl.load(labels_ptr + row) != ignore_index, V, 0)
    else:
        return V


@triton.jit
def load_scaled(ptr, row, stride, cols, stride_c, mask, inv_t, UNIT: tl.constexpr, ACC: tl.constexpr):
    """Logits of `row` at `cols` over the temperature, in ACC; -inf where masked off."""
    x = tl.load(ptr + row_offsets(row, stride, cols, stride_c, UNIT), mask=mask, other=float("-inf"))
    return x.to(ACC) * inv_t


@triton.jit
def online_lse_update(m, z, x):
    """One block of the online softmax (Milakov & Gimelshein 2018).

    State: m = running max, z = sum exp(x - m).  Returns the new state, the factor that rescales
    sums kept relative to the old max, and e = exp(x - m_new) for the block.  A state or block that
    is all -inf keeps m = -inf and gives zeros, never -inf - (-inf) = NaN.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    e = tl.exp(x - shift)
    return m_new, z * alpha + tl.sum(e, 0), alpha, e


def acc_dtype(*dtypes):
    """Accumulation dtype: fp64 when an input is fp64 (gradcheck runs on the kernels), fp32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tl_acc_dtype(*dtypes):
    return tl.float64 if torch.float64 in dtypes else tl.float32


def block_config(V, *dtypes):
    """Columns per block and warps per program for rows of length V in `dtypes` (the widest decides)."""
    max_block = MAX_BLOCK if max(d.itemsize for d in dtypes) <= 4 else MAX_BLOCK // 2
    block = min(max(triton.next_power_of_2(V), 16), max_block)
    num_warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, num_warps


def as_rows(x):
    """View `x[..., V]` as `[N, V]` without copying when the leading dims collapse into one stride.

    Sliced and transposed rows keep their strides (the kernels take both); only leading dims that
    cannot be collapsed into one row stride (e.g. `x[:, :-1]` of a 3-D tensor) are copied.
    """
    V = x.shape[-1]
    try:
        return x.view(-1, V)
    except RuntimeError:
        return x.reshape(-1, V)


def pair_forward(kernel, a, b, labels, ignore_index, n_stats, scalars):
    """Launch a forward kernel over the rows of two logit tensors -> (loss [N], stats [N, n_stats]).

    The kernel's parameters, in order: a, b, labels, loss, stats, V, the row and column strides of a
    and b, `scalars`, ignore_index, then the constexprs HAS_LABELS, UNIT_A, UNIT_B, ACC, BLOCK.
    """
    a2, b2 = as_rows(a), as_rows(b)
    N, V = a2.shape
    acc = acc_dtype(a.dtype, b.dtype)
    loss = torch.empty(N, dtype=acc, device=a.device)
    stats = torch.empty(N, n_stats, dtype=acc, device=a.device)
    if N:
        block, num_warps = block_config(V, a.dtype, b.dtype)
        kernel[(N,)](
            a2, b2, labels.reshape(-1) if labels is not None else loss, loss, stats,
            V, a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), *scalars, ignore_index,
            labels is not None, a2.stride(1) == 1, b2.stride(1) == 1, tl_acc_dtype(a.dtype, b.dtype), block,
            num_warps=num_warps,
        )
    return loss, stats


def pair_backward(kernel, grad_loss, a, b, stats, labels, ignore_index, grad_a, grad_b, scalars):
    """Launch a backward kernel -> (dL/da, dL/db), each contiguous and shaped like its input, or None.

    The kernel's parameters, in order: a, b, labels, stats, grad_loss, grad_a, grad_b, V, the strides
    of a and b, the stride of grad_loss (0 when expanded), `scalars`, ignore_index, then the constexprs
    HAS_LABELS, GRAD_A, GRAD_B, UNIT_A, UNIT_B, ACC, BLOCK.
    """
    a2, b2 = as_rows(a), as_rows(b)
    N, V = a2.shape
    ga = torch.empty(a.shape, dtype=a.dtype, device=a.device) if grad_a else None
    gb = torch.empty(b.shape, dtype=b.dtype, device=b.device) if grad_b else None
    if N and (grad_a or grad_b):
        g = grad_loss.reshape(-1) if grad_loss.dim() else grad_loss.expand(N)
        block, num_warps = block_config(V, a.dtype, b.dtype)
        kernel[(N,)](
            a2, b2, labels.reshape(-1) if labels is not None else stats, stats, g,
            ga if grad_a else gb, gb if grad_b else ga,
            V, a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), g.stride(0), *scalars, ignore_index,
            labels is not None, grad_a, grad_b, a2.stride(1) == 1, b2.stride(1) == 1,
            tl_acc_dtype(a.dtype, b.dtype), block, num_warps=num_warps,
        )
    return ga, gb
