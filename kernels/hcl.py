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

Kernels, per (sample n, block of channels), whole planes (tiles of [BLOCK_C, BLOCK_H, BLOCK_W], looping):
  hcl_forward_kernel   reads f_s and f_t once; writes the program's partial loss and, if SAVE, the pooled
                       means P (fp32, [N, C, 21 - FIRST_SLOT])
  hcl_backward_kernel  reads P (or, if not SAVE, recomputes it in a first pass over f_s and f_t), then reads
                       f_s and f_t once more and writes
                           dL/df_s = -dL/df_t = 2 g (w0 d + sum over windows k holding the element of w_l P_k / |k|)
                       the window sum separable: per level and column window j, a per-row coefficient.
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
def _bounds(i, size, LEVEL: tl.constexpr):
    """adaptive_avg_pool's window i of `size` positions split into LEVEL: [floor(i size / l), ceil((i+1) size / l))."""
    return (i * size) // LEVEL, ((i + 1) * size + LEVEL - 1) // LEVEL


@triton.jit
def _level_weights(inv_size, weight, H, W, w, LEVEL: tl.constexpr, BASE: tl.constexpr):
    k = tl.arange(0, SLOTS)
    for i in tl.static_range(LEVEL):
        r0, r1 = _bounds(i, H, LEVEL)
        for j in tl.static_range(LEVEL):
            c0, c1 = _bounds(j, W, LEVEL)
            here = k == BASE + i * LEVEL + j
            inv_size = tl.where(here, 1.0 / ((r1 - r0) * (c1 - c0)).to(inv_size.dtype), inv_size)
            weight = tl.where(here, w, weight)
    return inv_size, weight


@triton.jit
def _window_weights(H, W, w4, w2, w1, FIRST_SLOT: tl.constexpr, ACC: tl.constexpr):
    """Per slot: (1 / |window|, w_l) for the windows present, 0 elsewhere ([SLOTS] each)."""
    inv_size = tl.zeros((SLOTS,), ACC)
    weight = tl.zeros((SLOTS,), ACC)
    if FIRST_SLOT <= 0:
        inv_size, weight = _level_weights(inv_size, weight, H, W, tl.full((), w4, ACC), 4, 0)
    if FIRST_SLOT <= 16:
        inv_size, weight = _level_weights(inv_size, weight, H, W, tl.full((), w2, ACC), 2, 16)
    if FIRST_SLOT <= 20:
        inv_size, weight = _level_weights(inv_size, weight, H, W, tl.full((), w1, ACC), 1, 20)
    return inv_size, weight


@triton.jit
def _diff_tile(s_base, t_base, chans, rows, cols, C, H, W, ss_c, ss_h, ss_w, st_c, st_h, st_w, ACC: tl.constexpr):
    """d = f_s - f_t on a [BLOCK_C, BLOCK_H, BLOCK_W] tile (0 outside the map) and its mask."""
    c3 = chans[:, None, None]
    h3 = rows[None, :, None]
    w3 = cols[None, None, :]
    mask = (c3 < C) & (h3 < H) & (w3 < W)
    s = tl.load(s_base + c3 * ss_c + h3 * ss_h + w3 * ss_w, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_base + c3 * st_c + h3 * st_h + w3 * st_w, mask=mask, other=0.0).to(ACC)
    return s - t, mask


@triton.jit
def _add_level_sums(sums, d, rows, cols, H, W, LEVEL: tl.constexpr, BASE: tl.constexpr):
    k = tl.arange(0, SLOTS)
    for j in tl.static_range(LEVEL):
        c0, c1 = _bounds(j, W, LEVEL)
        col_sums = tl.sum(tl.where(((cols >= c0) & (cols < c1))[None, None, :], d, 0.0), 2)  # [BLOCK_C, BLOCK_H]
        for i in tl.static_range(LEVEL):
            r0, r1 = _bounds(i, H, LEVEL)
            window = tl.sum(tl.where(((rows >= r0) & (rows < r1))[None, :], col_sums, 0.0), 1)  # [BLOCK_C]
            sums += tl.where(k[None, :] == BASE + i * LEVEL + j, window[:, None], 0.0)
    return sums


