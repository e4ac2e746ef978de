"""ReviewKD's hierarchical context loss (HCL, Chen et al. 2021), one stage, fused.

With d = f_s - f_t ([N, C, H, W]) and P_l = adaptive_avg_pool2d(d, (l, l)) (pooling is linear, so
pool(f_s) - pool(f_t) = pool(d)):
    loss = w0 sum d^2 + sum over the levels l of w_l sum P_l^2,
w0 = 1 / (N C H W tot), w_l = cnt_l / (N C l^2 tot) (the weights of ReviewKD's hcl, from the launcher).
adaptive_avg_pool2d's window (i, j) of level l covers rows [floor(i H / l), ceil((i + 1) H / l)) and columns
[floor(j W / l), ceil((j + 1) W / l)): windows may overlap when l does not divide H or W.

The 21 windows of levels 4, 2, 1 live in 32 slots per channel: level 4 at i*4 + j, level 2 at 16 + i*2 + j,
level 1 at 20.  The levels present (l < H) are always a suffix of the slots, starting at FIRST_SLOT
(0, 16, 20; 21: none); saved pooled means are the slots from FIRST_SLOT on.

Window sums are matrix products with the 0/1 membership of positions in the slots' windows: a tile's
column-window sums of every row are d [BLOCK_C * BLOCK_H, BLOCK_W] @ in_col [BLOCK_W, SLOTS], then summed over
the rows in each slot's row window; the backward's pooled term is (coef * in_row) [BLOCK_C * BLOCK_H, SLOTS]
@ in_col^T.  Dots: ieee for fp32/fp64 inputs, tf32x3 (about fp32 accuracy; the 0/1 operand is exact) for 16-bit.

Kernels, per (sample n, block of BLOCK_C channels), whole planes in tiles of BLOCK_R = BLOCK_C * BLOCK_H map
rows (row r: channel r // BLOCK_H, map row r % BLOCK_H of the block) by BLOCK_W columns:
  hcl_forward_kernel   reads f_s and f_t once; writes the program's partial loss and, if SAVE, the pooled
                       means P (fp32, fp64 for fp64 inputs; [N, C, 21 - FIRST_SLOT])
  hcl_backward_kernel  reads P (or, if not SAVE, recomputes it in a first pass over f_s and f_t), then reads
                       f_s and f_t once more and writes
                           dL/df_s = -dL/df_t = 2 g (w0 d + sum over the windows k holding the element of w_l P_k / |k|)
In-sample offsets are int32 (the launcher checks the span), the sample offset int64.
"""
import torch
import triton
import triton.language as tl

from .at import check_span
from .common import tl_acc_dtype

SLOTS = tl.constexpr(32)
N_WINDOWS = 21
TILE = 2048


@triton.jit
def _windows(H, W, w4, w2, w1, FIRST_SLOT: tl.constexpr, ACC: tl.constexpr):
    """Window slots [SLOTS]: row bounds r0, r1, column bounds c0, c1, 1 / |window| and the weight w_l (these two
    0 where the slot holds no window).  adaptive_avg_pool's window i of level l spans [floor(i H / l),
    ceil((i + 1) H / l))."""
    k = tl.arange(0, SLOTS)
    level = tl.where(k < 16, 4, tl.where(k < 20, 2, 1))
    local = k - tl.where(k < 16, 0, tl.where(k < 20, 16, 20))
    i = local // level
    j = local % level
    r0 = (i * H) // level
    r1 = ((i + 1) * H + level - 1) // level
    c0 = (j * W) // level
    c1 = ((j + 1) * W + level - 1) // level
    present = (k >= FIRST_SLOT) & (k < 21)
    w = tl.where(k < 16, tl.full((), w4, ACC), tl.where(k < 20, tl.full((), w2, ACC), tl.full((), w1, ACC)))
    weight = tl.where(present, w, 0.0)
    inv_size = tl.where(present, 1.0 / tl.maximum((r1 - r0) * (c1 - c0), 1).to(ACC), 0.0)
    return r0, r1, c0, c1, inv_size, weight


@triton.jit
def _tile_rows(r, chan0, h0, BLOCK_H: tl.constexpr):
    """Channel and row of each tile row r = c_local * BLOCK_H + h_local."""
    if BLOCK_H == 1:
        return chan0 + r, h0 + 0 * r
    else:
        return chan0 + r // BLOCK_H, h0 + r % BLOCK_H


@triton.jit
def _tile_offsets(c, h, cols, stride_c, stride_h, stride_w):
    return (c * stride_c + h * stride_h)[:, None] + cols[None, :] * stride_w


