"""DIST's host-side math: the loss and the gradient coefficients from the kernels' statistics, and the
merge of per-rank column statistics for the global-batch option.  O(N + V) torch ops on the device,
no host sync.  Notation as in kernels/dist.py: q = V p - 1; rows (S_ss, S_tt, S_st); columns
(mean q_s, mean q_t, M2_s, M2_t, C_st) over M counted rows."""
import torch


def _safe_div(num, den):
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def correlations(row_stats, col_stats, V, eps):
    """Per-row and per-column Pearson terms: (rho_rows, rho_cols) and the pieces of their gradients."""
    a = row_stats[:, 4].sqrt() / V  # |p_s - 1/V|
    b = row_stats[:, 5].sqrt() / V
    cov = row_stats[:, 6] / V**2
    d = a * b + eps
    u = col_stats[:, 2].sqrt() / V  # |p_s[:, c] - mean|
    w = col_stats[:, 3].sqrt() / V
    k = col_stats[:, 4] / V**2
    e = u * w + eps
    return dict(rho_rows=cov / d, a=a, b=b, cov=cov, d=d, rho_cols=k / e, u=u, w=w, k=k, e=e)


def loss(terms, count, V, beta, gamma, temperature, rho_rows_sum=None):
    """T^2 (beta (1 - mean_rows rho) + gamma (1 - mean_cols rho)); ignored rows have rho = 0."""
    rows = terms["rho_rows"].sum() if rho_rows_sum is None else rho_rows_sum
    inter = 1 - rows / count.clamp_min(1)
    intra = 1 - terms["rho_cols"].sum() / V
    return temperature**2 * (beta * inter + gamma * intra)


def coefficients(terms, col_stats, count, V, beta, gamma, temperature, grad, teacher):
    """Row [N, 3] and column [V, 4] coefficients of G = dL/dp_x (x = student, or teacher), times 1/T for
    the logits: G = r1 q_o + r2 q_x + k1 (q_o - mean_o) + k2 (q_x - mean_x), the columns kept centred (k1 is
    large where eps dominates, so k1 q_o + constant would cancel); a column whose centred norm is 0 adds nothing."""
    c0 = -grad * temperature / V
    own_a, other_a = (terms["b"], terms["a"]) if teacher else (terms["a"], terms["b"])
    own_u, other_u = (terms["w"], terms["u"]) if teacher else (terms["u"], terms["w"])
    mean_x, mean_o = (col_stats[:, 1], col_stats[:, 0]) if teacher else (col_stats[:, 0], col_stats[:, 1])
    d, e = terms["d"], terms["e"]
    row_scale = c0 * beta / count.clamp_min(1)
    col_scale = c0 * gamma / V
    k_rows = _safe_div(terms["cov"] * other_a, d * d * own_a)  # d rho / d |a| term
    k_cols = _safe_div(terms["k"] * other_u, e * e * own_u)
    row_coef = torch.stack([row_scale / d, -row_scale * k_rows, torch.zeros_like(d)], 1)
    col_coef = torch.stack([torch.where(other_u > 0, col_scale / e, 0.0), -col_scale * k_cols, mean_o, mean_x], 1)
    return row_coef, col_coef


def merge_columns(stats, counts):
    """Merge per-rank column statistics [R, V, 5] with row counts [R] in rank order (Chan et al.)."""
    mean_s, mean_t, m2_s, m2_t, c_st = stats[0].unbind(1)
    n = counts[0].to(stats.dtype)
    for r in range(1, stats.shape[0]):
        n_b = counts[r].to(stats.dtype)
        mb_s, mb_t, m2b_s, m2b_t, cb = stats[r].unbind(1)
        n_new = n + n_b
        frac = n_b / n_new.clamp_min(1)
        delta_s, delta_t = mb_s - mean_s, mb_t - mean_t
        mean_s, mean_t = mean_s + delta_s * frac, mean_t + delta_t * frac
        m2_s = m2_s + m2b_s + delta_s * delta_s * n * frac
        m2_t = m2_t + m2b_t + delta_t * delta_t * n * frac
        c_st = c_st + cb + delta_s * delta_t * n * frac
        n = n_new
    return torch.stack([mean_s, mean_t, m2_s, m2_t, c_st], 1)


