"""KL, reverse KL and JSD between a full student row and a teacher known at K ids only (top-k distillation).

The teacher gives K (id, value) pairs per row; a pair whose value is -inf is padding (its id is never read).
Both sides are compared over buckets: each support id is a bucket and, with a tail, one more bucket holds
the mass outside the support.  With a = x / T:
    tail:        P_k = softmax(a)[id_k],  P_tail = 1 - sum_k P_k  (lse over the full row)
                 Q_k = exp(value_k),      Q_tail = 1 - sum_k Q_k  (values are log-probs)
    renormalize: P_k = softmax_k(a[id_k]), Q_k = softmax_k(value_k [/ T for logits])  (lse over the support)
D(P, Q) over the buckets is forward KL sum Q log(Q / P), reverse KL sum P log(P / Q), or
JSD_beta = beta KL(Q || M) + (1 - beta) KL(P || M), M = (1 - beta) P + beta Q; the row loss is T^2 D.

Backward: with g_B = dD/dP_B and C = sum_B P_B g_B, the softmax chain rule gives, for column j in bucket B
(p_j its probability in the softmax that defines P),
    dD/da_j = p_j (g_B - C)
so every column outside the support gets p_j (g_tail - C) (0 with renormalize: P ignores it), and a
support id gets P_k g_k - P_k C.  The forward stores (m, log z) of the student softmax, the teacher's
support lse, C and f_tail = g_tail - C per row; the backward writes the dense value over the row, then
overwrites the K support ids (ids are assumed distinct apart from padding).
An id outside [0, V) with a finite value makes the row's loss NaN (no out-of-bounds read).
"""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, as_rows, block_config, counted_length, load_scaled, log1p, online_lse_update, \
    row_offsets, tl_acc_dtype

N_STATS = tl.constexpr(5)  # per row: m, log z (student softmax), teacher support lse, C, f_tail
FORWARD, REVERSE, JSD = 0, 1, 2
MAX_KBLOCK = 1024


@triton.jit
def load_support(s_ptr, ids_ptr, values_ptr, row, k, K, V, stride_s, stride_sc, stride_i, stride_ic,
                 stride_v, stride_vc, inv_t, LOGITS: tl.constexpr, UNIT_S: tl.constexpr, ACC: tl.constexpr):
    """Pairs k of `row` -> (student a at the ids, teacher log-mass before normalisation, valid, bad, id).

    valid: inside K (0 for an ignored row), not padding (value -inf); bad: valid with an id outside [0, V)."""
    in_k = k < K
    value = tl.load(values_ptr + row * stride_v + k.to(tl.int64) * stride_vc, mask=in_k, other=float("-inf")).to(ACC)
    idx = tl.load(ids_ptr + row * stride_i + k.to(tl.int64) * stride_ic, mask=in_k, other=0).to(tl.int64)
    valid = value != float("-inf")
    in_range = (idx >= 0) & (idx < V)
    a = tl.load(s_ptr + row_offsets(row, stride_s, idx, stride_sc, UNIT_S), mask=valid & in_range,
                other=float("-inf")).to(ACC) * inv_t
    if LOGITS:
        value = value * inv_t
    return a, value, valid, valid & ~in_range, idx


@triton.jit
def bucket_terms(log_p, log_q, beta, MODE: tl.constexpr):
    """Per bucket: (its term of D, P g = P dD/dP); 0 log 0 = 0."""
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if MODE == 0:  # forward KL: Q log(Q/P); g = -Q/P
        return tl.where(q > 0, q * (log_q - log_p), 0.0), -q
    elif MODE == 1:  # reverse KL: P log(P/Q); g = log(P/Q) + 1 (the 1 cancels in g - C)
        term = tl.where(p > 0, p * (log_p - log_q), 0.0)
        return term, term
    else:  # JSD: log M by logaddexp of log((1 - beta) P) and log(beta Q); g = (1 - beta) log(P/M)
        lp = log_p + tl.log(1.0 - beta)
        lq = log_q + tl.log(beta)
        top = tl.maximum(lp, lq)
        top = tl.where(top == float("-inf"), 0.0, top)
        log_m = top + tl.log(tl.exp(lp - top) + tl.exp(lq - top))
        ps = tl.where(p > 0, (1.0 - beta) * p * (log_p - log_m), 0.0)
        return tl.where(q > 0, beta * q * (log_q - log_m), 0.0) + ps, ps


