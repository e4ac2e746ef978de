"""CRD (Tian et al. 2020): RepDistiller's NCE loss over a memory bank, fused with the gather of the rows.

For sample i with embedding v_i [D] and the bank rows w_k = bank[idx[i, k]], k = 0..K (k = 0 the positive):
    x_k = <w_k, v_i> / T,   P_k = exp(x_k) / Z,   c = K / n_data + eps   (eps = 1e-7, n_data = bank rows)
    loss_i = -log(P_0 / (P_0 + c)) - sum_{k>0} log((K / n_data) / (P_k + c))
           = softplus(log c - log P_0) + sum_{k>0} log1p((P_k + eps) n_data / K)
    d loss_i / d x_k = -c / (P_0 + c)  (k = 0),   P_k / (P_k + c)  (k > 0)
    d loss_i / d v_i = sum_k (d loss_i / d x_k) w_k / T
The loss is sum_i loss_i / N.  The bank is a constant (RepDistiller detaches it) and so is Z.

crd_nce_kernel: program (i, split) reads v_i once and the rows idx[i, k] of its chunk of k, each once, in
[BLOCK_K, BLOCK_D] tiles; writes its partial loss and, with GRAD, its partial d loss / d v_i [D] - so the
gradient is formed in the same pass as the loss, from the rows already loaded (a backward that gathered
the rows again would read the bank twice, and would read the rows after RepDistiller's in-place memory
update).  EXP_SUM instead writes the partial sum of exp(x_k) (the normaliser Z of the first batch).
An index outside [0, n_data) gives a NaN loss (and gradient), never an out-of-bounds read.
"""
import torch
import triton
import triton.language as tl

from .common import acc_dtype, log1p, tl_acc_dtype

EPS = tl.constexpr(1e-7)  # RepDistiller's eps in ContrastLoss
TILE = 4096  # bank elements per [BLOCK_K, BLOCK_D] tile
MAX_D = 4096  # widest embedding the kernel holds in one tile (wider ones run the eager reference)
TARGET_PROGRAMS = 1024  # split each sample's K + 1 rows over programs until about this many run


@triton.jit
def crd_nce_kernel(
    v_ptr, bank_ptr, idx_ptr, z_ptr, loss_ptr, grad_ptr,
    K1, D, n_bank, chunk, stride_v, stride_vd, stride_bank, stride_bankd, stride_idx, stride_idxk,
    inv_t: tl.float64, m_pn: tl.float64, inv_m_pn: tl.float64,
    EXP_SUM: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Program (i, split): rows k in [split * chunk, min((split + 1) * chunk, K1)) of sample i.
    Writes loss_ptr[i, split] (the partial loss, or with EXP_SUM the partial sum of exp(x_k)) and, with
    GRAD, grad_ptr[i, split, :] (partial d loss_i / d v_i).  EVEN_D: D == BLOCK_D, the rows need no
    column mask (their loads can then be 128-bit)."""
    i = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < BLOCK_D) if EVEN_D else (d < D)
    v = tl.load(v_ptr + i * stride_v + d * stride_vd, mask=d_ok, other=0.0).to(ACC)
    inv_t = tl.full((), inv_t, ACC)
    inv_m_pn = tl.full((), inv_m_pn, ACC)
    log_c = tl.log(tl.full((), m_pn + EPS, ACC))
    if not EXP_SUM:
        log_z = tl.log(tl.load(z_ptr).to(ACC))
    acc = tl.zeros((BLOCK_K,), ACC)
    grad = tl.zeros((BLOCK_D,), ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, K1)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < end
        rows = tl.load(idx_ptr + i * stride_idx + k.to(tl.int64) * stride_idxk, mask=k_ok, other=0).to(tl.int64)
        row_ok = (rows >= 0) & (rows < n_bank)
        w = tl.load(bank_ptr + rows[:, None] * stride_bank + d[None, :] * stride_bankd,
                    mask=(k_ok & row_ok)[:, None] & d_ok[None, :], other=0.0).to(ACC)
        x = tl.where(row_ok, tl.sum(w * v[None, :], 1) * inv_t, float("nan"))
        if EXP_SUM:
            acc += tl.where(k_ok, tl.exp(x), 0.0)
        else:
            log_p = x - log_z
            p = tl.exp(log_p)
            u = log_c - log_p  # -log D_1 = log(1 + c / P) = softplus(u)
            positive = k == 0
            term = tl.where(positive, tl.maximum(u, 0.0) + log1p(tl.exp(-tl.abs(u))), log1p((p + EPS) * inv_m_pn))
            acc += tl.where(k_ok, term, 0.0)
            if GRAD:
                # d/dx: -c / (P + c) = -sigmoid(u) for the positive, P / (P + c) = sigmoid(-u) for the negatives
                dx = tl.where(positive, -1.0 / (1.0 + tl.exp(-u)), 1.0 / (1.0 + tl.exp(u)))
                grad += tl.sum(tl.where(k_ok, dx, 0.0)[:, None] * w, 0)
    out = i * splits + split
    tl.store(loss_ptr + out, tl.sum(acc, 0))
    if GRAD:
        tl.store(grad_ptr + out * D + d, grad * inv_t, mask=d_ok)


def _geometry(N, K1, D):
    """(BLOCK_K, BLOCK_D, chunk, splits): tile shape, rows per program, programs per sample.  The split
    keeps splits * D <= K1 (the partial gradients [N, splits, D] stay within the index tensor's size)."""
    block_d = triton.next_power_of_2(D)
    block_k = max(TILE // block_d, 1)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, N), K1 // max(block_k, D)))
    chunk = triton.cdiv(triton.cdiv(K1, splits), block_k) * block_k
    return block_k, block_d, chunk, triton.cdiv(K1, chunk)


def _launch(v, bank, idx, z, temperature, exp_sum, grad):
    N, D = v.shape
    K1 = idx.shape[1]
    acc = acc_dtype(v.dtype, bank.dtype)
    block_k, block_d, chunk, splits = _geometry(N, K1, D)
    partial = torch.empty(N, splits, dtype=acc, device=v.device)
    grads = torch.empty(N, splits, D, dtype=acc, device=v.device) if grad else None
    m_pn = (K1 - 1) / bank.shape[0]
    crd_nce_kernel[(N, splits)](
        v, bank, idx, z if z is not None else partial, partial, grads if grad else partial,
        K1, D, bank.shape[0], chunk, v.stride(0), v.stride(1), bank.stride(0), bank.stride(1), idx.stride(0),
        idx.stride(1), 1.0 / temperature, m_pn, 1.0 / m_pn if m_pn > 0 else 0.0,
        exp_sum, grad, tl_acc_dtype(v.dtype, bank.dtype), block_k, block_d, D == block_d, num_warps=4,
    )
    return partial, grads


def nce(v, bank, idx, z, temperature, grad):
    """RepDistiller's ContrastLoss of the scores of v [N, D] against bank[idx] ([n_data, D], idx [N, K+1])
    normalised by z (a 1-element tensor) -> (loss, d loss / d v [N, D] if `grad`, else None), both fp32
    (fp64 for fp64 inputs)."""
    N = v.shape[0]
    partial, grads = _launch(v, bank, idx, z, temperature, False, grad)
    return partial.sum() / N, grads.sum(1) / N if grad else None


def exp_sum(v, bank, idx, temperature):
    """sum over i, k of exp(<bank[idx[i, k]], v_i> / T) -> 0-dim fp32 (fp64 for fp64 inputs)."""
    partial, _ = _launch(v, bank, idx, None, temperature, True, False)
    return partial.sum()
