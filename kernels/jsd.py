"""Generalized Jensen-Shannon divergence (TRL's beta convention), from raw logits.

With log p_s, log p_t the temperature log-softmaxes and the mixture m = (1 - beta) p_s + beta p_t:

    JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m),   0 < beta < 1

(beta = 0 and 1 are forward and reverse KL: the host sends them to the KL kernels).
Forward reads both rows twice: an online pass for the two logsumexps (the mixture needs both
normalizers), then a pass that sums the two KLs.  It writes the loss T^2 JSD and the statistics
(m_s, log z_s, m_t, log z_t, KL(p_s || m), KL(p_t || m)).  Backward re-reads both rows once and writes
    dL/dx_s = g T (1 - beta) p_s (log p_s - log m - KL(p_s || m)),
    dL/dx_t = g T beta p_t (log p_t - log m - KL(p_t || m)).
"""
import triton
import triton.language as tl

from .common import counted_length, load_scaled, log1p, online_lse_update, pair_backward, pair_forward

N_STATS = tl.constexpr(6)  # per row: m_s, log z_s, m_t, log z_t, KL(p_s || m), KL(p_t || m)


@triton.jit
def _log_probs_and_mixture(s_ptr, t_ptr, row, cols, mask, stride_s, stride_sc, stride_t, stride_tc,
                           inv_t, m_s, lz_s, m_t, lz_t, beta, UNIT_S: tl.constexpr, UNIT_T: tl.constexpr,
                           ACC: tl.constexpr):
    """log p_s, log p_t, p_s, p_t and log m for one block of columns.

    log m = log((1 - beta) p_s + beta p_t) where that mixture is a normal number; below, where the
    probabilities underflow or are subnormal, logaddexp(log(1 - beta) + log p_s, log beta + log p_t)
    keeps it finite; where p_s = p_t, log m = log p_s exactly (JSD of identical rows is 0).
    """
    log_ps = (load_scaled(s_ptr, row, stride_s, cols, stride_sc, mask, inv_t, UNIT_S, ACC) - m_s) - lz_s
    log_pt = (load_scaled(t_ptr, row, stride_t, cols, stride_tc, mask, inv_t, UNIT_T, ACC) - m_t) - lz_t
    ps = tl.exp(log_ps)
    pt = tl.exp(log_pt)
    m = (1.0 - beta) * ps + beta * pt
    a = log_ps + tl.log(1.0 - beta)
    b = log_pt + tl.log(beta)
    hi = tl.maximum(a, b)
    tiny = tl.where(hi == float("-inf"), hi, hi + log1p(tl.exp(tl.minimum(a, b) - hi)))
    log_m = tl.where(log_ps == log_pt, log_ps, tl.where(m > 1e-30, tl.log(m), tiny))
    return log_ps, log_pt, ps, pt, log_m


@triton.jit
def jsd_forward_kernel(
    s_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, stride_s, stride_sc, stride_t, stride_tc,
    beta: tl.float64, temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, UNIT_S: tl.constexpr, UNIT_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads both rows twice; writes loss[row] = T^2 JSD and
    stats[row] = (m_s, log z_s, m_t, log z_t, KL(p_s||m), KL(p_t||m))."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    w = tl.full((), beta, ACC)
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    m_s = tl.full((), float("-inf"), ACC)
    m_t = tl.full((), float("-inf"), ACC)
    z_s = tl.zeros((), ACC)
    z_t = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        s = load_scaled(s_ptr, row, stride_s, cols, stride_sc, mask, inv_t, UNIT_S, ACC)
        t = load_scaled(t_ptr, row, stride_t, cols, stride_tc, mask, inv_t, UNIT_T, ACC)
        m_s, z_s, _, _ = online_lse_update(m_s, z_s, s)
        m_t, z_t, _, _ = online_lse_update(m_t, z_t, t)
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    kl_sm = tl.zeros((), ACC)
    kl_tm = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        log_ps, log_pt, ps, pt, log_m = _log_probs_and_mixture(
            s_ptr, t_ptr, row, cols, mask, stride_s, stride_sc, stride_t, stride_tc,
            inv_t, m_s, lz_s, m_t, lz_t, w, UNIT_S, UNIT_T, ACC)
        # terms with p = 0 vanish (0 log 0 = 0), also where m underflows with them
        kl_sm += tl.sum(tl.where(ps > 0, ps * (log_ps - log_m), 0.0), 0)
        kl_tm += tl.sum(tl.where(pt > 0, pt * (log_pt - log_m), 0.0), 0)
    kl_sm = tl.where(active, tl.maximum(kl_sm, 0.0), 0.0)
    kl_tm = tl.where(active, tl.maximum(kl_tm, 0.0), 0.0)
    tl.store(loss_ptr + row, (w * kl_tm + (1.0 - w) * kl_sm) * temp * temp)
    base = stats_ptr + N_STATS * row
    tl.store(base, tl.where(active, m_s, 0.0))
    tl.store(base + 1, tl.where(active, lz_s, 0.0))
    tl.store(base + 2, tl.where(active, m_t, 0.0))
    tl.store(base + 3, tl.where(active, lz_t, 0.0))
    tl.store(base + 4, kl_sm)
    tl.store(base + 5, kl_tm)


@triton.jit
def jsd_backward_kernel(
    s_ptr, t_ptr, labels_ptr, stats_ptr, grad_loss_ptr, grad_s_ptr, grad_t_ptr,
    V, stride_s, stride_sc, stride_t, stride_tc, stride_g,
    beta: tl.float64, temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    UNIT_S: tl.constexpr, UNIT_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: re-reads both rows once; writes dL/dx_s and/or dL/dx_t (formulas in the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    w = tl.full((), beta, ACC)
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    base = stats_ptr + N_STATS * row
    m_s, lz_s, m_t, lz_t = tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)
    kl_sm = tl.load(base + 4)
    kl_tm = tl.load(base + 5)
    g = tl.load(grad_loss_ptr + row * stride_g).to(ACC) * temp
    g = tl.where(active, g, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        log_ps, log_pt, ps, pt, log_m = _log_probs_and_mixture(
            s_ptr, t_ptr, row, cols, cols < n, stride_s, stride_sc, stride_t, stride_tc,
            inv_t, m_s, lz_s, m_t, lz_t, w, UNIT_S, UNIT_T, ACC)
        out = row * V + cols
        if GRAD_S:
            ds = tl.where(ps > 0, g * (1.0 - w) * ps * (log_ps - log_m - kl_sm), 0.0)
            tl.store(grad_s_ptr + out, ds.to(grad_s_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            dt = tl.where(pt > 0, g * w * pt * (log_pt - log_m - kl_tm), 0.0)
            tl.store(grad_t_ptr + out, dt.to(grad_t_ptr.dtype.element_ty), mask=mask)


def jsd_rows(s, t, beta, temperature, labels, ignore_index):
    """Row losses T^2 JSD_beta of logits `s`, `t` ([..., V]) -> (loss [N], stats [N, 6])."""
    return pair_forward(jsd_forward_kernel, s, t, labels, ignore_index, N_STATS.value,
                        (float(beta), float(temperature)))


def jsd_rows_backward(grad_loss, s, t, stats, beta, temperature, labels, ignore_index, grad_s, grad_t):
    """Gradients (dL/ds, dL/dt) of the row losses, each shaped like its input, or None where not asked."""
    return pair_backward(jsd_backward_kernel, grad_loss, s, t, stats, labels, ignore_index, grad_s, grad_t,
                         (float(beta), float(temperature)))
