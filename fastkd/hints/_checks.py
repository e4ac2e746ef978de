"""Argument checks shared by the hint losses (a clear error that names the argument), and their accumulation dtype."""
import torch

from .._checks import FLOAT_DTYPES


def check_features(x, name, ranks=(4,)):
    """A floating tensor whose rank is one of `ranks` ([N, C, H, W] feature maps: 4; [N, D] embeddings: 2)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() not in ranks:
        shapes = " or ".join({2: "[N, D]", 3: "[N, C, L]", 4: "[N, C, H, W]"}.get(r, f"rank {r}") for r in ranks)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_pair(f_s, f_t, names=("f_s", "f_t"), ranks=(4,), same=()):
    """Student and teacher features: each checked, same batch size and device, and equal sizes along
    the dims listed in `same` (e.g. (2, 3) for the spatial dims of feature maps)."""
    check_features(f_s, names[0], ranks)
    check_features(f_t, names[1], ranks)
    if f_s.device != f_t.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {f_s.device} and {f_t.device}")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size, got {f_s.shape[0]} and "
                         f"{f_t.shape[0]}")
    for d in same:
        if f_s.dim() > d and f_t.dim() > d and f_s.shape[d] != f_t.shape[d]:
            raise ValueError(f"{names[0]} and {names[1]} must match in dim {d}, got shapes {tuple(f_s.shape)} and "
                             f"{tuple(f_t.shape)}")


def stages(f_s, f_t, names=("f_s", "f_t")):
    """Student and teacher stages as two equally long lists (a single tensor is one stage)."""
    one = isinstance(f_s, torch.Tensor), isinstance(f_t, torch.Tensor)
    if one[0] != one[1]:
        raise TypeError(f"{names[0]} and {names[1]} must both be tensors or both be lists of tensors")
    if one[0]:
        return [f_s], [f_t]
    if not isinstance(f_s, (list, tuple)) or not isinstance(f_t, (list, tuple)):
        raise TypeError(f"{names[0]} and {names[1]} must be tensors or lists of tensors, got "
                        f"{type(f_s).__name__} and {type(f_t).__name__}")
    if len(f_s) != len(f_t) or not f_s:
        raise ValueError(f"{names[0]} and {names[1]} must list the same non-zero number of stages, got {len(f_s)} "
                         f"and {len(f_t)}")
    return list(f_s), list(f_t)


def acc_dtype(*xs):
    """float64 when an input is float64, else float32: the precision a hint loss is computed and returned in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def upcast(x):
    return x.to(acc_dtype(x))
