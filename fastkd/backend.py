"""Backend selection: fused Triton kernels or the eager reference.

`auto` (the default) picks Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1
(the Triton interpreter runs the real kernels on the CPU); otherwise the eager reference.
`use_backend(name)` overrides it inside a `with` block; the FASTKD_BACKEND environment variable
overrides it for the process (read at each call).
"""
import contextlib
import os

BACKENDS = ("auto", "triton", "reference")
_override = None


def _check(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run the fastkd calls inside the block on backend `name` ('auto', 'triton' or 'reference')."""
    global _override
    previous, _override = _override, _check(name, "backend")
    try:
        yield
    finally:
        _override = previous


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(x):
    """The backend ('triton' or 'reference') that a call on tensor `x` runs on."""
    name = _override or _check(os.environ.get("FASTKD_BACKEND", "auto"), "FASTKD_BACKEND")
    runnable = x.is_cuda or (x.device.type == "cpu" and _interpreting())
    if name == "auto":
        return "triton" if runnable else "reference"
    if name == "triton" and not runnable:
        raise ValueError(
            f"backend 'triton' cannot run on {x.device.type} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU"
        )
    return name
