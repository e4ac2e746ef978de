"""Hint-based (intermediate-feature) distillation losses: one file per method.

Each file holds the method's eager reference (written from its definition; also the CPU fallback),
its functional form (argument checks, then the fused Triton kernels where they pay, or the eager code),
and a thin nn.Module with the authors' defaults.
"""
