"""Decoupled knowledge distillation (Zhao et al. 2022), from raw logits and a target class y per row.

With s, t the student and teacher logits over T, lse the full logsumexp and lse' the logsumexp
without column y (masked exactly, not by an offset):
    binary split   log b_y = x_y - lse = -softplus(lse' - x_y),   log b_o = lse' - lse = -softplus(x_y - lse')
    TCKD = sum_{k in y, o} bt_k (log bt_k - log bs_k)
    NCKD = KL(p't || p's),  p' = softmax over the columns j != y
    loss = T^2 (alpha TCKD + beta NCKD)
Nothing takes the log of a probability that can underflow.  Forward reads both rows once (the
online KL pass of kl.py with column y skipped, plus the two target logits) and writes the loss and
the statistics (lse'_s, lse'_t, each as m + log z, log bs_y, log bs_o, log bt_y, log bt_o, NCKD).  Backward re-reads
both rows once and writes, with g the row's incoming gradient and r_k = log bt_k - log bs_k,
    dL/ds_y = g T alpha (bs_y - bt_y)
    dL/ds_j = g T [alpha p's_j (bs_o - bt_o) + beta (p's_j - p't_j)]                               (j != y)
    dL/dt_y = g T alpha bt_y bt_o (r_y - r_o)
    dL/dt_j = g T [alpha bt_y bt_o p't_j (r_o - r_y) + beta p't_j (log p't_j - log p's_j - NCKD)]  (j != y)
A row whose target is ignore_index counts for nothing (zero loss and gradient); a target outside
[0, V) gives a NaN row (never an out-of-bounds read).
"""
import triton
import triton.language as tl

from .common import load_scaled, log1p, pair_backward, pair_forward, row_offsets
from .kl import online_kl

N_STATS = tl.constexpr(9)  # per row: m'_s, log z'_s, m'_t, log z'_t, log bs_y, log bs_o, log bt_y, log bt_o, NCKD


@triton.jit
def softplus(x):
    """log(1 + exp(x)), accurate for every x."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _target(target_ptr, row, V, ignore_index):
    """(y clamped into [0, V), whether the row counts, whether its target is outside [0, V))."""
    y = tl.load(target_ptr + row).to(tl.int64)
    counted = y != ignore_index
    bad = counted & ((y < 0) | (y >= V))
    return tl.where(bad | ~counted, 0, y), counted, bad


@triton.jit
def dkd_forward_kernel(
    s_ptr, t_ptr, target_ptr, loss_ptr, stats_ptr,
    V, stride_s, stride_sc, stride_t, stride_tc,
    alpha: tl.float64, beta: tl.float64, temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, UNIT_S: tl.constexpr, UNIT_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads both rows once and their target logits; writes loss[row] and stats[row] (7 values).

    HAS_LABELS is always true here: the target is the label.
    """
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    y, counted, bad = _target(target_ptr, row, V, ignore_index)
    n = tl.where(counted & ~bad, V, 0)
    # NCKD: KL(p't || p's) over the columns j != y, with the masked logsumexps lse'_t, lse'_s
    m_mt, lz_mt, m_ms, lz_ms, nckd = online_kl(t_ptr, s_ptr, row, n, V, stride_t, stride_tc, stride_s, stride_sc, inv_t, y,
                                     True, UNIT_T, UNIT_S, ACC, BLOCK)
    s_y = tl.load(s_ptr + row_offsets(row, stride_s, y, stride_sc, UNIT_S)).to(ACC) * inv_t
    t_y = tl.load(t_ptr + row_offsets(row, stride_t, y, stride_tc, UNIT_T)).to(ACC) * inv_t
    # binary split [target, others] in log space
    log_bs_y = -softplus((m_ms - s_y) + lz_ms)
    log_bs_o = -softplus((s_y - m_ms) - lz_ms)
    log_bt_y = -softplus((m_mt - t_y) + lz_mt)
    log_bt_o = -softplus((t_y - m_mt) - lz_mt)
    bt_y = tl.exp(log_bt_y)
    bt_o = tl.exp(log_bt_o)
    tckd = tl.where(bt_y > 0, bt_y * (log_bt_y - log_bs_y), 0.0) + tl.where(bt_o > 0, bt_o * (log_bt_o - log_bs_o), 0.0)
    tckd = tl.maximum(tckd, 0.0)
    nckd = tl.maximum(nckd, 0.0)
    loss = temp * temp * (tl.full((), alpha, ACC) * tckd + tl.full((), beta, ACC) * nckd)
    loss = tl.where(bad, float("nan"), tl.where(counted, loss, 0.0))
    tl.store(loss_ptr + row, loss)
    base = stats_ptr + N_STATS * row
    keep = counted & ~bad
    tl.store(base, tl.where(keep, m_ms, 0.0))
    tl.store(base + 1, tl.where(keep, lz_ms, 0.0))
    tl.store(base + 2, tl.where(keep, m_mt, 0.0))
    tl.store(base + 3, tl.where(keep, lz_mt, 0.0))
    tl.store(base + 4, tl.where(keep, log_bs_y, 0.0))
    tl.store(base + 5, tl.where(keep, log_bs_o, 0.0))
    tl.store(base + 6, tl.where(keep, log_bt_y, 0.0))
    tl.store(base + 7, tl.where(keep, log_bt_o, 0.0))
    tl.store(base + 8, tl.where(bad, float("nan"), tl.where(keep, nckd, 0.0)))


