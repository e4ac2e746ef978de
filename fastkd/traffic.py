"""Global-memory traffic of the fused kernels, counted under the Triton interpreter.

`count_bytes()` counts the bytes that `tl.load` / `tl.store` touch (masked-off lanes excluded)
while kernels run with TRITON_INTERPRET=1; the tests and `python -m fastkd.bench` use it to check
the performance model of DESIGN.md section 4 (element sizes moved per logit element).  `OpLog`
records the torch ops of a call: the allocations it makes and any host sync.
"""
import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter


@dataclass
class Traffic:
    """Global-memory bytes read and written; ``by_kernel`` splits them by kernel name, ``by_arg`` by the
    name of the kernel argument (a tensor) that the accessed memory belongs to; ``streams`` counts the
    bytes of tensors of at least ``count_bytes(stream_numel=...)`` elements (the [N, V] logits and gradients,
    as opposed to per-row and per-column statistics)."""

    read: int = 0
    written: int = 0
    streams: int = 0
    by_kernel: dict = field(default_factory=dict)
    by_arg: dict = field(default_factory=dict)

    def _add(self, kernel, arg, read=0, written=0):
        for t in (self, self.by_kernel.setdefault(kernel, Traffic()), self.by_arg.setdefault(arg, Traffic())):
            t.read += read
            t.written += written


def _accessed(ptrs, mask):
    """(bytes touched by an interpreter load/store: active lanes times the element size, first address or None)."""
    active = np.broadcast_to(mask.data, ptrs.data.shape)
    lanes = int(np.count_nonzero(active))
    first = int(ptrs.data[active].flat[0]) if lanes else None
    return lanes * ((ptrs.get_element_ty().primitive_bitwidth + 7) // 8), first


def _tensor_ranges(executor, args_hst, kwargs_hst):
    """(start, end, argument name) of the host memory behind each tensor argument of a launch, largest first."""
    named = list(zip(executor.arg_names, args_hst)) + list(kwargs_hst.items())
    return [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes(), name)
            for name, t in named if isinstance(t, torch.Tensor)]


def _range_of(ranges, address):
    for start, end, name in ranges:
        if address is not None and start <= address < end:
            return name, end - start
    return None, 0


@contextlib.contextmanager
def count_bytes(stream_numel=None):
    """Count bytes moved by ``tl.load`` / ``tl.store`` in kernels run under ``TRITON_INTERPRET=1``.

    Yields a ``Traffic``. Only unmasked lanes count. Every interpreter load and store goes through
    ``create_masked_load`` / ``create_masked_store`` (plain, block-pointer and tensor-descriptor
    accesses included), so those are the patched methods; atomic read-modify-writes (``tl.atomic_add``,
    ``tl.atomic_cas``...) are not counted.
    """
    traffic = Traffic()
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    load, store, run, init_args = (builder.create_masked_load, builder.create_masked_store, executor.__call__,
                                   executor._init_args_hst)
    launch = {"kernel": None, "ranges": []}

    def tally(ptrs, mask, key):
        nbytes, first = _accessed(ptrs, mask)
        arg, size = _range_of(launch["ranges"], first)
        traffic._add(launch["kernel"], arg, **{key: nbytes})
        element_size = (ptrs.get_element_ty().primitive_bitwidth + 7) // 8
        if stream_numel is not None and size >= stream_numel * element_size:
            traffic.streams += nbytes

    def counting_load(self, ptrs, mask, *args, **kwargs):
        tally(ptrs, mask, "read")
        return load(self, ptrs, mask, *args, **kwargs)

    def counting_store(self, ptrs, value, mask, *args, **kwargs):
        tally(ptrs, mask, "written")
        return store(self, ptrs, value, mask, *args, **kwargs)

    def named_run(self, *args, **kwargs):
        launch["kernel"] = self.fn.__name__
        try:
            return run(self, *args, **kwargs)
        finally:
            launch["kernel"], launch["ranges"] = None, []

    def recording_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        launch["ranges"] = _tensor_ranges(self, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    builder.create_masked_load, builder.create_masked_store = counting_load, counting_store
    executor.__call__, executor._init_args_hst = named_run, recording_init_args
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        executor.__call__, executor._init_args_hst = run, init_args


class OpLog(TorchDispatchMode):
    """Records the torch ops of a call, looking inside fastkd's custom ops, skipping kernel launches.

    `ops` lists (op name, [output tensors]).  It shows allocations (outputs that share no storage with
    the op's inputs) and host syncs (`aten._local_scalar_dense`).  Under the interpreter, a launch
    copies its arguments to and from host buffers: those copies are the interpreter's, not ours.
    """

    def __init__(self):
        super().__init__()
        self.ops = []
        self._in_kernel = 0
        self._run = interpreter.GridExecutor.__call__

    def __enter__(self):
        log, run = self, self._run

        def launch(executor, *args, **kwargs):
            log._in_kernel += 1
            try:
                return run(executor, *args, **kwargs)
            finally:
                log._in_kernel -= 1

        interpreter.GridExecutor.__call__ = launch
        return super().__enter__()

    def __exit__(self, *exc):
        interpreter.GridExecutor.__call__ = self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastkd":  # run the op's Python body under this mode to see inside it
            with self:
                out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if not self._in_kernel and func.namespace != "fastkd":  # a custom op's outputs were logged inside it
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            fresh = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in inputs]
            self.ops.append((str(func), fresh))
        return out

    def allocations(self, min_numel):
        """(op, shape) of every fresh tensor of at least `min_numel` elements."""
        return [(name, tuple(t.shape)) for name, outs in self.ops for t in outs if t.numel() >= min_numel]

    def host_syncs(self):
        return [name for name, _ in self.ops if "_local_scalar_dense" in name or "item" in name]


def _tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class EagerBytes(TorchDispatchMode):
    """Bytes an eager computation moves: each aten op's tensor inputs and outputs, views excluded.

    The count for code that is not fused: every op reads its inputs from and writes its outputs to
    memory.  `total` is in bytes.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _tensors((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        fresh = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in storages]
        if fresh or func is torch.ops.aten.copy_.default:  # a view or metadata op moves nothing
            self.total += sum(t.numel() * t.element_size() for t in inputs + _tensors(out))
        return out
