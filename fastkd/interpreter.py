"""Make the Triton interpreter round like the GPU.

The interpreter (Triton 3.6 to 3.9) converts float32 to bfloat16 by truncating the mantissa; the
GPU's `cvt.rn.bf16.f32` rounds to nearest even.  Truncation doubles the error of every bf16 output
(and made interpreted bf16 softmax gradients look twice as far from fp64 as torch's).  `round_bf16()`
replaces that one conversion with torch's round-to-nearest-even; the tests and the CPU bench apply it.
"""
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def round_bf16():
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16", False):
        return
    cast_impl = builder.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    cast.rounds_bf16 = True
    builder.cast_impl = cast
