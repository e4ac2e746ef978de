"""KL divergence between two temperature softmaxes, from raw logits.

Both directions use one pair of kernels written for KL(P || Q), where P is the weighting
distribution: forward KL(p_t || p_s) passes (P, Q) = (teacher, student), reverse KL(p_s || p_t)
passes (student, teacher).  With a = x_P / T and b = x_Q / T:

    KL = sum_j p_j (a_j - b_j) - lse(a) + lse(b)

Forward reads each row once (online softmax for both rows, plus A = sum exp(a - m_a)(a - b) under
the same rescaling) and writes, per row, the loss T^2 KL and the statistics (m_a, log z_a, m_b,
log z_b, KL), lse = m + log z kept in two parts so that log p = (a - m) - log z stays exact.
Backward re-reads both rows once and writes the gradients
    dL/dx_Q = g T (q - p),        dL/dx_P = g T p (log p - log q - KL),
g being the incoming gradient of the row's loss.
"""
import triton
import triton.language as tl

from .common import counted_length, load_scaled, online_lse_update, pair_backward, pair_forward

N_STATS = tl.constexpr(5)  # per row: m_p, log z_p, m_q, log z_q, KL


@triton.jit
def online_kl(p_ptr, q_ptr, row, n, V, stride_p, stride_pc, stride_q, stride_qc, inv_t, skip_col,
              SKIP: tl.constexpr, UNIT_P: tl.constexpr, UNIT_Q: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One online pass over the first n columns of both rows -> (m_a, log z_a, m_b, log z_b, KL(softmax a || softmax b)).

    lse = m + log z is kept in two parts: log p = (x - m) - log z rounds at the size of log z, not of lse.

    With SKIP, column `skip_col` is left out of both rows (DKD's non-target distributions).
    Keeps, under the online-softmax rescaling, A = sum exp(a - m_a) (a - b); then
    KL = A / Z_a + lse(b) - lse(a), the lse difference taken as one log of a ratio (no cancellation
    between two large logsumexps).
    """
    m_a = tl.full((), float("-inf"), ACC)
    m_b = tl.full((), float("-inf"), ACC)
    z_a = tl.zeros((), ACC)
    z_b = tl.zeros((), ACC)
    acc = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        a = load_scaled(p_ptr, row, stride_p, cols, stride_pc, mask, inv_t, UNIT_P, ACC)
        b = load_scaled(q_ptr, row, stride_q, cols, stride_qc, mask, inv_t, UNIT_Q, ACC)
        if SKIP:  # after the load, so that the load keeps its 128-bit vectors
            a = tl.where(cols == skip_col, float("-inf"), a)
            b = tl.where(cols == skip_col, float("-inf"), b)
        m_a, z_a, alpha, e_a = online_lse_update(m_a, z_a, a)
        m_b, z_b, _, _ = online_lse_update(m_b, z_b, b)
        # p_j = 0 terms contribute nothing (also where a = b = -inf or the lane is masked)
        acc = acc * alpha + tl.sum(tl.where(e_a > 0, e_a * (a - b), 0.0), 0)
    kl = acc / z_a + (m_b - m_a) + tl.log(z_b / z_a)
    return m_a, tl.log(z_a), m_b, tl.log(z_b), kl


@triton.jit
def kl_forward_kernel(
    p_ptr, q_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, stride_p, stride_pc, stride_q, stride_qc,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, UNIT_P: tl.constexpr, UNIT_Q: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: reads V logits of P and of Q once; writes loss[row] = T^2 KL and
    stats[row] = (m_a, log z_a, m_b, log z_b, KL)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    m_a, lz_a, m_b, lz_b, kl = online_kl(p_ptr, q_ptr, row, n, V, stride_p, stride_pc, stride_q, stride_qc, inv_t,
                                         -1, False, UNIT_P, UNIT_Q, ACC, BLOCK)
    kl = tl.where(active, tl.maximum(kl, 0.0), 0.0)
    tl.store(loss_ptr + row, kl * temp * temp)
    base = stats_ptr + N_STATS * row
    tl.store(base, tl.where(active, m_a, 0.0))
    tl.store(base + 1, tl.where(active, lz_a, 0.0))
    tl.store(base + 2, tl.where(active, m_b, 0.0))
    tl.store(base + 3, tl.where(active, lz_b, 0.0))
    tl.store(base + 4, kl)


@triton.jit
def kl_backward_kernel(
    p_ptr, q_ptr, labels_ptr, stats_ptr, grad_loss_ptr, grad_p_ptr, grad_q_ptr,
    V, stride_p, stride_pc, stride_q, stride_qc, stride_g,
    temperature: tl.float64, ignore_index,
    HAS_LABELS: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    UNIT_P: tl.constexpr, UNIT_Q: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: re-reads V logits of P and Q; writes dL/dx_Q = g T (q - p) and/or dL/dx_P = g T p (log p - log q - KL).

    Gradients are contiguous [N, V]; ignored rows get zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    base = stats_ptr + N_STATS * row
    m_a, lz_a, m_b, lz_b, kl = tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)
    g = tl.load(grad_loss_ptr + row * stride_g).to(ACC) * temp
    g = tl.where(active, g, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        load_mask = cols < n
        log_p = (load_scaled(p_ptr, row, stride_p, cols, stride_pc, load_mask, inv_t, UNIT_P, ACC) - m_a) - lz_a
        log_q = (load_scaled(q_ptr, row, stride_q, cols, stride_qc, load_mask, inv_t, UNIT_Q, ACC) - m_b) - lz_b
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        out = row * V + cols
        if GRAD_Q:
            tl.store(grad_q_ptr + out, (g * (q - p)).to(grad_q_ptr.dtype.element_ty), mask=mask)
        if GRAD_P:
            dp = tl.where(p > 0, g * p * (log_p - log_q - kl), 0.0)
            tl.store(grad_p_ptr + out, dp.to(grad_p_ptr.dtype.element_ty), mask=mask)


def kl_div_rows(p, q, temperature, labels, ignore_index):
    """Row losses T^2 KL(P || Q) of logits `p`, `q` ([..., V]) -> (loss [N], stats [N, 5])."""
    return pair_forward(kl_forward_kernel, p, q, labels, ignore_index, N_STATS.value, (float(temperature),))


def kl_div_rows_backward(grad_loss, p, q, stats, temperature, labels, ignore_index, grad_p, grad_q):
    """Gradients (dL/dp, dL/dq) of the row losses, each shaped like its input, or None where not asked."""
    return pair_backward(kl_backward_kernel, grad_loss, p, q, stats, labels, ignore_index, grad_p, grad_q,
                         (float(temperature),))
