"""ICKD-C (Liu et al. 2021): row-normalised inter-channel Gram matrices of student and teacher, compared.

Per sample, F = f viewed [C, L] (L = H W, strides kept), G = F F^T [C, C], d_i = max(||G_i,:||, eps),
A = G / d (rows), D = A_s - A_t; the loss sums D^2 (the launcher scales it).  No [C, C] matrix is stored
in the forward: a program owns a block of rows, and makes their Gram tiles twice (row norms, then D).

Backward (g = 2 * scale * incoming gradient; pi_i = [||G_i|| >= eps]):
    dL/dG_s = g (D - pi A_s sigma_s) / d_s = g (diag(a_s) G_s - diag(b) G_t),
    a_s = (1 - pi_s sigma_s) / d_s^2,  a_t = (1 + pi_t sigma_t) / d_t^2,  b = 1 / (d_s d_t),
    sigma_s = sum_j A_s D, sigma_t = sum_j A_t D (per row, from the forward);  dL/dG_t = g (diag(a_t) G_t - diag(b) G_s)
    dL/dF = (dL/dG + dL/dG^T) F = M F,  M_s[i, j] = g ((a_s,i + a_s,j) G_s,ij - (b_i + b_j) G_t,ij)   (G symmetric)
M is either stored ([N, C, C] fp32, when that is no larger than an input: C^2 * 4 <= C L * element size; 8 for
fp64), or
recomputed tile by tile from the Gram tiles inside the gradient kernel.

Dots take fp32 operands (fp64 for fp64 inputs): "tf32" for 16-bit inputs (exact products: a 16-bit value fits
tf32), "ieee" when an input is fp32.  16-bit operands are converted after plain 128-bit loads (the Gram loop is not
software-pipelined; the interpreter multiplies bf16 dot operands as raw integers, so they never reach tl.dot).

Kernels:
  ickd_forward_kernel   per (sample, block of BLOCK_M rows): Gram tiles of the rows against every column block,
                        twice (reads the rows and all of F_s, F_t twice); writes the rows' sum of D^2 [N, C] and
                        (a_s, a_t, b) [N, C, 3]
  ickd_coupling_kernel  per (sample, row block, column block): one Gram tile pair; writes M_s and/or M_t there
  ickd_grad_kernel      per (sample, row block, block of L): writes dL/dF_s and/or dL/dF_t = M F on the block,
                        reading M's rows (STORED) or recomputing them from Gram tiles (then each program reads
                        its rows and all of F_s and F_t: chosen only where M would outgrow an input, small maps)
In-sample offsets are int32 (the launcher checks the span), the sample offset int64.
"""
import torch
import triton
import triton.language as tl

from .at import as_samples, empty_like_samples
from .common import tl_acc_dtype

N_COEF = tl.constexpr(3)  # per row: a_s, a_t, b