@triton.jit
def _plane_sums(s_base, t_base, chans, C, H, W, ss_c, ss_h, ss_w, st_c, st_h, st_w,
                FIRST_SLOT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr):
    """One pass over the planes of `chans`: (window sums of d [BLOCK_C, SLOTS], sum of d^2 [BLOCK_C]); the
    column windows are summed first, then their rows (separable)."""
    sums = tl.zeros((BLOCK_C, SLOTS), ACC)
    squares = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), ACC)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            d, _ = _diff_tile(s_base, t_base, chans, rows, cols, C, H, W, ss_c, ss_h, ss_w, st_c, st_h, st_w, ACC)
            squares += d * d
            if FIRST_SLOT <= 0:
                sums = _add_level_sums(sums, d, rows, cols, H, W, 4, 0)
            if FIRST_SLOT <= 16:
                sums = _add_level_sums(sums, d, rows, cols, H, W, 2, 16)
            if FIRST_SLOT <= 20:
                sums = _add_level_sums(sums, d, rows, cols, H, W, 1, 20)
    return sums, tl.sum(tl.sum(squares, 2), 1)


@triton.jit
def _saved_slots(pooled_ptr, n, chans, C, FIRST_SLOT: tl.constexpr):
    """Pointers [BLOCK_C, SLOTS] into the saved means [N, C, 21 - FIRST_SLOT] and their mask."""
    k = tl.arange(0, SLOTS)
    ptrs = pooled_ptr + (n * C + chans[:, None]) * (21 - FIRST_SLOT) + (k[None, :] - FIRST_SLOT)
    return ptrs, (chans < C)[:, None] & (k >= FIRST_SLOT)[None, :] & (k < 21)[None, :]


