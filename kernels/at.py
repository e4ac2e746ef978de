"""Attention transfer (Zagoruyko & Komodakis 2017): channel-pooled powers of a feature map, L2-normalised
per sample, compared between student and teacher.

A feature map [N, C, H, W] is read as [N, C, L] (L = H W) with its own strides (NCHW, channels_last);
offsets inside a sample are int32 (the launcher checks a sample spans < 2^31 elements), the sample
offset n * stride_n is int64.

    q[n, l] = scale * sum_c pow(f[n, c, l])        scale = 1/C ("code": the mean) or 1 ("paper": the sum)
    a = q / max(||q||, eps)                         (F.normalize)
    d = a_s - a_t;  per sample: "code" sum_l d^2, "paper" ||d||, both times `scale` of the loss

Kernels:
  at_map_kernel            per (sample, block of L): reads f once, writes q (fp32, [N, L])
  at_map_grad_kernel       per (sample, block of L): reads f and dq once, writes df = dq * scale * pow'(f)
  at_distance_kernel       per sample: reads q_s, q_t twice (norms, then d); writes the sample's loss and
                           stats (||q_s||, ||q_t||, sigma_s = a_s . d, sigma_t = a_t . d, dist)
  at_distance_grad_kernel  per sample: reads q_s, q_t; writes dq_s, dq_t:
      g_s = dL/da_s = G d (G = 2 w "code", w / dist "paper", 0 where dist = 0; w = incoming grad * loss scale)
      dq_s = (g_s - [||q_s|| >= eps] a_s (a_s . g_s)) / max(||q_s||, eps),  a_s . g_s = G sigma_s
      dq_t likewise with g_t = -G d, a_t . g_t = -G sigma_t
pow(x) by POWER: SQUARE x^2; ABS |x|^p (even integer p, or the paper's |f|^p); ODD sign(x)|x|^p (odd
integer p); REAL x^p for real p (NaN for x < 0, as torch's pow).
"""
import torch
import triton
import triton.language as tl

from .common import tl_acc_dtype

SQUARE, ABS, ODD, REAL = (tl.constexpr(kind) for kind in range(4))  # POWER: how pow(x) is computed
POWERS = {"square": SQUARE, "abs": ABS, "odd": ODD, "real": REAL}  # the launchers' names for them
N_STATS = tl.constexpr(5)  # per sample: ||q_s||, ||q_t||, sigma_s, sigma_t, dist (sum d^2 or ||d||)
TILE = 4096  # elements of f per program and step
MAX_BLOCK_L = 128


@triton.jit
def _abs_pow(x, p):
    """|x|^p for p > 0 (0 at x = 0)."""
    return tl.exp(p * tl.log(tl.abs(x)))


@triton.jit
def power(x, p, POWER: tl.constexpr):
    """pow(x) (module docstring), 0 at x = 0."""
    if POWER == SQUARE:
        return x * x
    elif POWER == ABS:
        return _abs_pow(x, p)
    elif POWER == ODD:
        return tl.where(x < 0, -_abs_pow(x, p), _abs_pow(x, p))
    else:
        return tl.where(x < 0, float("nan"), _abs_pow(x, p))


@triton.jit
def power_grad(x, p, POWER: tl.constexpr):
    """d pow(x) / dx: 2x; p |x|^(p-1) sign(x); p |x|^(p-1); p x^(p-1) (NaN for x < 0), with 0^0 = 1."""
    if POWER == SQUARE:
        return 2.0 * x
    else:
        r = p * tl.where(p == 1.0, 1.0, tl.exp((p - 1.0) * tl.log(tl.abs(x))))
        if POWER == ABS:  # sign(0) = 0, as torch's abs backward (NaN where r is infinite: p < 1 at 0, as torch)
            return tl.where(x < 0, -r, tl.where(x > 0, r, 0.0 * r))
        elif POWER == ODD:
            return r
        else:
            return tl.where(x < 0, float("nan"), r)


@triton.jit
def _tile_offsets(chans, cols, stride_c, stride_l):
    return chans[:, None] * stride_c + cols[None, :] * stride_l