def counted_rows(labels, ignore_index, n, like):
    if labels is None:
        return torch.tensor(float(n), dtype=like.dtype, device=like.device)
    return (labels != ignore_index).sum().to(like.dtype)


def forward(kernels, s, t, labels, beta, gamma, temperature, eps, ignore_index, group=None):
    """(loss, row_stats, col_stats, count) with the column statistics of the whole batch: this rank's,
    or with `group`, every rank's merged in rank order."""
    V = s.shape[-1]
    row_stats, col_stats = kernels.dist_stats(s, t, labels, temperature, ignore_index)
    count = counted_rows(labels, ignore_index, row_stats.shape[0], row_stats)
    terms = correlations(row_stats, col_stats, V, eps)
    rho_rows_sum = terms["rho_rows"].sum()
    if group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        gathered = [torch.empty_like(col_stats) for _ in range(world)]
        dist.all_gather(gathered, col_stats.contiguous(), group=group)
        totals = torch.stack([rho_rows_sum, count])
        counts = [torch.empty_like(totals) for _ in range(world)]
        dist.all_gather(counts, totals, group=group)
        counts = torch.stack(counts)
        col_stats = merge_columns(torch.stack(gathered), counts[:, 1])
        rho_rows_sum, count = counts[:, 0].sum(), counts[:, 1].sum()
        terms = correlations(row_stats, col_stats, V, eps)
    return loss(terms, count, V, beta, gamma, temperature, rho_rows_sum), row_stats, col_stats, count


def backward(kernels, grad, s, t, labels, row_stats, col_stats, count, beta, gamma, temperature, eps,
             ignore_index, grad_s, grad_t, scale=1.0):
    """(dL/ds, dL/dt) (None where not asked), times `scale` (the world size for the global batch)."""
    V = s.shape[-1]
    terms = correlations(row_stats, col_stats, V, eps)
    grads = []
    for index, (x, o, wanted) in enumerate(((s, t, grad_s), (t, s, grad_t))):
        if not wanted:
            grads.append(None)
            continue
        row_coef, col_coef = coefficients(terms, col_stats, count, V, beta, gamma, temperature, grad * scale,
                                          teacher=index == 1)
        grads.append(kernels.dist_grad(x, o, labels, row_stats, index, row_coef.contiguous(),
                                       col_coef.contiguous(), temperature, ignore_index))
    return grads


class GlobalDIST(torch.autograd.Function):
    """DIST with the intra-class term over the global batch of a data-parallel group (eager only)."""

    @staticmethod
    def forward(ctx, kernels, s, t, labels, beta, gamma, temperature, eps, ignore_index, group):
        import torch.distributed as dist

        out, row_stats, col_stats, count = forward(kernels, s, t, labels, beta, gamma, temperature, eps,
                                                   ignore_index, group)
        ctx.save_for_backward(s, t, labels, row_stats, col_stats, count)
        ctx.args = (kernels, beta, gamma, temperature, eps, ignore_index, dist.get_world_size(group))
        return out

    @staticmethod
    def backward(ctx, grad):
        s, t, labels, row_stats, col_stats, count = ctx.saved_tensors
        kernels, beta, gamma, temperature, eps, ignore_index, world = ctx.args
        gs, gt = backward(kernels, grad, s, t, labels, row_stats, col_stats, count, beta, gamma, temperature,
                          eps, ignore_index, ctx.needs_input_grad[1], ctx.needs_input_grad[2], scale=world)
        return None, gs, gt, None, None, None, None, None, None, None
