"""Reductions of per-row losses, on the device with no host sync (shared by the kernels and the references)."""


def reduce_rows(rows, labels, ignore_index, reduction, lead_shape):
    """`rows` ([N], ignored rows already 0) -> 'none': [lead_shape]; 'sum'; 'batchmean': sum / counted rows (0 if none)."""
    if reduction == "none":
        return rows.view(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if labels is None:
        return total / max(rows.numel(), 1)
    return total / (labels != ignore_index).sum().clamp_min(1)