@triton.jit
def at_map_kernel(
    f_ptr, q_ptr, C, L, stride_n, stride_c, stride_l, p: tl.float64, scale: tl.float64,
    POWER: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per (sample n, block of L): reads f[n, :, block] once; writes q[n, block] = scale * sum_c pow(f)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    p_acc = tl.full((), p, ACC)
    base = f_ptr + n * stride_n
    acc = tl.zeros((BLOCK_C, BLOCK_L), ACC)
    for c0 in range(0, C, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        mask = (chans < C)[:, None] & col_ok[None, :]
        x = tl.load(base + _tile_offsets(chans, cols, stride_c, stride_l), mask=mask, other=0.0).to(ACC)
        acc += tl.where(mask, power(x, p_acc, POWER), 0.0)
    q = tl.sum(acc, 0) * tl.full((), scale, ACC)
    tl.store(q_ptr + n * L + cols, q, mask=col_ok)


@triton.jit
def at_map_grad_kernel(
    f_ptr, dq_ptr, df_ptr, C, L, stride_n, stride_c, stride_l, stride_gn, stride_gc, stride_gl,
    p: tl.float64, scale: tl.float64,
    POWER: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per (sample n, block of L): reads dq[n, block] and f[n, :, block] once; writes
    df[n, :, block] = dq * scale * pow'(f) (in df's dtype and strides)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    p_acc = tl.full((), p, ACC)
    dq = tl.load(dq_ptr + n * L + cols, mask=col_ok, other=0.0) * tl.full((), scale, ACC)
    base = f_ptr + n * stride_n
    out = df_ptr + n * stride_gn
    for c0 in range(0, C, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        mask = (chans < C)[:, None] & col_ok[None, :]
        x = tl.load(base + _tile_offsets(chans, cols, stride_c, stride_l), mask=mask, other=0.0).to(ACC)
        df = dq[None, :] * power_grad(x, p_acc, POWER)
        tl.store(out + _tile_offsets(chans, cols, stride_gc, stride_gl), df.to(df_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def at_distance_kernel(
    qs_ptr, qt_ptr, loss_ptr, stats_ptr, L, eps: tl.float64, scale: tl.float64,
    PAPER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per sample n: reads q_s[n], q_t[n] twice; writes loss[n] = scale * (sum d^2, or ||d|| if PAPER) and
    stats[n] = (||q_s||, ||q_t||, a_s . d, a_t . d, sum d^2 or ||d||)."""
    n = tl.program_id(0).to(tl.int64)
    ss = tl.zeros((BLOCK,), ACC)
    tt = tl.zeros((BLOCK,), ACC)
    for l0 in range(0, L, BLOCK):
        cols = l0 + tl.arange(0, BLOCK)
        q_s = tl.load(qs_ptr + n * L + cols, mask=cols < L, other=0.0)
        q_t = tl.load(qt_ptr + n * L + cols, mask=cols < L, other=0.0)
        ss += q_s * q_s
        tt += q_t * q_t
    norm_s = tl.sqrt(tl.sum(ss, 0))
    norm_t = tl.sqrt(tl.sum(tt, 0))
    eps_acc = tl.full((), eps, ACC)
    inv_s = 1.0 / tl.maximum(norm_s, eps_acc)
    inv_t = 1.0 / tl.maximum(norm_t, eps_acc)
    dd = tl.zeros((BLOCK,), ACC)
    sd = tl.zeros((BLOCK,), ACC)
    td = tl.zeros((BLOCK,), ACC)
    for l0 in range(0, L, BLOCK):
        cols = l0 + tl.arange(0, BLOCK)
        a_s = tl.load(qs_ptr + n * L + cols, mask=cols < L, other=0.0) * inv_s
        a_t = tl.load(qt_ptr + n * L + cols, mask=cols < L, other=0.0) * inv_t
        d = a_s - a_t
        dd += d * d
        sd += a_s * d
        td += a_t * d
    dist = tl.sum(dd, 0)
    if PAPER:
        dist = tl.sqrt(dist)
    tl.store(loss_ptr + n, dist * tl.full((), scale, ACC))
    base = stats_ptr + N_STATS * n
    tl.store(base, norm_s)
    tl.store(base + 1, norm_t)
    tl.store(base + 2, tl.sum(sd, 0))
    tl.store(base + 3, tl.sum(td, 0))
    tl.store(base + 4, dist)


@triton.jit
def at_distance_grad_kernel(
    qs_ptr, qt_ptr, stats_ptr, grad_loss_ptr, dqs_ptr, dqt_ptr, L, stride_g, eps: tl.float64, scale: tl.float64,
    PAPER: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per sample n: reads q_s[n], q_t[n] once; writes dq_s[n] and/or dq_t[n] (module docstring)."""
    n = tl.program_id(0).to(tl.int64)
    base = stats_ptr + N_STATS * n
    norm_s, norm_t = tl.load(base), tl.load(base + 1)
    sigma_s, sigma_t, dist = tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)
    w = tl.load(grad_loss_ptr + n * stride_g).to(ACC) * tl.full((), scale, ACC)
    if PAPER:  # d ||d|| = d / ||d||, 0 at d = 0 (as torch's norm)
        g = tl.where(dist > 0, w / tl.where(dist > 0, dist, 1.0), 0.0)
    else:
        g = 2.0 * w
    eps_acc = tl.full((), eps, ACC)
    inv_s = 1.0 / tl.maximum(norm_s, eps_acc)
    inv_t = 1.0 / tl.maximum(norm_t, eps_acc)
    proj_s = tl.where(norm_s >= eps_acc, sigma_s, 0.0)
    proj_t = tl.where(norm_t >= eps_acc, sigma_t, 0.0)
    for l0 in range(0, L, BLOCK):
        cols = l0 + tl.arange(0, BLOCK)
        a_s = tl.load(qs_ptr + n * L + cols, mask=cols < L, other=0.0) * inv_s
        a_t = tl.load(qt_ptr + n * L + cols, mask=cols < L, other=0.0) * inv_t
        d = a_s - a_t
        if GRAD_S:
            tl.store(dqs_ptr + n * L + cols, g * (d - a_s * proj_s) * inv_s, mask=cols < L)
        if GRAD_T:
            tl.store(dqt_ptr + n * L + cols, -g * (d - a_t * proj_t) * inv_t, mask=cols < L)


def check_span(x):
    """The kernels index inside a sample with int32: a sample must span fewer than 2^31 elements."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"a sample of the feature map spans {span + 1} elements; at most 2^31 are supported")


def as_samples(f):
    """[N, C, H, W] -> [N, C, L] (a view when H and W collapse into one stride, else a copy)."""
    f3 = f.flatten(2)
    check_span(f3)
    return f3


def map_tiles(C, L):
    """Tile ([BLOCK_C, BLOCK_L] of about TILE elements) and warps of the map kernels for maps [N, C, L]."""
    block_l = min(triton.next_power_of_2(L), MAX_BLOCK_L)
    block_c = max(1, min(triton.next_power_of_2(C), TILE // block_l))
    return dict(BLOCK_C=block_c, BLOCK_L=block_l, num_warps=8 if block_c * block_l >= 2048 else 4)


def empty_like_samples(f3):
    """An uninitialised tensor shaped like the [N, C, L] view f3, channels-minor when f3 is (channels_last)."""
    N, C, L = f3.shape
    if f3.stride(1) == 1 and C > 1:
        return torch.empty(N, L, C, dtype=f3.dtype, device=f3.device).transpose(1, 2)
    return torch.empty(N, C, L, dtype=f3.dtype, device=f3.device)


def at_map(f, p, power, scale):
    """q [N, L] (fp32; fp64 for fp64 f) = scale * sum_c pow(f) of a feature map [N, C, H, W]."""
    f3 = as_samples(f)
    N, C, L = f3.shape
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    q = torch.empty(N, L, dtype=acc, device=f.device)
    tiles = map_tiles(C, L)
    at_map_kernel[(N, triton.cdiv(L, tiles["BLOCK_L"]))](
        f3, q, C, L, *f3.stride(), float(p), float(scale), POWER=POWERS[power], ACC=tl_acc_dtype(f.dtype), **tiles)
    return q


def at_map_grad(f, dq, p, power, scale):
    """dL/df [N, C, H, W] (f's dtype and memory format) from dL/dq [N, L]."""
    f3 = as_samples(f)
    N, C, L = f3.shape
    df3 = empty_like_samples(f3)
    tiles = map_tiles(C, L)
    at_map_grad_kernel[(N, triton.cdiv(L, tiles["BLOCK_L"]))](
        f3, dq.contiguous(), df3, C, L, *f3.stride(), *df3.stride(), float(p), float(scale), POWER=POWERS[power],
        ACC=tl_acc_dtype(f.dtype, dq.dtype), **tiles)
    return df3.view(f.shape)


def _row_block(L):
    return min(triton.next_power_of_2(L), 1024)


def at_distance(q_s, q_t, eps, scale, paper):
    """Per-sample losses [N] and stats [N, 5] of two attention maps [N, L]."""
    N, L = q_s.shape
    loss = torch.empty(N, dtype=q_s.dtype, device=q_s.device)
    stats = torch.empty(N, N_STATS.value, dtype=q_s.dtype, device=q_s.device)
    at_distance_kernel[(N,)](q_s, q_t, loss, stats, L, float(eps), float(scale), PAPER=paper,
                             ACC=tl_acc_dtype(q_s.dtype), BLOCK=_row_block(L))
    return loss, stats


def at_distance_grad(grad_loss, q_s, q_t, stats, eps, scale, paper, grad_s, grad_t):
    """(dL/dq_s, dL/dq_t) [N, L], None where not asked."""
    N, L = q_s.shape
    dq_s = torch.empty_like(q_s) if grad_s else None
    dq_t = torch.empty_like(q_t) if grad_t else None
    g = grad_loss if grad_loss.dim() else grad_loss.expand(N)
    at_distance_grad_kernel[(N,)](
        q_s, q_t, stats, g, dq_s if grad_s else dq_t, dq_t if grad_t else dq_s, L, g.stride(0), float(eps),
        float(scale), PAPER=paper, GRAD_S=grad_s, GRAD_T=grad_t, ACC=tl_acc_dtype(q_s.dtype), BLOCK=_row_block(L),
    )
    return dq_s, dq_t
