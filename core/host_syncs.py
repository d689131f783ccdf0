"""Host synchronisations counted at the dispatcher: every read of a tensor's value on the host (.item(), bool(),
int(), .tolist(), a copy from the device to the CPU) makes the host wait for the device's queue, so a training
step that has none lets the host run ahead.

    with HostSyncCounter(device) as syncs:
        train_step(run, batches, step)
    syncs.counts  # {"project": 0, "host": 0, "library": 2}

Each read is put down to the innermost caller outside torch: this project's code ("project"), its code that only
ever reads host tensors ("host": the data loader's batches, the label check of a CPU forward; on a GPU run they
never touch the device), or a library such as DeepSpeed.
On a CUDA run only reads of tensors on that device count; on the CPU every tensor is "on the device", and
.tolist() / .numpy() of a CPU tensor read its memory without the dispatcher, so a CPU count misses them (on a GPU
they copy to the host first, which is counted).
"""
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TORCH = os.path.dirname(torch.__file__) + os.sep
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_HOST_FILES = (os.path.join(_PROJECT, "core", "data.py"), os.path.join(_PROJECT, "core", "shards.py"))
_HOST_FUNCTIONS = {(os.path.join(_PROJECT, "core", "layers.py"), "check_labels")}  # called on CPU tensors only
_THIS = os.path.abspath(__file__)
_SCALAR_READ = torch.ops.aten._local_scalar_dense.default  # .item(), bool(), int(), float()
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads of tensors on `device` while active: `counts` by origin, `sites` by (file, line)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.counts: Counter = Counter()
        self.sites: Counter = Counter()

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def _is_read(self, func, args, kwargs) -> bool:
        if func is _SCALAR_READ:
            return self._on_device(args[0])
        if self.device.type == "cpu" or func not in _COPIES:
            return False  # on the CPU a copy is memory traffic, not a wait
        if func is torch.ops.aten.copy_.default:  # dst.copy_(src): a device source into a CPU destination
            return args[0].device.type == "cpu" and self._on_device(args[1])
        return self._on_device(args[0]) and torch.device(kwargs.get("device") or args[0].device).type == "cpu"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._is_read(func, args, kwargs):
            origin, site = _origin()
            self.counts[origin] += 1
            self.sites[site] += 1
        return func(*args, **kwargs)


def _origin() -> tuple[str, str]:
    """("project" | "host" | "library", "file:line") of the innermost caller outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH) and path != _THIS:
            site = f"{os.path.relpath(path, _PROJECT) if path.startswith(_PROJECT) else path}:{frame.f_lineno}"
            if path in _HOST_FILES or (path, frame.f_code.co_name) in _HOST_FUNCTIONS:
                return "host", site
            return ("project" if path.startswith(_PROJECT) and f"{os.sep}site-packages{os.sep}" not in path
                    else "library"), site
        frame = frame.f_back
    return "library", "(torch)"
