"""Test helpers for Triton kernels: offline NVIDIA compile reports and interpreter byte counting.

* ``compile_report`` compiles a kernel for an NVIDIA target without a GPU and reports registers,
  local-memory (spill) bytes and the SASS, so tests can check e.g. that loads are 128-bit.
(The interpreter byte counter lives in the package: ``fastkd.traffic.count_bytes``.)

Both work with Triton 3.6 and 3.9.
"""
import os
import re
import subprocess
import tempfile
import types
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

_NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_LDG_128 = re.compile(r"\bLDG(\.\w+)*\.128\b")
_STG_128 = re.compile(r"\bSTG(\.\w+)*\.128\b")


@dataclass(frozen=True)
class CompileReport:
    """Resource usage and SASS of one compiled kernel."""

    registers: int
    spill_bytes: int  # per-thread local memory (cuobjdump STACK + LOCAL); spills are what put bytes here
    sass: str

    @property
    def has_128bit_loads(self) -> bool:
        """Whether the SASS has a 128-bit global load (nvdisasm prints e.g. ``LDG.E.128``)."""
        return _LDG_128.search(self.sass) is not None

    @property
    def has_128bit_stores(self) -> bool:
        """Whether the SASS has a 128-bit global store (nvdisasm prints e.g. ``STG.E.128``)."""
        return _STG_128.search(self.sass) is not None


def _as_jit(kernel, memo=None):
    """Return a compilable ``JITFunction`` for ``kernel``.

    Unwraps ``triton.autotune`` / ``triton.heuristics`` wrappers. Under ``TRITON_INTERPRET=1``
    ``@triton.jit`` yields ``InterpretedFunction`` objects; these are re-wrapped as
    ``JITFunction`` together with the interpreted ``@triton.jit`` helpers the kernel references by
    global or closure name (helpers reached as ``module.attr`` are not converted).
    """
    while not isinstance(kernel, (JITFunction, interpreter.InterpretedFunction)):
        kernel = kernel.fn
    if isinstance(kernel, JITFunction):
        return kernel
    memo = {} if memo is None else memo
    if kernel in memo:
        return memo[kernel]
    fn = kernel.fn
    scope = dict(fn.__globals__)
    closure = fn.__closure__ and tuple(types.CellType(cell.cell_contents) for cell in fn.__closure__)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, closure)
    for attr in ("__kwdefaults__", "__annotations__", "__module__", "__qualname__", "__doc__"):
        setattr(clone, attr, getattr(fn, attr))
    memo[kernel] = jit = JITFunction(clone, **kernel.kwargs)
    for name in fn.__code__.co_names:
        if isinstance(scope.get(name), interpreter.InterpretedFunction):
            scope[name] = _as_jit(scope[name], memo)
    for cell in closure or ():
        if isinstance(cell.cell_contents, interpreter.InterpretedFunction):
            cell.cell_contents = _as_jit(cell.cell_contents, memo)
    return jit


def _tool(name, *args):
    return subprocess.run([os.path.join(_NVIDIA_BIN, name), *args], check=True, capture_output=True,
                          text=True).stdout


def compile_report(kernel, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                   divisibility: dict | None = None) -> CompileReport:
    """Compile ``kernel`` for ``sm_<arch>`` (no GPU needed) and report its resource usage and SASS.

    ``signature`` maps runtime argument names to Triton types (``"*bf16"``, ``"i32"``, ``"fp32"``...);
    ``constexprs`` maps constexpr argument names to values (defaults fill the rest).
    ``divisibility`` maps argument names to ``tt.divisibility`` hints; pointer arguments default to
    16 (as a launch with 16-byte aligned tensors does). A launch specializes an integer argument
    that is a multiple of 16 the same way, so pass e.g. ``{"stride": 16}`` to model that.
    """
    jit = _as_jit(kernel)
    hints = {name: 16 for name, ty in signature.items() if ty.startswith("*")} | (divisibility or {})
    attrs = {(jit.arg_names.index(name), ): [["tt.divisibility", value]] for name, value in hints.items()}
    full_signature = {name: signature.get(name, "constexpr") for name in jit.arg_names}
    defaults = {p.name: p.default for p in jit.params if p.is_constexpr and p.has_default}
    src = ASTSource(fn=jit, signature=full_signature, constexprs=defaults | constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _tool("cuobjdump", "--dump-resource-usage", cubin)
        sass = _tool("nvdisasm", cubin)
    line = re.search(rf"Function {re.escape(compiled.metadata.name)}:\s*\n(.*)", usage).group(1)
    res = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
    return CompileReport(registers=res["REG"], spill_bytes=res["STACK"] + res["LOCAL"], sass=sass)
