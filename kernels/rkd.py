"""RKD (Park et al. 2019): pairwise squared distances and the angle loss over all N^3 triplets.

The angle at anchor i between e_j and e_k needs only squared distances R (law of cosines):
    <e_j - e_i, e_k - e_i> = (R_ij + R_ik - R_jk) / 2,     ||e_j - e_i|| = sqrt(R_ij)
    cos(i; j, k) = (R_ij + R_ik - R_jk) / 2 * inv_ij * inv_ik,     inv = 1 / max(sqrt(R), ANGLE_EPS)
(ANGLE_EPS is F.normalize's eps: j == i gives a zero vector and cosine 0).  R is computed from the
differences e_a - e_b themselves, not from a Gram matrix: a common offset of the rows cancels exactly,
and duplicate rows give R = 0 exactly (hence cosine 0 exactly, as the authors' code gives).  R is
accumulated and stored in fp64, and R_ij + R_ik - R_jk is formed in fp64: where e_j nearly coincides
with e_i, R_ik - R_jk is a small difference of large numbers (relative cancellation ~ r_ik / r_ij),
which fp32 would leave at ~1e-4 for r_ij / r_ik = 1e-3.  Everything else runs in ACC (fp32; fp64 for
fp64 inputs); the fp64 work is O(N^2 D + N^3) additions, next to no time even at consumer fp64 rates.

Kernels (N x N matrices only; nothing of size N x N x D or N^3 is stored):
  sqdist_kernel           tile (a, b), a-block <= b-block: reads the rows of both blocks over all D,
                          writes R[a, b] and R[b, a] (so that R is symmetric bit for bit), fp64
  sqdist_backward_kernel  tile (a, d): reads G (the gradient w.r.t. R) and the rows; writes
                          dL/de_a = 2 sum_b (G_ab + G_ba) (e_a - e_b), summing the differences directly
  angle_forward_kernel    tile (x, y), loop over z: reads R_s, R_t; writes one partial sum of
                          smooth_l1(cos_s(x; y, z) - cos_t(x; y, z)) per tile
  angle_backward_kernel   tile (x, y), loop over z: writes dL/dR_s[x, y] (and dL/dR_t) (formula below)
"""
import torch
import triton
import triton.language as tl

from .common import tl_acc_dtype

ANGLE_EPS = tl.constexpr(1e-12)  # F.normalize's default eps, used by the authors' angle loss
SQDIST_BLOCK_N, SQDIST_BLOCK_D, SQDIST_WARPS = 16, 16, 4
ANGLE_BLOCK_XY, ANGLE_BLOCK_Z, ANGLE_WARPS = 8, 16, 4


@triton.jit
def _rows(e_ptr, rows, cols, N, D, stride_n, stride_d, ACC: tl.constexpr):
    """A [rows, cols] tile of E (zeros outside N x D), in ACC; int64 row offsets."""
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    ptrs = e_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def sqdist_kernel(e_ptr, r_ptr, N, D, stride_n, stride_d,
                  ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """R[a, b] = sum_d (e_a[d] - e_b[d])^2 in ACC (the launcher's is fp64: the differences of fp32 or
    narrower values are then exact) for the tile (a-block, b-block) with a-block <= b-block, stored at
    [a, b] and at [b, a].  Reads BLOCK_N rows of each block over all D; writes 2 tiles of R."""
    pa = tl.program_id(0)
    pb = tl.program_id(1)
    if pa <= pb:
        a = pa * BLOCK_N + tl.arange(0, BLOCK_N)
        b = pb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_N), ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            diff = (_rows(e_ptr, a, d, N, D, stride_n, stride_d, ACC)[:, None, :]
                    - _rows(e_ptr, b, d, N, D, stride_n, stride_d, ACC)[None, :, :])
            acc += tl.sum(diff * diff, 2)
        mask = (a < N)[:, None] & (b < N)[None, :]
        a64 = a.to(tl.int64)
        b64 = b.to(tl.int64)
        tl.store(r_ptr + a64[:, None] * N + b64[None, :], acc, mask=mask)
        tl.store(r_ptr + b64[None, :] * N + a64[:, None], acc, mask=mask)  # the transposed tile