@triton.jit
def hcl_forward_kernel(
    s_ptr, t_ptr, partial_ptr, pooled_ptr, C, H, W,
    ss_n, ss_c, ss_h, ss_w, st_n, st_c, st_h, st_w,
    w0: tl.float64, w4: tl.float64, w2: tl.float64, w1: tl.float64,
    FIRST_SLOT: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per (sample n, block of channels): reads those planes of f_s and f_t once; writes partial[n, block] =
    w0 sum d^2 + sum_k w_l P_k^2 and, if SAVE, pooled[n, c, k - FIRST_SLOT] = P_k (the window means of d)."""
    n = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sums, squares = _plane_sums(s_ptr + n * ss_n, t_ptr + n * st_n, chans, C, H, W, ss_c, ss_h, ss_w,
                                st_c, st_h, st_w, FIRST_SLOT, ACC, BLOCK_C, BLOCK_H, BLOCK_W)
    inv_size, weight = _window_weights(H, W, w4, w2, w1, FIRST_SLOT, ACC)
    means = sums * inv_size[None, :]
    partial = tl.sum(tl.full((), w0, ACC) * squares + tl.sum(means * means * weight[None, :], 1), 0)
    tl.store(partial_ptr + n * tl.num_programs(1) + tl.program_id(1), partial)
    if SAVE:
        ptrs, mask = _saved_slots(pooled_ptr, n, chans, C, FIRST_SLOT)
        tl.store(ptrs, means, mask=mask)


@triton.jit
def _add_level_grad(grad, coef, rows, cols, H, W, LEVEL: tl.constexpr, BASE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad += coef[window] over the windows of a level holding each element (per column window, a row coefficient)."""
    k = tl.arange(0, SLOTS)
    for j in tl.static_range(LEVEL):
        c0, c1 = _bounds(j, W, LEVEL)
        row_coef = tl.zeros((BLOCK_C, BLOCK_H), ACC)
        for i in tl.static_range(LEVEL):
            r0, r1 = _bounds(i, H, LEVEL)
            window = tl.sum(tl.where(k[None, :] == BASE + i * LEVEL + j, coef, 0.0), 1)  # [BLOCK_C]
            row_coef += tl.where(((rows >= r0) & (rows < r1))[None, :], window[:, None], 0.0)
        grad += tl.where(((cols >= c0) & (cols < c1))[None, None, :], row_coef[:, :, None], 0.0)
    return grad


@triton.jit
def hcl_backward_kernel(
    s_ptr, t_ptr, pooled_ptr, grad_loss_ptr, gs_ptr, gt_ptr, C, H, W,
    ss_n, ss_c, ss_h, ss_w, st_n, st_c, st_h, st_w, gs_n, gs_c, gs_h, gs_w, gt_n, gt_c, gt_h, gt_w,
    w0: tl.float64, w4: tl.float64, w2: tl.float64, w1: tl.float64,
    FIRST_SLOT: tl.constexpr, SAVED: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per (sample n, block of channels): reads the pooled means (SAVED) or recomputes them (one more read of the
    planes), then reads f_s and f_t once and writes dL/df_s and/or dL/df_t = -dL/df_s (module docstring)."""
    n = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_base = s_ptr + n * ss_n
    t_base = t_ptr + n * st_n
    inv_size, weight = _window_weights(H, W, w4, w2, w1, FIRST_SLOT, ACC)
    means = tl.zeros((BLOCK_C, SLOTS), ACC)
    if SAVED:
        ptrs, mask = _saved_slots(pooled_ptr, n, chans, C, FIRST_SLOT)
        means = tl.load(ptrs, mask=mask, other=0.0)
    elif FIRST_SLOT < 21:  # levels present, means not saved
        sums, _ = _plane_sums(s_base, t_base, chans, C, H, W, ss_c, ss_h, ss_w, st_c, st_h, st_w, FIRST_SLOT, ACC,
                              BLOCK_C, BLOCK_H, BLOCK_W)
        means = sums * inv_size[None, :]
    coef = means * (weight * inv_size)[None, :]  # an element's share: w_l P_k / |k|
    g2 = 2.0 * tl.load(grad_loss_ptr).to(ACC)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        for c0 in range(0, W, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            d, mask = _diff_tile(s_base, t_base, chans, rows, cols, C, H, W, ss_c, ss_h, ss_w, st_c, st_h, st_w, ACC)
            grad = tl.full((), w0, ACC) * d
            if FIRST_SLOT <= 0:
                grad = _add_level_grad(grad, coef, rows, cols, H, W, 4, 0, ACC, BLOCK_C, BLOCK_H)
            if FIRST_SLOT <= 16:
                grad = _add_level_grad(grad, coef, rows, cols, H, W, 2, 16, ACC, BLOCK_C, BLOCK_H)
            if FIRST_SLOT <= 20:
                grad = _add_level_grad(grad, coef, rows, cols, H, W, 1, 20, ACC, BLOCK_C, BLOCK_H)
            grad *= g2
            c3 = chans[:, None, None]
            h3 = rows[None, :, None]
            w3 = cols[None, None, :]
            if GRAD_S:
                tl.store(gs_ptr + n * gs_n + c3 * gs_c + h3 * gs_h + w3 * gs_w, grad.to(gs_ptr.dtype.element_ty),
                         mask=mask)
            if GRAD_T:
                tl.store(gt_ptr + n * gt_n + c3 * gt_c + h3 * gt_h + w3 * gt_w, (-grad).to(gt_ptr.dtype.element_ty),
                         mask=mask)


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


def _blocks(C, H, W, channels_minor):
    """(BLOCK_C, BLOCK_H, BLOCK_W) of about TILE elements: whole rows first, or 32 channels for channels_last."""
    np2 = triton.next_power_of_2
    if channels_minor:
        block_c = min(np2(C), 32)
        block_w = min(np2(W), max(1, TILE // block_c))
        block_h = min(np2(H), max(1, TILE // (block_c * block_w)))
    else:
        block_w = min(np2(W), 64)
        block_h = min(np2(H), max(1, TILE // block_w))
        block_c = min(np2(C), max(1, TILE // (block_h * block_w)))
    return block_c, block_h, block_w


def _launch_config(f_s, f_t):
    N, C, H, W = f_s.shape
    check_span(f_s)
    check_span(f_t)
    block_c, block_h, block_w = _blocks(C, H, W, f_s.stride(1) == 1 and C > 1)
    meta = dict(FIRST_SLOT=first_slot(H), ACC=tl_acc_dtype(f_s.dtype, f_t.dtype), BLOCK_C=block_c, BLOCK_H=block_h,
                BLOCK_W=block_w, num_warps=4)
    return (N, triton.cdiv(C, block_c)), meta


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