@triton.jit
def sparse_kl_forward_kernel(
    s_ptr, ids_ptr, values_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, K, stride_s, stride_sc, stride_i, stride_ic, stride_v, stride_vc,
    temperature: tl.float64, beta: tl.float64, ignore_index,
    MODE: tl.constexpr, TAIL: tl.constexpr, LOGITS: tl.constexpr, HAS_LABELS: tl.constexpr, UNIT_S: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    """Per row: reads the V student logits once (tail only), the K pairs twice and the K gathered logits twice;
    writes loss[row] = T^2 D and stats[row] = (m, log z, lse_q, C, f_tail)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    beta = tl.full((), beta, ACC)
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    K = tl.where(active, K, 0)  # an ignored row has no pairs
    m_s = tl.full((), float("-inf"), ACC)
    z_s = tl.zeros((), ACC)
    if TAIL:  # the student's lse over the full row
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            a = load_scaled(s_ptr, row, stride_s, cols, stride_sc, cols < n, inv_t, UNIT_S, ACC)
            m_s, z_s, _, _ = online_lse_update(m_s, z_s, a)
    # pass 1 over the pairs: the support's student mass (tail) or both supports' lse (renormalize)
    m_q = tl.full((), float("-inf"), ACC)
    z_q = tl.zeros((), ACC)
    mass_s = tl.zeros((), ACC)
    count = tl.zeros((), tl.int32)
    bad = tl.zeros((), tl.int32)
    for k0 in range(0, K, KBLOCK):
        k = k0 + tl.arange(0, KBLOCK)
        a, lq, valid, bad_k, _ = load_support(s_ptr, ids_ptr, values_ptr, row, k, K, V, stride_s, stride_sc,
                                              stride_i, stride_ic, stride_v, stride_vc, inv_t, LOGITS, UNIT_S, ACC)
        count += tl.sum(valid.to(tl.int32), 0)
        bad += tl.sum(bad_k.to(tl.int32), 0)
        if TAIL:
            mass_s += tl.sum(tl.where(valid, tl.exp(a - m_s), 0.0), 0)
            z_q += tl.sum(tl.where(valid, tl.exp(lq), 0.0), 0)
        else:
            m_s, z_s, _, _ = online_lse_update(m_s, z_s, tl.where(valid, a, float("-inf")))
            m_q, z_q, _, _ = online_lse_update(m_q, z_q, tl.where(valid, lq, float("-inf")))
    lz_s = tl.log(z_s)
    lse_q = tl.where(m_q == float("-inf"), 0.0, m_q + tl.log(z_q))  # 0 for log-probs with a tail: Q_k = exp(value)
    # pass 2: the divergence over the support buckets and C = sum P g
    loss = tl.zeros((), ACC)
    c = tl.zeros((), ACC)
    for k0 in range(0, K, KBLOCK):
        k = k0 + tl.arange(0, KBLOCK)
        a, lq, valid, _, _ = load_support(s_ptr, ids_ptr, values_ptr, row, k, K, V, stride_s, stride_sc,
                                          stride_i, stride_ic, stride_v, stride_vc, inv_t, LOGITS, UNIT_S, ACC)
        term, pg = bucket_terms((a - m_s) - lz_s, lq - lse_q, beta, MODE)
        loss += tl.sum(tl.where(valid, term, 0.0), 0)
        c += tl.sum(tl.where(valid, pg, 0.0), 0)
    f_tail = tl.zeros((), ACC)
    if TAIL:  # the tail bucket: log(1 - sum), log1p-accurate; empty when the support covers the row
        empty = count >= V
        log_p_tail = tl.where(empty, float("-inf"), log1p(-tl.minimum(mass_s / z_s, 1.0)))
        log_q_tail = tl.where(empty, float("-inf"), log1p(-tl.minimum(z_q, 1.0)))
        term, pg = bucket_terms(log_p_tail, log_q_tail, beta, MODE)
        loss += term
        c += pg
        p_tail = tl.exp(log_p_tail)
        f_tail = tl.where(p_tail > 0, pg / tl.where(p_tail > 0, p_tail, 1.0) - c, 0.0)
    loss = tl.where(bad > 0, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(active, loss * temp * temp, 0.0))
    base = stats_ptr + N_STATS * row
    tl.store(base, tl.where(active, m_s, 0.0))
    tl.store(base + 1, tl.where(active, lz_s, 0.0))
    tl.store(base + 2, tl.where(active, lse_q, 0.0))
    tl.store(base + 3, tl.where(active, c, 0.0))
    tl.store(base + 4, tl.where(active, f_tail, 0.0))


@triton.jit
def sparse_kl_backward_kernel(
    s_ptr, ids_ptr, values_ptr, labels_ptr, stats_ptr, grad_loss_ptr, grad_ptr,
    V, K, stride_s, stride_sc, stride_i, stride_ic, stride_v, stride_vc, stride_g,
    temperature: tl.float64, beta: tl.float64, ignore_index,
    MODE: tl.constexpr, TAIL: tl.constexpr, LOGITS: tl.constexpr, HAS_LABELS: tl.constexpr, UNIT_S: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    """Per row: re-reads the V student logits (tail only) and writes the gradient row
    dL/dx_j = g T p_j f_tail (0 with renormalize), then re-reads the K pairs and overwrites the support ids
    with g T (P_k g_k - P_k C).  Ignored rows get zeros."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.full((), temperature, ACC)
    inv_t = 1.0 / temp
    beta = tl.full((), beta, ACC)
    n = counted_length(labels_ptr, row, V, ignore_index, HAS_LABELS)
    active = n > 0
    K = tl.where(active, K, 0)
    base = stats_ptr + N_STATS * row
    m_s, lz_s, lse_q = tl.load(base), tl.load(base + 1), tl.load(base + 2)
    c, f_tail = tl.load(base + 3), tl.load(base + 4)
    g = tl.where(active, tl.load(grad_loss_ptr + row * stride_g).to(ACC) * temp, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        if TAIL:
            a = load_scaled(s_ptr, row, stride_s, cols, stride_sc, cols < n, inv_t, UNIT_S, ACC)
            dense = g * tl.exp((a - m_s) - lz_s) * f_tail
        else:
            dense = tl.zeros((BLOCK,), ACC)
        tl.store(grad_ptr + row * V + cols, dense.to(grad_ptr.dtype.element_ty), mask=cols < V)
    tl.debug_barrier()  # the support ids below overwrite values that other threads wrote above
    for k0 in range(0, K, KBLOCK):
        k = k0 + tl.arange(0, KBLOCK)
        a, lq, valid, bad, idx = load_support(s_ptr, ids_ptr, values_ptr, row, k, K, V, stride_s, stride_sc,
                                              stride_i, stride_ic, stride_v, stride_vc, inv_t, LOGITS, UNIT_S, ACC)
        log_p = (a - m_s) - lz_s
        _, pg = bucket_terms(log_p, lq - lse_q, beta, MODE)
        tl.store(grad_ptr + row * V + idx, (g * (pg - tl.exp(log_p) * c)).to(grad_ptr.dtype.element_ty),
                 mask=valid & ~bad)


def _launch(kernel, s, ids, values, labels, ignore_index, config, buffers, extra_strides=()):
    """One program per row; `buffers` follow the labels, `extra_strides` the input strides (see the kernels)."""
    mode, beta, temperature, tail, logits = config
    s2, ids2, v2 = as_rows(s), as_rows(ids), as_rows(values)
    N, V = s2.shape
    K = ids2.shape[1]
    block, num_warps = block_config(V, s.dtype)
    kernel[(N,)](
        s2, ids2, v2, labels.reshape(-1) if labels is not None else ids2, *buffers,
        V, K, s2.stride(0), s2.stride(1), ids2.stride(0), ids2.stride(1), v2.stride(0), v2.stride(1), *extra_strides,
        float(temperature), float(beta), ignore_index,
        mode, tail, logits, labels is not None, s2.stride(1) == 1, tl_acc_dtype(s.dtype, values.dtype), block,
        max(16, min(triton.next_power_of_2(K), MAX_KBLOCK)), num_warps=num_warps,
    )


def sparse_kl_rows(s, ids, values, config, labels, ignore_index):
    """Row losses T^2 D(P, Q) of student logits `s` [..., V] against K teacher pairs (`ids`, `values` [..., K]);
    config = (mode, beta, temperature, tail, logits) -> (loss [N], stats [N, 5])."""
    N = s.numel() // s.shape[-1]
    acc = acc_dtype(s.dtype, values.dtype)
    loss = torch.empty(N, dtype=acc, device=s.device)
    stats = torch.empty(N, N_STATS.value, dtype=acc, device=s.device)
    if N:
        _launch(sparse_kl_forward_kernel, s, ids, values, labels, ignore_index, config, (loss, stats))
    return loss, stats


def sparse_kl_rows_backward(grad_loss, s, ids, values, stats, config, labels, ignore_index):
    """dL/ds, contiguous and shaped like `s`."""
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    N = s.numel() // s.shape[-1]
    if N:
        g = grad_loss.reshape(-1) if grad_loss.dim() else grad_loss.expand(N)
        _launch(sparse_kl_backward_kernel, s, ids, values, labels, ignore_index, config, (stats, g, grad),
                (g.stride(0),))
    return grad