@triton.jit
def sqdist_backward_kernel(e_ptr, g_ptr, de_ptr, N, D, stride_n, stride_d,
                           ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/de_a[d] = 2 sum_b S_ab (e_a[d] - e_b[d]),  S = G + G^T (G = dL/dR, [N, N] contiguous).

    Tile (a-block, d-block): reads those rows and columns of E once, then G[a, :], G[:, a] and the
    columns d of every row; writes the tile of dL/dE (E's dtype, contiguous).  The differences are
    summed directly (not as rowsum(S) e_a - S E, which cancels when the rows share a large offset)."""
    a = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_a = _rows(e_ptr, a, d, N, D, stride_n, stride_d, ACC)
    a64 = a.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for b0 in range(0, N, BLOCK_N):
        b = b0 + tl.arange(0, BLOCK_N)
        b64 = b.to(tl.int64)
        mask = (a < N)[:, None] & (b < N)[None, :]
        s = (tl.load(g_ptr + a64[:, None] * N + b64[None, :], mask=mask, other=0.0).to(ACC)
             + tl.load(g_ptr + b64[None, :] * N + a64[:, None], mask=mask, other=0.0).to(ACC))
        diff = e_a[:, None, :] - _rows(e_ptr, b, d, N, D, stride_n, stride_d, ACC)[None, :, :]
        acc += tl.sum(s[:, :, None] * diff, 1)
    mask = (a < N)[:, None] & (d < D)[None, :]
    tl.store(de_ptr + a64[:, None] * D + d[None, :], (2.0 * acc).to(de_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _r_tile(r_ptr, rows, cols, N):
    """R[rows, cols] (fp64), 0 outside N x N."""
    mask = (rows < N)[:, None] & (cols < N)[None, :]
    return tl.load(r_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _triplets(x, y, z, N):
    """The [x, y, z] lanes that are triplets of rows (< N)."""
    return (x < N)[:, None, None] & (y < N)[None, :, None] & (z < N)[None, None, :]


@triton.jit
def _inv_norm(r):
    """1 / max(sqrt(R), eps): the normalisation of F.normalize, from a squared distance."""
    return 1.0 / tl.maximum(tl.sqrt(r), ANGLE_EPS)


@triton.jit
def _rho(r, ACC: tl.constexpr):
    """[sqrt(R) > eps] / R: minus twice the derivative of log inv w.r.t. R (0 where the norm is clamped)."""
    r = r.to(ACC)
    inv = _inv_norm(r)
    return tl.where(tl.sqrt(r) > ANGLE_EPS, inv * inv, 0.0)


@triton.jit
def _cosines(r_xy, r_xz, r_yz, ACC: tl.constexpr):
    """For the triplets of a [x, y, z] tile, from fp64 tiles of R: (cos(x; y, z), p_x, cos(z; x, y), p_z)
    in ACC, p = inv * inv the product of the two inverse norms at that anchor.  The sums of squared
    distances are formed in fp64, the product of the norms first, so that cos(x; y, z) == cos(x; z, y)
    bit for bit (R is symmetric)."""
    inv_xy = _inv_norm(r_xy.to(ACC))
    inv_xz = _inv_norm(r_xz.to(ACC))
    inv_yz = _inv_norm(r_yz.to(ACC))
    p_x = inv_xy[:, :, None] * inv_xz[:, None, :]
    p_z = inv_xz[:, None, :] * inv_yz[None, :, :]
    c_x = (r_xy[:, :, None] + r_xz[:, None, :] - r_yz[None, :, :]).to(ACC) * 0.5 * p_x
    c_z = (r_xz[:, None, :] + r_yz[None, :, :] - r_xy[:, :, None]).to(ACC) * 0.5 * p_z
    return c_x, p_x, c_z, p_z


@triton.jit
def angle_forward_kernel(rs_ptr, rt_ptr, partial_ptr, N,
                         ACC: tl.constexpr, BLOCK_XY: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Tile (x-block, y-block): reads R_s, R_t at [x, y], [x, :], [y, :]; writes
    partial[tile] = sum over the tile's x, y and all z of smooth_l1(cos_s(x; y, z) - cos_t(x; y, z))."""
    x = tl.program_id(0) * BLOCK_XY + tl.arange(0, BLOCK_XY)
    y = tl.program_id(1) * BLOCK_XY + tl.arange(0, BLOCK_XY)
    rs_xy = _r_tile(rs_ptr, x, y, N)
    rt_xy = _r_tile(rt_ptr, x, y, N)
    acc = tl.zeros((BLOCK_XY, BLOCK_XY), ACC)
    for z0 in range(0, N, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        cs, _, _, _ = _cosines(rs_xy, _r_tile(rs_ptr, x, z, N), _r_tile(rs_ptr, y, z, N), ACC)
        ct, _, _, _ = _cosines(rt_xy, _r_tile(rt_ptr, x, z, N), _r_tile(rt_ptr, y, z, N), ACC)
        diff = tl.where(_triplets(x, y, z, N), tl.abs(cs - ct), 0.0)
        acc += tl.sum(tl.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), 2)  # smooth_l1, beta = 1
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + tile, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def angle_backward_kernel(rs_ptr, rt_ptr, grad_loss_ptr, gs_ptr, gt_ptr, N, inv_count: tl.float64,
                          GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_XY: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Tile (x-block, y-block), loop over z: writes G[x, y], a gradient w.r.t. R whose symmetric part
    G + G^T is dL/dR (the form sqdist_backward_kernel takes), for the student and/or the teacher.

    With L = w sum_ijk smooth_l1(c_s - c_t), w = grad_loss / N^3, g_ijk = w clamp(c_s - c_t, -1, 1)
    (dL/dc_s = g, dL/dc_t = -g), c = (R_ij + R_ik - R_jk) / 2 p_ijk, p_ijk = inv_ij inv_ik and
    rho = [sqrt(R) > eps] / R (d inv / dR = -inv rho / 2):
        dc/dR_ij = (p - c rho_ij) / 2,  dc/dR_ik = (p - c rho_ik) / 2,  dc/dR_jk = -p / 2.
    c and g are symmetric in (j, k), so the two anchor slots give the same sum, and
        G[x, y] = sum_z g_xyz (p_xyz - c_xyz rho_xy)  -  1/2 sum_z g_zxy p_zxy
    (anchor x with y in the first slot; anchor z with (x, y) the opposite side); for the teacher g -> -g.
    Both anchors' cosines come from the same three tiles R[x, y], R[x, z], R[y, z]."""
    x = tl.program_id(0) * BLOCK_XY + tl.arange(0, BLOCK_XY)
    y = tl.program_id(1) * BLOCK_XY + tl.arange(0, BLOCK_XY)
    w = tl.load(grad_loss_ptr).to(ACC) * tl.full((), inv_count, ACC)
    rs_xy = _r_tile(rs_ptr, x, y, N)
    rt_xy = _r_tile(rt_ptr, x, y, N)
    rho_s = _rho(rs_xy, ACC)[:, :, None]
    rho_t = _rho(rt_xy, ACC)[:, :, None]
    acc_s = tl.zeros((BLOCK_XY, BLOCK_XY), ACC)
    acc_t = tl.zeros((BLOCK_XY, BLOCK_XY), ACC)
    for z0 in range(0, N, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        cs_x, ps_x, cs_z, ps_z = _cosines(rs_xy, _r_tile(rs_ptr, x, z, N), _r_tile(rs_ptr, y, z, N), ACC)
        ct_x, pt_x, ct_z, pt_z = _cosines(rt_xy, _r_tile(rt_ptr, x, z, N), _r_tile(rt_ptr, y, z, N), ACC)
        valid = _triplets(x, y, z, N)
        h_x = tl.where(valid, tl.minimum(tl.maximum(cs_x - ct_x, -1.0), 1.0), 0.0)  # smooth_l1' at anchor x
        h_z = tl.where(valid, tl.minimum(tl.maximum(cs_z - ct_z, -1.0), 1.0), 0.0)  # and at anchor z
        if GRAD_S:
            acc_s += tl.sum(h_x * (ps_x - cs_x * rho_s) - 0.5 * h_z * ps_z, 2)
        if GRAD_T:
            acc_t += tl.sum(0.5 * h_z * pt_z - h_x * (pt_x - ct_x * rho_t), 2)
    mask = (x < N)[:, None] & (y < N)[None, :]
    offsets = x.to(tl.int64)[:, None] * N + y[None, :]
    if GRAD_S:
        tl.store(gs_ptr + offsets, (w * acc_s).to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(gt_ptr + offsets, (w * acc_t).to(gt_ptr.dtype.element_ty), mask=mask)


def sqdist(e):
    """Squared distances between the rows of e [N, D] -> R [N, N], fp64."""
    N, D = e.shape
    r = torch.empty(N, N, dtype=torch.float64, device=e.device)
    blocks = triton.cdiv(N, SQDIST_BLOCK_N)
    sqdist_kernel[(blocks, blocks)](e, r, N, D, e.stride(0), e.stride(1), tl.float64, SQDIST_BLOCK_N,
                                    SQDIST_BLOCK_D, num_warps=SQDIST_WARPS)
    return r


def sqdist_backward(e, grad_r):
    """dL/de [N, D] (e's dtype, contiguous) from grad_r = dL/dR [N, N]."""
    N, D = e.shape
    de = torch.empty(N, D, dtype=e.dtype, device=e.device)
    grid = (triton.cdiv(N, SQDIST_BLOCK_N), triton.cdiv(D, SQDIST_BLOCK_D))
    sqdist_backward_kernel[grid](e, grad_r.contiguous(), de, N, D, e.stride(0), e.stride(1),
                                 tl_acc_dtype(e.dtype), SQDIST_BLOCK_N, SQDIST_BLOCK_D,
                                 num_warps=SQDIST_WARPS)
    return de


def angle_loss(r_s, r_t, dtype):
    """mean over all N^3 triplets of smooth_l1(cos_s - cos_t), from the fp64 symmetric squared-distance
    matrices r_s, r_t [N, N] -> 0-dim, computed in `dtype` (float32 or float64)."""
    N = r_s.shape[0]
    blocks = triton.cdiv(N, ANGLE_BLOCK_XY)
    partial = torch.empty(blocks, blocks, dtype=dtype, device=r_s.device)
    angle_forward_kernel[(blocks, blocks)](r_s.contiguous(), r_t.contiguous(), partial, N, tl_acc_dtype(dtype),
                                           ANGLE_BLOCK_XY, ANGLE_BLOCK_Z, num_warps=ANGLE_WARPS)
    return partial.sum() / N**3


def angle_loss_backward(grad_loss, r_s, r_t, dtype, grad_s, grad_t):
    """(G_s, G_t) [N, N] fp64: gradients w.r.t. r_s and r_t whose symmetric parts are dL/dR (see
    angle_backward_kernel), computed in `dtype`; None where not asked for."""
    N = r_s.shape[0]
    g_s = torch.empty(N, N, dtype=r_s.dtype, device=r_s.device) if grad_s else None
    g_t = torch.empty(N, N, dtype=r_t.dtype, device=r_t.device) if grad_t else None
    blocks = triton.cdiv(N, ANGLE_BLOCK_XY)
    angle_backward_kernel[(blocks, blocks)](
        r_s.contiguous(), r_t.contiguous(), grad_loss, g_s if grad_s else g_t, g_t if grad_t else g_s, N,
        1.0 / N**3, grad_s, grad_t, tl_acc_dtype(dtype), ANGLE_BLOCK_XY, ANGLE_BLOCK_Z, num_warps=ANGLE_WARPS)
    return g_s, g_t