@triton.jit
def _diff_tile(s_base, t_base, c, h, cols, C, H, W, stride_sc, stride_sh, stride_sw, stride_tc, stride_th, stride_tw,
               ACC: tl.constexpr):
    """d = f_s - f_t on a [BLOCK_R, BLOCK_W] tile (rows: channel c, map row h; 0 outside the map) and its mask."""
    mask = ((c < C) & (h < H))[:, None] & (cols < W)[None, :]
    s = tl.load(s_base + _tile_offsets(c, h, cols, stride_sc, stride_sh, stride_sw), mask=mask, other=0.0)
    t = tl.load(t_base + _tile_offsets(c, h, cols, stride_tc, stride_th, stride_tw), mask=mask, other=0.0)
    return s.to(ACC) - t.to(ACC), mask


@triton.jit
def _in_window(index, start, end):
    """[len(index), SLOTS] membership of positions in the slots' windows (1.0 or 0.0)."""
    return ((index[:, None] >= start[None, :]) & (index[:, None] < end[None, :])).to(tl.float32)


@triton.jit
def _per_channel(x, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_R, SLOTS] per tile row -> [BLOCK_C, SLOTS] summed over each channel's rows."""
    return tl.sum(tl.reshape(x, (BLOCK_C, BLOCK_H, SLOTS)), 1)


@triton.jit
def _per_row(x, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_C, SLOTS] per channel -> [BLOCK_R, SLOTS] repeated on each channel's rows."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (BLOCK_C, BLOCK_H, SLOTS)), (BLOCK_C * BLOCK_H, SLOTS))


@triton.jit
def _plane_sums(s_base, t_base, chan0, C, H, W, stride_sc, stride_sh, stride_sw, stride_tc, stride_th, stride_tw,
                r0, r1, c0, c1, PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One pass over the planes of channels chan0 + [0, BLOCK_C): (window sums of d [BLOCK_C, SLOTS], sum of d^2).
    Per block of rows: column-window sums of every row (dots with the [BLOCK_W, SLOTS] membership), kept where the
    row lies in the slot's row window."""
    r = tl.arange(0, BLOCK_C * BLOCK_H)
    sums = tl.zeros((BLOCK_C * BLOCK_H, SLOTS), ACC)
    squares = tl.zeros((BLOCK_C * BLOCK_H,), ACC)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=1):  # plain loads, no copies through shared memory
        c, h = _tile_rows(r, chan0, h0, BLOCK_H)
        col_sums = tl.zeros((BLOCK_C * BLOCK_H, SLOTS), ACC)
        for col0 in tl.range(0, W, BLOCK_W, num_stages=1):
            cols = col0 + tl.arange(0, BLOCK_W)
            d, _ = _diff_tile(s_base, t_base, c, h, cols, C, H, W, stride_sc, stride_sh, stride_sw, stride_tc,
                              stride_th, stride_tw, ACC)
            squares += tl.sum(d * d, 1)
            col_sums = tl.dot(d, _in_window(cols, c0, c1).to(ACC), col_sums, input_precision=PRECISION,
                              out_dtype=ACC)
        sums += col_sums * _in_window(h, r0, r1).to(ACC)
    return _per_channel(sums, BLOCK_C, BLOCK_H), tl.sum(squares, 0)


@triton.jit
def _saved_slots(pooled_ptr, n, chans, C, FIRST_SLOT: tl.constexpr):
    """Pointers [len(chans), SLOTS] into the saved means [N, C, 21 - FIRST_SLOT] and their mask."""
    k = tl.arange(0, SLOTS)
    ptrs = pooled_ptr + (n * C + chans[:, None]) * (21 - FIRST_SLOT) + (k[None, :] - FIRST_SLOT)
    return ptrs, (chans < C)[:, None] & (k >= FIRST_SLOT)[None, :] & (k < 21)[None, :]


