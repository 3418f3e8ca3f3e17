"""Counting what a step dispatches: aten ops, and the ones that make the host wait for the device.

On a GPU the host queues kernels ahead of the device; anything that needs a device value on the host
(`.item()`, `.tolist()`, `bool(tensor)`, `nonzero`, boolean-mask indexing, a device-to-host copy) stops the
queue until the device catches up, and every aten op costs tens of microseconds of Python and dispatcher
time whatever its size. `OpCounter` counts both under a TorchDispatchMode, so the counts come from a CPU run
too: the same code dispatches the same ops on either device (benchmarks/gpu.py, tests/test_gpu_step.py).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read: on CUDA each one waits for every kernel queued before it.
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item",
            "aten.is_nonzero", "aten.equal", "aten.unique", "aten._unique2", "aten.repeat_interleave"}


def _name(func) -> str:
    return str(func.overloadpacket).replace("aten::", "aten.")


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c:` counts every aten op (`c.ops`), and host syncs (`c.syncs`): the ops above,
    boolean-mask indexing, and copies from a non-CPU device to the CPU. `c.by_name` says which."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_name: Counter[str] = Counter()
        self.sync_names: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        self.ops += 1
        self.by_name[name] += 1
        if self._is_sync(name, args, kwargs):
            self.syncs += 1
            self.sync_names[name] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _is_sync(name: str, args, kwargs) -> bool:
        if name in SYNC_OPS:
            return True
        if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))
        if name in ("aten._to_copy", "aten.copy_", "aten._copy_from", "aten._copy_from_and_resize"):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name == "aten._to_copy":
                dst = kwargs.get("device")
                return bool(tensors) and tensors[0].device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
            if len(tensors) >= 2:  # copy_(dst, src)
                dst, src = tensors[0], tensors[1]
                return src.device.type != "cpu" and dst.device.type == "cpu"
        return False