@triton.jit
def dkd_backward_kernel(
    s_ptr, t_ptr, target_ptr, stats_ptr, grad_loss_ptr, grad_s_ptr, grad_t_ptr,
    V, stride_s, stride_sc, stride_t, stride_tc, stride_g,
    alpha: tl.float64, beta: tl.float64, temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    UNIT_S: tl.constexpr, UNIT_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: re-reads both rows once; writes dL/ds and/or dL/dt (formulas in the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    a = tl.full((), alpha, ACC)
    b = tl.full((), beta, ACC)
    y, counted, bad = _target(target_ptr, row, V, ignore_index)
    n = tl.where(counted & ~bad, V, 0)
    base = stats_ptr + N_STATS * row
    m_ms, lz_ms, m_mt, lz_mt = tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)
    log_bs_y = tl.load(base + 4)
    log_bs_o = tl.load(base + 5)
    log_bt_y = tl.load(base + 6)
    log_bt_o = tl.load(base + 7)
    nckd = tl.load(base + 8)
    bs_y = tl.exp(log_bs_y)
    bs_o = tl.exp(log_bs_o)
    bt_y = tl.exp(log_bt_y)
    bt_o = tl.exp(log_bt_o)
    # teacher's binary term bt_y bt_o (r_y - r_o); zero when either side of the split has no mass
    bt_yo = bt_y * bt_o
    r_diff = tl.where(bt_yo > 0, (log_bt_y - log_bs_y) - (log_bt_o - log_bs_o), 0.0)
    g = tl.load(grad_loss_ptr + row * stride_g).to(ACC) * temp
    g = tl.where(bad, float("nan"), tl.where(counted, g, 0.0))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        s = load_scaled(s_ptr, row, stride_s, cols, stride_sc, cols < n, inv_t, UNIT_S, ACC)
        t = load_scaled(t_ptr, row, stride_t, cols, stride_tc, cols < n, inv_t, UNIT_T, ACC)
        is_y = cols == y
        log_ps = tl.where(is_y, float("-inf"), (s - m_ms) - lz_ms)  # log p's_j, j != y
        log_pt = tl.where(is_y, float("-inf"), (t - m_mt) - lz_mt)
        ps = tl.exp(log_ps)
        pt = tl.exp(log_pt)
        out = row * V + cols
        if GRAD_S:
            ds = tl.where(is_y, a * (bs_y - bt_y), a * ps * (bs_o - bt_o) + b * (ps - pt))
            tl.store(grad_s_ptr + out, (g * ds).to(grad_s_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            nckd_t = tl.where(pt > 0, pt * (log_pt - log_ps - nckd), 0.0)
            dt = tl.where(is_y, a * bt_yo * r_diff, -a * bt_yo * pt * r_diff + b * nckd_t)
            tl.store(grad_t_ptr + out, (g * dt).to(grad_t_ptr.dtype.element_ty), mask=mask)


def dkd_rows(s, t, target, alpha, beta, temperature, ignore_index):
    """Row losses T^2 (alpha TCKD + beta NCKD) of logits `s`, `t` ([..., V]) -> (loss [N], stats [N, 9])."""
    return pair_forward(dkd_forward_kernel, s, t, target, ignore_index, N_STATS.value,
                        (float(alpha), float(beta), float(temperature)))


def dkd_rows_backward(grad_loss, s, t, stats, target, alpha, beta, temperature, ignore_index, grad_s, grad_t):
    """Gradients (dL/ds, dL/dt) of the row losses, each shaped like its input, or None where not asked."""
    return pair_backward(dkd_backward_kernel, grad_loss, s, t, stats, target, ignore_index, grad_s, grad_t,
                         (float(alpha), float(beta), float(temperature)))
