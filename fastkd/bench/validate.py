"""No GPU: every fused kernel under the Triton interpreter against the fp64 reference, and its bytes."""
import torch

from .losses import forward_backward, inputs, model_bytes, rel_err, to_fp64

# Largest norm-wise relative errors accepted against fp64 (output or loss, gradient).  A bf16 softmax
# gradient comes from the bf16 output, as torch's does: torch's own bf16 softmax is ~3% off here too.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}
SOFTMAX_BF16_TOLERANCE = (1e-2, 5e-2)
SHAPES = [(3, 2), (5, 37), (4, 4096), (2, 9000)]  # rows, V: tiny (DKD needs 2), odd, one block, several blocks
BYTES_SHAPE = (8, 4096)


def validate(losses, progress):
    """Rows of the validation table: errors against fp64 and bytes per logit element (forward + backward)."""
    import fastkd
    from fastkd import reference
    from fastkd.interpreter import round_bf16
    from fastkd.traffic import EagerBytes, count_bytes

    round_bf16()
    rows = []
    for name, dtype in progress([(n, d) for n in losses for d in (torch.float32, torch.bfloat16)]):
        worst_out = worst_grad = 0.0
        for n, V in SHAPES:
            s, t = inputs(n, V, dtype, "cpu", name=name)
            out, grad = forward_backward(name, fastkd, s, t)
            ref_out, ref_grad = forward_backward(name, reference, s.detach().double().requires_grad_(), to_fp64(t))
            if dtype == torch.bfloat16 and "softmax" in name:
                ref_out = ref_out.to(dtype)  # the output itself is rounded to bf16
            worst_out = max(worst_out, rel_err(out, ref_out))
            worst_grad = max(worst_grad, rel_err(grad, ref_grad))
        s, t = inputs(*BYTES_SHAPE, dtype, "cpu", name=name)
        elems = s.numel() * s.element_size()
        with count_bytes(stream_numel=s.numel()) as traffic:
            forward_backward(name, fastkd, s, t)
        with EagerBytes() as eager:
            forward_backward(name, reference, s, t)
        rows.append({
            "loss": name, "dtype": str(dtype).replace("torch.", ""),
            "rel_err_out": worst_out, "rel_err_grad": worst_grad,
            "fused_bytes_per_elem": (traffic.read + traffic.written) / elems,
            "fused_stream_bytes_per_elem": traffic.streams / elems,
            "model_bytes_per_elem": model_bytes(name, "forward+backward"),
            "eager_bytes_per_elem": eager.total / elems,
        })
    return rows


def within_tolerance(row):
    dtype = getattr(torch, row["dtype"])
    out_tol, grad_tol = SOFTMAX_BF16_TOLERANCE if "softmax" in row["loss"] and dtype == torch.bfloat16 \
        else TOLERANCE[dtype]
    return row["rel_err_out"] <= out_tol and row["rel_err_grad"] <= grad_tol