@triton.jit
def hcl_forward_kernel(
    s_ptr, t_ptr, partial_ptr, pooled_ptr, C, H, W,
    stride_sn, stride_sc, stride_sh, stride_sw, stride_tn, stride_tc, stride_th, stride_tw,
    w0: tl.float64, w4: tl.float64, w2: tl.float64, w1: tl.float64,
    FIRST_SLOT: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per (sample n, block of channels): reads those planes of f_s and f_t once; writes partial[n, block] =
    w0 sum d^2 + sum_k w_l P_k^2 and, if SAVE, pooled[n, c, k - FIRST_SLOT] = P_k (the window means of d)."""
    n = tl.program_id(0).to(tl.int64)
    chan0 = tl.program_id(1) * BLOCK_C
    r0, r1, c0, c1, inv_size, weight = _windows(H, W, w4, w2, w1, FIRST_SLOT, ACC)
    sums, squares = _plane_sums(s_ptr + n * stride_sn, t_ptr + n * stride_tn, chan0, C, H, W, stride_sc, stride_sh,
                                stride_sw, stride_tc, stride_th, stride_tw, r0, r1, c0, c1, PRECISION, ACC, BLOCK_C,
                                BLOCK_H, BLOCK_W)
    means = sums * inv_size[None, :]
    partial = tl.full((), w0, ACC) * squares + tl.sum(tl.sum(means * means * weight[None, :], 1), 0)
    tl.store(partial_ptr + n * tl.num_programs(1) + tl.program_id(1), partial)
    if SAVE:
        ptrs, saved_ok = _saved_slots(pooled_ptr, n, chan0 + tl.arange(0, BLOCK_C), C, FIRST_SLOT)
        tl.store(ptrs, means, mask=saved_ok)


@triton.jit
def hcl_backward_kernel(
    s_ptr, t_ptr, pooled_ptr, grad_loss_ptr, gs_ptr, gt_ptr, C, H, W,
    stride_sn, stride_sc, stride_sh, stride_sw, stride_tn, stride_tc, stride_th, stride_tw,
    stride_gsn, stride_gsc, stride_gsh, stride_gsw, stride_gtn, stride_gtc, stride_gth, stride_gtw,
    w0: tl.float64, w4: tl.float64, w2: tl.float64, w1: tl.float64,
    FIRST_SLOT: tl.constexpr, SAVED: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per (sample n, block of channels): reads the pooled means (SAVED) or recomputes them (one more read of the
    planes), then reads f_s and f_t once and writes dL/df_s and/or dL/df_t = -dL/df_s (module docstring)."""
    n = tl.program_id(0).to(tl.int64)
    chan0 = tl.program_id(1) * BLOCK_C
    s_base = s_ptr + n * stride_sn
    t_base = t_ptr + n * stride_tn
    r = tl.arange(0, BLOCK_C * BLOCK_H)
    r0, r1, c0, c1, inv_size, weight = _windows(H, W, w4, w2, w1, FIRST_SLOT, ACC)
    # an element's share of window k's gradient, w_l P_k / |k|, on every tile row of the channel
    coef = tl.zeros((BLOCK_C * BLOCK_H, SLOTS), ACC)
    if SAVED:
        ptrs, saved_ok = _saved_slots(pooled_ptr, n, _tile_rows(r, chan0, 0, BLOCK_H)[0], C, FIRST_SLOT)
        coef = tl.load(ptrs, mask=saved_ok, other=0.0) * (weight * inv_size)[None, :]
    elif FIRST_SLOT < 21:  # levels present, means not saved
        sums, _ = _plane_sums(s_base, t_base, chan0, C, H, W, stride_sc, stride_sh, stride_sw, stride_tc, stride_th,
                              stride_tw, r0, r1, c0, c1, PRECISION, ACC, BLOCK_C, BLOCK_H, BLOCK_W)
        coef = _per_row(sums * (weight * inv_size * inv_size)[None, :], BLOCK_C, BLOCK_H)
    g2 = 2.0 * tl.load(grad_loss_ptr).to(ACC)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=1):  # plain loads, no copies through shared memory
        c, h = _tile_rows(r, chan0, h0, BLOCK_H)
        row_coef = coef * _in_window(h, r0, r1).to(ACC)  # the windows holding the row
        for col0 in tl.range(0, W, BLOCK_W, num_stages=1):
            cols = col0 + tl.arange(0, BLOCK_W)
            d, mask = _diff_tile(s_base, t_base, c, h, cols, C, H, W, stride_sc, stride_sh, stride_sw, stride_tc,
                                 stride_th, stride_tw, ACC)
            in_col_t = ((cols[None, :] >= c0[:, None]) & (cols[None, :] < c1[:, None])).to(ACC)  # [SLOTS, BLOCK_W]
            grad = g2 * (tl.full((), w0, ACC) * d + tl.dot(row_coef, in_col_t, input_precision=PRECISION,
                                                            out_dtype=ACC))
            if GRAD_S:
                tl.store(gs_ptr + n * stride_gsn + _tile_offsets(c, h, cols, stride_gsc, stride_gsh, stride_gsw),
                         grad.to(gs_ptr.dtype.element_ty), mask=mask)
            if GRAD_T:
                tl.store(gt_ptr + n * stride_gtn + _tile_offsets(c, h, cols, stride_gtc, stride_gth, stride_gtw),
                         (-grad).to(gt_ptr.dtype.element_ty), mask=mask)


