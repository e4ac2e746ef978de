"""DIST (Huang et al. 2022): Pearson correlations of temperature softmaxes, between rows (inter-class)
and between columns over the counted rows (intra-class), eps added to the product of the norms.

Everything is computed from q = V p - 1 = expm1((x - m) - l), lse(x) - log V = m + l (m the row
max, l = log1p of the mean of expm1(x - m), kept apart so that nothing rounds at the size of m),
which is centred exactly per row (sum q = 0) and small where p is near uniform: no sum p^2 - 1/V
cancellation.
    row i:     cov = S_st / V^2, norms^2 = S_ss / V^2, S_tt / V^2     (S = sums of q products)
    column c:  centred moments of q over the counted rows (merged Chan-style, in a fixed order)

Kernels (each reads the [N, V] logits once; the per-row and per-column vectors are O(N + V)):
  dist_row_stats_kernel     per row: m_s, l_s, m_t, l_t, S_ss, S_tt, S_st in one online pass over both rows
                            (centred moments of w = expm1(x - running max), rescaled as the max grows)
  dist_column_stats_kernel  per column block, all counted rows in order: mean q_s, mean q_t, M2_s, M2_t, C
  dist_rowdot_kernel        per row: R = sum_k p_k G_k, G the loss's gradient w.r.t. p (below)
  dist_grad_kernel          per row: dL/dx = p (G - R)
With the gradient w.r.t. p written G_ij = r1_i q_o + r2_i q_x + k1_j (q_o - mean_o) + k2_j (q_x - mean_x)
(x the tensor differentiated, o the other one; r, k from the row and column statistics, the incoming
gradient and 1/T folded in), the backward kernels serve the student and the teacher alike.
"""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, as_rows, block_config, counted_length, expm1, load_scaled, log1p, tl_acc_dtype

ROW_STATS = tl.constexpr(7)  # m_s, l_s, m_t, l_t, S_ss, S_tt, S_st
COL_STATS = tl.constexpr(5)  # mean q_s, mean q_t, M2_s, M2_t, C_st
BLOCK_R = 32  # rows per tile in the column and backward passes (column coefficients are read once per tile)


@triton.jit
def chan_merge(n, mean_s, mean_t, m2_s, m2_t, c_st, n_b, q_s, q_t, mask, AXIS: tl.constexpr):
    """Merge a block of paired values (q_s, q_t; `mask`ed lanes out) into running centred moments.

    State: count n, means, centred sums of squares m2 and the centred co-moment c (Chan et al.'s
    parallel update, so that nothing cancels on near-constant data).  n_b = lanes in the block.
    """
    inv_b = 1.0 / tl.maximum(n_b, 1.0)
    mb_s = tl.sum(q_s, AXIS) * inv_b
    mb_t = tl.sum(q_t, AXIS) * inv_b
    d_s = tl.where(mask, q_s - tl.expand_dims(mb_s, AXIS), 0.0)
    d_t = tl.where(mask, q_t - tl.expand_dims(mb_t, AXIS), 0.0)
    n_new = n + n_b
    frac = n_b / tl.maximum(n_new, 1.0)
    delta_s = mb_s - mean_s
    delta_t = mb_t - mean_t
    return (n_new, mean_s + delta_s * frac, mean_t + delta_t * frac,
            m2_s + tl.sum(d_s * d_s, AXIS) + delta_s * delta_s * n * frac,
            m2_t + tl.sum(d_t * d_t, AXIS) + delta_t * delta_t * n * frac,
            c_st + tl.sum(d_s * d_t, AXIS) + delta_s * delta_t * n * frac)


