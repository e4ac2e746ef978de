"""Argument checks shared by the fused API and the modules: a clear error that names the argument."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("batchmean", "sum", "none")


def check_logits(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64 logits, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")


def check_pair(student, teacher):
    check_logits(student, "student_logits")
    check_logits(teacher, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student.device} and {teacher.device}"
        )


def check_number(value, name, low, high, low_open=False):
    """A finite real number in [low, high] (or (low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be finite and in {interval}, got {value}")
    return value


def check_temperature(temperature):
    return check_number(temperature, "temperature", 0.0, math.inf, low_open=True)


def check_reduction(reduction):
    if reduction == "mean":
        raise ValueError(
            "reduction='mean' is refused: torch's elementwise mean divides the KL by N*V and is not a "
            "divergence; use 'batchmean' (sum over rows / counted rows), 'sum' or 'none'"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_labels(labels, logits, name="labels"):
    """Integer labels of the leading shape of `logits`, on its device (None passes)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} must have the leading shape of the logits {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{name} must be on the logits' device {logits.device}, got {labels.device}")


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def range_checkable(target):
    """Whether checking a target's range is free: on the CPU (no device to wait for), outside torch.compile."""
    return target.device.type == "cpu" and not torch.compiler.is_compiling()


def refuse_out_of_range(ids, V, exempt, message):
    """On the CPU (free to check: no device to wait for), a ValueError for entries of `ids` outside [0, V)
    other than the `exempt` ones; on a GPU the kernels give those rows NaN instead of a host sync."""
    if range_checkable(ids):
        bad = ~exempt & ((ids < 0) | (ids >= V))
        if bad.any():
            raise ValueError(f"{message}, got {ids[bad].flatten()[:5].tolist()}")


def dkd_classes(V):
    if V < 2:
        raise ValueError(f"dkd needs V >= 2 classes (no non-target class when V = 1), got V = {V}")


def target_range(target, V, ignore_index):
    refuse_out_of_range(target, V, target == ignore_index, f"target must be in [0, {V}) or ignore_index={ignore_index}")


def dkd_target(target, logits, ignore_index):
    """DKD's target as hard labels of the leading shape: a [..., V] target (mixup, label smoothing)
    is reduced by argmax, as in the seed; V = 1 has no non-target class and is refused.  On the CPU
    a target outside [0, V) is refused here (no device to sync); on a GPU it gives a NaN row."""
    V = logits.shape[-1]
    dkd_classes(V)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape == logits.shape and target.dim() >= 2:
        target = target.argmax(-1)
    elif target.dtype.is_floating_point:
        raise TypeError(f"a hard target must be an integer tensor, got {target.dtype} (a soft target has the "
                        f"logits' shape {tuple(logits.shape)})")
    check_labels(target, logits, "target")
    target_range(target, V, ignore_index)
    return target


def sparse_teacher(teacher_ids, teacher_values, logits, values, missing):
    """A top-k teacher: integer ids and float values [..., K], K >= 1, leading dims those of the logits.
    On the CPU an id outside [0, V) whose value is not -inf (padding) is refused; on a GPU it gives a NaN row."""
    if values not in ("logprobs", "logits"):
        raise ValueError(f"values must be 'logprobs' or 'logits', got {values!r}")
    if missing not in ("tail", "renormalize"):
        raise ValueError(f"missing must be 'tail' or 'renormalize', got {missing!r}")
    if values == "logits" and missing == "tail":
        raise ValueError("missing='tail' needs values='logprobs': K teacher logits do not say how much mass lies "
                         "outside the K ids; pass log-probs or use missing='renormalize'")
    for t, name in ((teacher_ids, "teacher_ids"), (teacher_values, "teacher_values")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != logits.dim() or t.shape[:-1] != logits.shape[:-1] or t.shape[-1] == 0:
            raise ValueError(f"{name} must have shape [..., K], K >= 1, with the logits' leading shape "
                             f"{tuple(logits.shape[:-1])}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} must be on the logits' device {logits.device}, got {t.device}")
    if teacher_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_ids must be int32 or int64, got {teacher_ids.dtype}")
    if teacher_values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_values must be a float tensor, got {teacher_values.dtype}")
    if teacher_ids.shape != teacher_values.shape:
        raise ValueError(f"teacher_ids and teacher_values must have the same shape, got {tuple(teacher_ids.shape)} "
                         f"and {tuple(teacher_values.shape)}")
    if teacher_values.requires_grad:
        raise ValueError("teacher_values must not require grad: the sparse teacher is a constant (detach it)")
    V = logits.shape[-1]
    refuse_out_of_range(teacher_ids, V, teacher_values == float("-inf"),
                        f"teacher_ids must be in [0, {V}) where teacher_values is not -inf (padding)")