def first_slot(H):
    """The first window slot present: ReviewKD pools to l x l for l in (4, 2, 1) with l < H."""
    return 0 if H > 4 else 16 if H > 2 else 20 if H > 1 else N_WINDOWS


def hcl_weights(N, C, H, W):
    """(w0, w4, w2, w1) of ReviewKD's hcl for one stage: cnt halves at each level used (l < H), tot = 1 + sum cnt."""
    cnt, tot, level_weights = 1.0, 1.0, {}
    for level in (4, 2, 1):
        if level < H:
            cnt /= 2.0
            tot += cnt
            level_weights[level] = cnt / (N * C * level * level)
    return (1.0 / (N * C * H * W * tot), *(level_weights.get(level, 0.0) / tot for level in (4, 2, 1)))


def tiles(C, H, W, channels_minor):
    """BLOCK_C, BLOCK_H, BLOCK_W and warps: tiles of BLOCK_C * BLOCK_H map rows (>= 16, the window dots' minimum)
    by BLOCK_W >= 16 columns, about TILE elements; channels_last maps take one map row of 16 to 64 channels."""
    np2 = triton.next_power_of_2
    if channels_minor:
        block_c = min(max(np2(C), 16), 64)
        block_h, block_w = 1, min(max(np2(W), 16), TILE // block_c)
    else:
        block_w = min(max(np2(W), 16), 64)
        block_h = min(np2(H), TILE // block_w)
        block_c = min(np2(C), TILE // (block_h * block_w))
        while block_c * block_h < 16:
            block_h *= 2
    return dict(BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4)


def _launch_config(f_s, f_t):
    N, C, H, W = f_s.shape
    check_span(f_s)
    check_span(f_t)
    meta = tiles(C, H, W, f_s.stride(1) == 1 and C > 1)
    exact = any(x.dtype in (torch.float32, torch.float64) for x in (f_s, f_t))
    meta.update(FIRST_SLOT=first_slot(H), PRECISION="ieee" if exact else "tf32x3",
                ACC=tl_acc_dtype(f_s.dtype, f_t.dtype))
    return (N, triton.cdiv(C, meta["BLOCK_C"])), meta


def saves_pooled(f_s, f_t):
    """Whether the forward saves the pooled means ([N, C, 21 - FIRST_SLOT], fp32/fp64): only when that is no
    larger than either input; otherwise the backward recomputes them."""
    N, C, H, _ = f_s.shape
    acc_size = 8 if torch.float64 in (f_s.dtype, f_t.dtype) else 4
    saved_bytes = N * C * (N_WINDOWS - first_slot(H)) * acc_size
    return 0 < saved_bytes <= min(f_s.numel() * f_s.element_size(), f_t.numel() * f_t.element_size())


def hcl_forward(f_s, f_t):
    """One stage's loss (0-dim, fp32; fp64 for fp64 inputs) and the pooled means of d, or an empty [0] tensor
    when they are not saved."""
    N, C, H, W = f_s.shape
    grid, meta = _launch_config(f_s, f_t)
    acc = torch.float64 if meta["ACC"] == tl.float64 else torch.float32
    partial = torch.empty(grid, dtype=acc, device=f_s.device)
    save = saves_pooled(f_s, f_t)
    pooled = torch.empty((N, C, N_WINDOWS - meta["FIRST_SLOT"]) if save else (0,), dtype=acc, device=f_s.device)
    hcl_forward_kernel[grid](
        f_s, f_t, partial, pooled if save else partial, C, H, W, *f_s.stride(), *f_t.stride(),
        *hcl_weights(N, C, H, W), SAVE=save, **meta,
    )
    return partial.sum(), pooled


def hcl_backward(grad_loss, f_s, f_t, pooled, grad_s, grad_t):
    """(dL/df_s, dL/df_t), each in its input's dtype and memory format, or None where not asked."""
    N, C, H, W = f_s.shape
    grid, meta = _launch_config(f_s, f_t)
    gs = torch.empty_like(f_s) if grad_s else None
    gt = torch.empty_like(f_t) if grad_t else None
    out_s, out_t = (gs if grad_s else gt), (gt if grad_t else gs)
    hcl_backward_kernel[grid](
        f_s, f_t, pooled if pooled.dim() == 3 else grad_loss, grad_loss, out_s, out_t, C, H, W,
        *f_s.stride(), *f_t.stride(), *out_s.stride(), *out_t.stride(), *hcl_weights(N, C, H, W),
        SAVED=pooled.dim() == 3, GRAD_S=grad_s, GRAD_T=grad_t, **meta,
    )
    return gs, gt