@triton.jit
def _gram_tiles(s_base, t_base, rows, cols, C, L, stride_sc, stride_sl, stride_tc, stride_tl,
                PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(G_s[rows, cols], G_t[rows, cols]) of one sample: sum over the L positions of F[rows] F[cols]."""
    x = tl.zeros((BLOCK_M, BLOCK_M), ACC)
    y = tl.zeros((BLOCK_M, BLOCK_M), ACC)
    row_ok = (rows < C)[:, None]
    col_ok = (cols < C)[None, :]
    for k0 in tl.range(0, L, BLOCK_K, num_stages=1):  # plain 128-bit loads, converted in registers
        ks = k0 + tl.arange(0, BLOCK_K)
        k_row = (ks < L)[None, :]
        k_col = (ks < L)[:, None]
        a = tl.load(s_base + rows[:, None] * stride_sc + ks[None, :] * stride_sl, mask=row_ok & k_row,
                    other=0.0).to(ACC)
        b = tl.load(s_base + cols[None, :] * stride_sc + ks[:, None] * stride_sl, mask=col_ok & k_col,
                    other=0.0).to(ACC)
        x = tl.dot(a, b, x, input_precision=PRECISION, out_dtype=ACC)
        a = tl.load(t_base + rows[:, None] * stride_tc + ks[None, :] * stride_tl, mask=row_ok & k_row,
                    other=0.0).to(ACC)
        b = tl.load(t_base + cols[None, :] * stride_tc + ks[:, None] * stride_tl, mask=col_ok & k_col,
                    other=0.0).to(ACC)
        y = tl.dot(a, b, y, input_precision=PRECISION, out_dtype=ACC)
    return x, y


@triton.jit
def ickd_forward_kernel(
    s_ptr, t_ptr, loss_ptr, coef_ptr, C, L, stride_sn, stride_sc, stride_sl, stride_tn, stride_tc, stride_tl,
    eps: tl.float64,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (sample n, block of rows): Gram tiles of the rows against every column block, twice; writes
    loss[n, rows] = sum_j D^2 and coef[n, rows] = (a_s, a_t, b)."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    s_base = s_ptr + n * stride_sn
    t_base = t_ptr + n * stride_tn
    sq_s = tl.zeros((BLOCK_M,), ACC)
    sq_t = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, C, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        x, y = _gram_tiles(s_base, t_base, rows, cols, C, L, stride_sc, stride_sl, stride_tc, stride_tl, PRECISION,
                           ACC, BLOCK_M, BLOCK_K)
        sq_s += tl.sum(x * x, 1)
        sq_t += tl.sum(y * y, 1)
    eps_acc = tl.full((), eps, ACC)
    norm_s = tl.sqrt(sq_s)
    norm_t = tl.sqrt(sq_t)
    inv_s = 1.0 / tl.maximum(norm_s, eps_acc)
    inv_t = 1.0 / tl.maximum(norm_t, eps_acc)
    dd = tl.zeros((BLOCK_M,), ACC)
    sigma_s = tl.zeros((BLOCK_M,), ACC)
    sigma_t = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, C, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        x, y = _gram_tiles(s_base, t_base, rows, cols, C, L, stride_sc, stride_sl, stride_tc, stride_tl, PRECISION,
                           ACC, BLOCK_M, BLOCK_K)
        a_s = x * inv_s[:, None]
        a_t = y * inv_t[:, None]
        d = a_s - a_t
        dd += tl.sum(d * d, 1)
        sigma_s += tl.sum(a_s * d, 1)
        sigma_t += tl.sum(a_t * d, 1)
    row_ok = rows < C
    tl.store(loss_ptr + n * C + rows, dd, mask=row_ok)
    out = coef_ptr + (n * C + rows) * N_COEF
    tl.store(out, (1.0 - tl.where(norm_s >= eps_acc, sigma_s, 0.0)) * inv_s * inv_s, mask=row_ok)
    tl.store(out + 1, (1.0 + tl.where(norm_t >= eps_acc, sigma_t, 0.0)) * inv_t * inv_t, mask=row_ok)
    tl.store(out + 2, inv_s * inv_t, mask=row_ok)


@triton.jit
def _coupling_tiles(s_base, t_base, coef_n, g, rows, cols, C, L, stride_sc, stride_sl, stride_tc, stride_tl,
                    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(M_s, M_t)[rows, cols] = g ((a_i + a_j) G_x - (b_i + b_j) G_o) for x = s, t (o the other one)."""
    x, y = _gram_tiles(s_base, t_base, rows, cols, C, L, stride_sc, stride_sl, stride_tc, stride_tl, PRECISION, ACC,
                       BLOCK_M, BLOCK_K)
    a_s_i = tl.load(coef_n + rows * N_COEF, mask=rows < C, other=0.0)
    a_t_i = tl.load(coef_n + rows * N_COEF + 1, mask=rows < C, other=0.0)
    b_i = tl.load(coef_n + rows * N_COEF + 2, mask=rows < C, other=0.0)
    a_s_j = tl.load(coef_n + cols * N_COEF, mask=cols < C, other=0.0)
    a_t_j = tl.load(coef_n + cols * N_COEF + 1, mask=cols < C, other=0.0)
    b_j = tl.load(coef_n + cols * N_COEF + 2, mask=cols < C, other=0.0)
    b = b_i[:, None] + b_j[None, :]
    m_s = g * ((a_s_i[:, None] + a_s_j[None, :]) * x - b * y)
    m_t = g * ((a_t_i[:, None] + a_t_j[None, :]) * y - b * x)
    return m_s, m_t


@triton.jit
def ickd_coupling_kernel(
    s_ptr, t_ptr, coef_ptr, grad_loss_ptr, ms_ptr, mt_ptr, C, L,
    stride_sn, stride_sc, stride_sl, stride_tn, stride_tc, stride_tl, scale: tl.float64,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (sample n, row block, column block): the tile's Gram products; writes M_s and/or M_t [N, C, C] there."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = 2.0 * tl.full((), scale, ACC) * tl.load(grad_loss_ptr).to(ACC)
    m_s, m_t = _coupling_tiles(s_ptr + n * stride_sn, t_ptr + n * stride_tn, coef_ptr + n * C * N_COEF, g, rows, cols,
                               C, L,
                               stride_sc, stride_sl, stride_tc, stride_tl, PRECISION, ACC, BLOCK_M, BLOCK_K)
    out = n * C * C + rows[:, None] * C + cols[None, :]
    mask = (rows < C)[:, None] & (cols < C)[None, :]
    if GRAD_S:
        tl.store(ms_ptr + out, m_s, mask=mask)
    if GRAD_T:
        tl.store(mt_ptr + out, m_t, mask=mask)


@triton.jit
def ickd_grad_kernel(
    s_ptr, t_ptr, coef_ptr, grad_loss_ptr, ms_ptr, mt_ptr, gs_ptr, gt_ptr, C, L,
    stride_sn, stride_sc, stride_sl, stride_tn, stride_tc, stride_tl,
    stride_gsn, stride_gsc, stride_gsl, stride_gtn, stride_gtc, stride_gtl, scale: tl.float64,
    STORED: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per (sample n, row block, block of L): writes dL/dF_x[rows, block] = sum over column blocks of
    M_x[rows, cols] F_x[cols, block] for x = s (GRAD_S) and/or t (GRAD_T); M loaded (STORED) or recomputed."""
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ls = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    s_base = s_ptr + n * stride_sn
    t_base = t_ptr + n * stride_tn
    g = 2.0 * tl.full((), scale, ACC) * tl.load(grad_loss_ptr).to(ACC)
    acc_s = tl.zeros((BLOCK_M, BLOCK_L), ACC)
    acc_t = tl.zeros((BLOCK_M, BLOCK_L), ACC)
    l_ok = (ls < L)[None, :]
    for j0 in range(0, C, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        if not STORED:
            m_s, m_t = _coupling_tiles(s_base, t_base, coef_ptr + n * C * N_COEF, g, rows, cols, C, L, stride_sc,
                                       stride_sl, stride_tc, stride_tl, PRECISION, ACC, BLOCK_M, BLOCK_K)
        tile = n * C * C + rows[:, None] * C + cols[None, :]
        tile_ok = (rows < C)[:, None] & (cols < C)[None, :]
        col_ok = (cols < C)[:, None]
        if GRAD_S:
            if STORED:
                m_s = tl.load(ms_ptr + tile, mask=tile_ok, other=0.0)
            f = tl.load(s_base + cols[:, None] * stride_sc + ls[None, :] * stride_sl, mask=col_ok & l_ok,
                        other=0.0).to(ACC)
            acc_s = tl.dot(m_s, f, acc_s, input_precision=PRECISION, out_dtype=ACC)
        if GRAD_T:
            if STORED:
                m_t = tl.load(mt_ptr + tile, mask=tile_ok, other=0.0)
            f = tl.load(t_base + cols[:, None] * stride_tc + ls[None, :] * stride_tl, mask=col_ok & l_ok,
                        other=0.0).to(ACC)
            acc_t = tl.dot(m_t, f, acc_t, input_precision=PRECISION, out_dtype=ACC)
    mask = (rows < C)[:, None] & l_ok
    if GRAD_S:
        tl.store(gs_ptr + n * stride_gsn + rows[:, None] * stride_gsc + ls[None, :] * stride_gsl,
                 acc_s.to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(gt_ptr + n * stride_gtn + rows[:, None] * stride_gtc + ls[None, :] * stride_gtl,
                 acc_t.to(gt_ptr.dtype.element_ty), mask=mask)


def tiles(C, L):
    """Tiles and warps: BLOCK_M rows (and columns) of the Gram, BLOCK_K positions per dot step, BLOCK_L positions
    of the gradient per program (ickd_grad_kernel only)."""
    np2 = triton.next_power_of_2
    return dict(BLOCK_M=min(64, max(16, np2(C))), BLOCK_K=min(32, max(16, np2(L))),
                BLOCK_L=min(32, max(16, np2(L))), num_warps=8)


def _config(f_s, f_t):
    """Gram tiles and the dot precision (module docstring) for two [N, C, L] maps."""
    meta = tiles(f_s.shape[1], f_s.shape[2])
    del meta["BLOCK_L"]
    exact = any(x.dtype in (torch.float32, torch.float64) for x in (f_s, f_t))
    return dict(meta, PRECISION="ieee" if exact else "tf32", ACC=tl_acc_dtype(f_s.dtype, f_t.dtype))


def _acc(f_s, f_t):
    return torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32


def stores_coupling(f_s, f_t):
    """Whether the backward stores M ([N, C, C] per gradient): only when no larger than either input
    (C^2 * acc size <= C L * element size), else it recomputes M's tiles where it uses them."""
    C, L = f_s.shape[1], f_s.shape[2] * f_s.shape[3]
    acc_size = 8 if _acc(f_s, f_t) == torch.float64 else 4
    return C * acc_size <= L * min(f_s.element_size(), f_t.element_size())


def ickd_forward(f_s, f_t, eps, scale):
    """scale * sum over samples and rows of ||A_s - A_t||^2 (0-dim) and the row coefficients [N, C, 3]."""
    s3, t3 = as_samples(f_s), as_samples(f_t)
    N, C, L = s3.shape
    rows = torch.empty(N, C, dtype=_acc(f_s, f_t), device=f_s.device)
    coef = torch.empty(N, C, N_COEF.value, dtype=rows.dtype, device=f_s.device)
    meta = _config(s3, t3)
    ickd_forward_kernel[(N, triton.cdiv(C, meta["BLOCK_M"]))](
        s3, t3, rows, coef, C, L, *s3.stride(), *t3.stride(), float(eps), **meta)
    return rows.sum() * scale, coef


def ickd_backward(grad_loss, f_s, f_t, coef, scale, grad_s, grad_t):
    """(dL/df_s, dL/df_t), each in its input's dtype and memory format, or None where not asked."""
    s3, t3 = as_samples(f_s), as_samples(f_t)
    N, C, L = s3.shape
    meta = _config(s3, t3)
    block_m = meta["BLOCK_M"]
    stored = stores_coupling(f_s, f_t)
    coupling = [torch.empty(N, C, C, dtype=coef.dtype, device=coef.device) if stored and need else None
                for need in (grad_s, grad_t)]
    ms, mt = (m if m is not None else coef for m in coupling)
    if stored:
        ickd_coupling_kernel[(N, triton.cdiv(C, block_m), triton.cdiv(C, block_m))](
            s3, t3, coef, grad_loss, ms, mt, C, L, *s3.stride(), *t3.stride(), float(scale), GRAD_S=grad_s,
            GRAD_T=grad_t, **meta)
    gs3 = empty_like_samples(s3) if grad_s else None
    gt3 = empty_like_samples(t3) if grad_t else None
    out_s, out_t = (gs3 if grad_s else gt3), (gt3 if grad_t else gs3)
    block_l = tiles(C, L)["BLOCK_L"]
    ickd_grad_kernel[(N, triton.cdiv(C, block_m), triton.cdiv(L, block_l))](
        s3, t3, coef, grad_loss, ms, mt, out_s, out_t, C, L, *s3.stride(), *t3.stride(), *out_s.stride(),
        *out_t.stride(), float(scale), STORED=stored, GRAD_S=grad_s, GRAD_T=grad_t, BLOCK_L=block_l, **meta)
    return (gs3.view(f_s.shape) if grad_s else None), (gt3.view(f_t.shape) if grad_t else None)