@triton.jit
def dist_row_stats_kernel(
    s_ptr, t_ptr, labels_ptr, stats_ptr,
    V, stride_s, stride_sc, stride_t, stride_tc,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, UNIT_S: tl.constexpr, UNIT_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads both rows once; writes stats[row] = (m_s, l_s, m_t, l_t, S_ss, S_tt, S_st), zeros if ignored."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.full((), temperature, ACC)
    n_cols = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    m_s = tl.full((), float("-inf"), ACC)
    m_t = tl.full((), float("-inf"), ACC)
    n = tl.zeros((), ACC)
    mean_s = tl.zeros((), ACC)
    mean_t = tl.zeros((), ACC)
    m2_s = tl.zeros((), ACC)
    m2_t = tl.zeros((), ACC)
    c_st = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x_s = load_scaled(s_ptr, row, stride_s, cols, stride_sc, mask, inv_t, UNIT_S, ACC)
        x_t = load_scaled(t_ptr, row, stride_t, cols, stride_tc, mask, inv_t, UNIT_T, ACC)
        # moments of w = expm1(x - m), m the running max: as m grows to m', w' = a w + (a - 1), a = exp(m - m')
        new_s = tl.maximum(m_s, tl.max(x_s, 0))
        new_t = tl.maximum(m_t, tl.max(x_t, 0))
        new_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        new_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        a_s = tl.exp(m_s - new_s)
        a_t = tl.exp(m_t - new_t)
        mean_s = a_s * mean_s + expm1(m_s - new_s)
        mean_t = a_t * mean_t + expm1(m_t - new_t)
        m2_s *= a_s * a_s
        m2_t *= a_t * a_t
        c_st *= a_s * a_t
        m_s, m_t = new_s, new_t
        w_s = tl.where(mask, expm1(x_s - m_s), 0.0)
        w_t = tl.where(mask, expm1(x_t - m_t), 0.0)
        n, mean_s, mean_t, m2_s, m2_t, c_st = chan_merge(n, mean_s, mean_t, m2_s, m2_t, c_st,
                                                         tl.sum(mask.to(ACC), 0), w_s, w_t, mask, 0)
    # q = V p - 1 = (w - mean w) / (1 + mean w);  lse - log V = m + l, l = log1p(mean w)
    active = n_cols > 0
    base = stats_ptr + ROW_STATS * row
    tl.store(base, tl.where(active, m_s, 0.0))
    tl.store(base + 1, tl.where(active, log1p(mean_s), 0.0))
    tl.store(base + 2, tl.where(active, m_t, 0.0))
    tl.store(base + 3, tl.where(active, log1p(mean_t), 0.0))
    tl.store(base + 4, tl.where(active, m2_s / ((1.0 + mean_s) * (1.0 + mean_s)), 0.0))
    tl.store(base + 5, tl.where(active, m2_t / ((1.0 + mean_t) * (1.0 + mean_t)), 0.0))
    tl.store(base + 6, tl.where(active, c_st / ((1.0 + mean_s) * (1.0 + mean_t)), 0.0))


@triton.jit
def _counted_rows(labels_ptr, c_s_ptr, c_t_ptr, rows, N, ignore_index, HAS_LABELS: tl.constexpr):
    """The counted rows of a tile and their m, l for s and t: c_*_ptr point at m in the row statistics
    (stride ROW_STATS), l follows it."""
    row_ok = rows < N
    if HAS_LABELS:
        row_ok = row_ok & (tl.load(labels_ptr + rows, mask=rows < N, other=ignore_index) != ignore_index)
    m_s = tl.load(c_s_ptr + ROW_STATS * rows, mask=row_ok, other=0.0)
    l_s = tl.load(c_s_ptr + ROW_STATS * rows + 1, mask=row_ok, other=0.0)
    m_t = tl.load(c_t_ptr + ROW_STATS * rows, mask=row_ok, other=0.0)
    l_t = tl.load(c_t_ptr + ROW_STATS * rows + 1, mask=row_ok, other=0.0)
    return row_ok, m_s, l_s, m_t, l_t


@triton.jit
def _tile(s_ptr, t_ptr, rows, cols, row_ok, m_s, l_s, m_t, l_t, V, stride_s, stride_sc, stride_t, stride_tc, inv_t,
          ACC: tl.constexpr):
    """A [rows, cols] tile of q_s, q_t (0 outside) and its mask (counted rows x valid columns)."""
    mask = row_ok[:, None] & (cols < V)[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    x_s = tl.load(s_ptr + rows[:, None] * stride_s + cols64 * stride_sc, mask=mask, other=0.0).to(ACC) * inv_t
    x_t = tl.load(t_ptr + rows[:, None] * stride_t + cols64 * stride_tc, mask=mask, other=0.0).to(ACC) * inv_t
    q_s = tl.where(mask, expm1((x_s - m_s[:, None]) - l_s[:, None]), 0.0)
    q_t = tl.where(mask, expm1((x_t - m_t[:, None]) - l_t[:, None]), 0.0)
    return q_s, q_t, mask


@triton.jit
def dist_column_stats_kernel(
    s_ptr, t_ptr, labels_ptr, row_stats_ptr, col_stats_ptr,
    N, V, stride_s, stride_sc, stride_t, stride_tc,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per block of columns: reads those columns of every row, in row order (deterministic); writes
    col_stats[col] = (mean q_s, mean q_t, M2_s, M2_t, C_st) over the counted rows."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    inv_t = 1.0 / tl.full((), temperature, ACC)
    n = tl.zeros((BLOCK_C,), ACC)
    mean_s = tl.zeros((BLOCK_C,), ACC)
    mean_t = tl.zeros((BLOCK_C,), ACC)
    m2_s = tl.zeros((BLOCK_C,), ACC)
    m2_t = tl.zeros((BLOCK_C,), ACC)
    c_st = tl.zeros((BLOCK_C,), ACC)
    for start in range(0, N, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok, m_s, l_s, m_t, l_t = _counted_rows(labels_ptr, row_stats_ptr, row_stats_ptr + 2, rows, N,
                                                   ignore_index, HAS_LABELS)
        q_s, q_t, mask = _tile(s_ptr, t_ptr, rows, cols, row_ok, m_s, l_s, m_t, l_t, V, stride_s, stride_sc, stride_t,
                               stride_tc, inv_t, ACC)
        n, mean_s, mean_t, m2_s, m2_t, c_st = chan_merge(n, mean_s, mean_t, m2_s, m2_t, c_st,
                                                         tl.sum(mask.to(ACC), 0), q_s, q_t, mask, 0)
    base = col_stats_ptr + COL_STATS * cols
    ok = cols < V
    tl.store(base, mean_s, mask=ok)
    tl.store(base + 1, mean_t, mask=ok)
    tl.store(base + 2, m2_s, mask=ok)
    tl.store(base + 3, m2_t, mask=ok)
    tl.store(base + 4, c_st, mask=ok)


@triton.jit
def _grad_p(q_x, q_o, r1, r2, cols, col_coef_ptr, V):
    """G = dL/dp_x on a tile: r1 q_o + r2 q_x + k1 (q_o - mean_o) + k2 (q_x - mean_x) (coefficients
    [N, 3] rows: r1, r2, R; [V, 4] columns: k1, k2, mean_o, mean_x)."""
    col_ok = cols < V
    k1 = tl.load(col_coef_ptr + 4 * cols, mask=col_ok, other=0.0)
    k2 = tl.load(col_coef_ptr + 4 * cols + 1, mask=col_ok, other=0.0)
    mean_o = tl.load(col_coef_ptr + 4 * cols + 2, mask=col_ok, other=0.0)
    mean_x = tl.load(col_coef_ptr + 4 * cols + 3, mask=col_ok, other=0.0)
    return (r1[:, None] * q_o + r2[:, None] * q_x + k1[None, :] * (q_o - mean_o[None, :])
            + k2[None, :] * (q_x - mean_x[None, :]))


@triton.jit
def dist_rowdot_kernel(
    x_ptr, o_ptr, labels_ptr, c_x_ptr, c_o_ptr, row_coef_ptr, col_coef_ptr,
    N, V, stride_x, stride_xc, stride_o, stride_oc,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per tile of rows: reads both rows once; writes row_coef[row, 2] = R = sum_k p_x,k G_k.

    x is the tensor differentiated, o the other one; c_x_ptr, c_o_ptr point at their c in the row statistics."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    inv_t = 1.0 / tl.full((), temperature, ACC)
    row_ok, m_x, l_x, m_o, l_o = _counted_rows(labels_ptr, c_x_ptr, c_o_ptr, rows, N, ignore_index, HAS_LABELS)
    r1 = tl.load(row_coef_ptr + 3 * rows, mask=row_ok, other=0.0)
    r2 = tl.load(row_coef_ptr + 3 * rows + 1, mask=row_ok, other=0.0)
    total = tl.zeros((BLOCK_R,), ACC)
    for start in range(0, V, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        q_x, q_o, mask = _tile(x_ptr, o_ptr, rows, cols, row_ok, m_x, l_x, m_o, l_o, V, stride_x, stride_xc,
                               stride_o, stride_oc, inv_t, ACC)
        g = _grad_p(q_x, q_o, r1, r2, cols, col_coef_ptr, V)
        total += tl.sum(tl.where(mask, (1.0 + q_x) * g, 0.0), 1)  # p = (1 + q) / V
    tl.store(row_coef_ptr + 3 * rows + 2, total / V, mask=rows < N)


@triton.jit
def dist_grad_kernel(
    x_ptr, o_ptr, labels_ptr, c_x_ptr, c_o_ptr, row_coef_ptr, col_coef_ptr, grad_ptr,
    N, V, stride_x, stride_xc, stride_o, stride_oc,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per tile of rows: reads both rows once; writes dL/dx = p_x (G - R) (zeros in ignored rows), contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    inv_t = 1.0 / tl.full((), temperature, ACC)
    row_ok, m_x, l_x, m_o, l_o = _counted_rows(labels_ptr, c_x_ptr, c_o_ptr, rows, N, ignore_index, HAS_LABELS)
    r1 = tl.load(row_coef_ptr + 3 * rows, mask=row_ok, other=0.0)
    r2 = tl.load(row_coef_ptr + 3 * rows + 1, mask=row_ok, other=0.0)
    r = tl.load(row_coef_ptr + 3 * rows + 2, mask=row_ok, other=0.0)
    for start in range(0, V, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        q_x, q_o, mask = _tile(x_ptr, o_ptr, rows, cols, row_ok, m_x, l_x, m_o, l_o, V, stride_x, stride_xc,
                               stride_o, stride_oc, inv_t, ACC)
        g = _grad_p(q_x, q_o, r1, r2, cols, col_coef_ptr, V)
        dx = tl.where(mask, (1.0 + q_x) * (g - r[:, None]) / V, 0.0)
        out = rows[:, None] * V + cols[None, :]
        tl.store(grad_ptr + out, dx.to(grad_ptr.dtype.element_ty), mask=(rows < N)[:, None] & (cols < V)[None, :])


def _columns_block(V):
    return min(max(triton.next_power_of_2(V), 16), 64)


def dist_stats(s, t, labels, temperature, ignore_index):
    """Row statistics [N, 7] (m_s, l_s, m_t, l_t, S_ss, S_tt, S_st) and column statistics [V, 5] (mean q_s, mean q_t,
    M2_s, M2_t, C_st over the counted rows) of two logit tensors [..., V]."""
    s2, t2 = as_rows(s), as_rows(t)
    N, V = s2.shape
    acc = acc_dtype(s.dtype, t.dtype)
    row_stats = torch.empty(N, ROW_STATS.value, dtype=acc, device=s.device)
    col_stats = torch.empty(V, COL_STATS.value, dtype=acc, device=s.device)
    lab = labels.reshape(-1) if labels is not None else row_stats
    common = dict(HAS_LABELS=labels is not None, ACC=tl_acc_dtype(s.dtype, t.dtype))
    if N:
        block, num_warps = block_config(V, s.dtype, t.dtype)
        dist_row_stats_kernel[(N,)](
            s2, t2, lab, row_stats, V, s2.stride(0), s2.stride(1), t2.stride(0), t2.stride(1),
            float(temperature), ignore_index, UNIT_S=s2.stride(1) == 1, UNIT_T=t2.stride(1) == 1,
            BLOCK=block, num_warps=num_warps, **common,
        )
    block_c = _columns_block(V)
    dist_column_stats_kernel[(triton.cdiv(V, block_c),)](
        s2, t2, lab, row_stats, col_stats, N, V, s2.stride(0), s2.stride(1), t2.stride(0), t2.stride(1),
        float(temperature), ignore_index, BLOCK_R=BLOCK_R, BLOCK_C=block_c, **common,
    )
    return row_stats, col_stats


def dist_grad(x, o, labels, row_stats, x_index, row_coef, col_coef, temperature, ignore_index):
    """dL/dx for x in (student, teacher) (x_index 0 or 1), o the other logits:
    row_coef [N, 3] (r1, r2, filled with R here) and col_coef [V, 4] (k1, k2, mean_o, mean_x) give G = dL/dp_x."""
    x2, o2 = as_rows(x), as_rows(o)
    N, V = x2.shape
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0:
        return grad
    args = (x2, o2, labels.reshape(-1) if labels is not None else row_stats, row_stats[:, 2 * x_index],
            row_stats[:, 2 - 2 * x_index], row_coef, col_coef)
    sizes = (N, V, x2.stride(0), x2.stride(1), o2.stride(0), o2.stride(1), float(temperature), ignore_index)
    meta = dict(HAS_LABELS=labels is not None, ACC=tl_acc_dtype(x.dtype, o.dtype), BLOCK_R=BLOCK_R,
                BLOCK_C=_columns_block(V))
    grid = (triton.cdiv(N, BLOCK_R),)
    dist_rowdot_kernel[grid](*args, *sizes, **meta)
    dist_grad_kernel[grid](*args, grad, *sizes, **meta)
    return grad
