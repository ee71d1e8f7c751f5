"""CPU / GPU mode, as Caffe's global ``Caffe::mode()``.

The array module (numpy or cupy) is chosen by the mode; cupy is imported only when the GPU is asked for,
so ``import minicaffe`` works on a machine with neither cupy nor a GPU.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

_state: dict = {"mode": "cpu", "device": 0, "xp": np}


class BackendError(RuntimeError):
    """The GPU was asked for but cannot be used."""


def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as error:
        raise BackendError(
            "GPU mode needs CuPy: install it with `pip install minicaffe[gpu]` (CUDA 13) "
            f"or use set_mode_cpu() ({error})"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # cupy raises its own CUDARuntimeError when there is no driver
        raise BackendError(f"GPU mode: no usable CUDA device ({error})") from None
    if _state["device"] >= count:
        raise BackendError(f"GPU mode: device {_state['device']} asked for, {count} present")
    return cupy


def set_mode_cpu() -> None:
    _state.update(mode="cpu", xp=np)


def set_mode_gpu() -> None:
    cupy = _cupy()
    cupy.cuda.Device(_state["device"]).use()
    _state.update(mode="gpu", xp=cupy)


def set_device(device_id: int) -> None:
    _state["device"] = int(device_id)
    if _state["mode"] == "gpu":
        _cupy().cuda.Device(device_id).use()


def mode() -> str:
    return _state["mode"]


def on_gpu() -> bool:
    return _state["mode"] == "gpu"


def xp() -> ModuleType:
    """The array module of the current mode: numpy on CPU, cupy on GPU."""
    return _state["xp"]


def to_host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)


def reuse(buffer, shape, dtype):
    """`buffer` if it is an array of the current mode with this shape and dtype, else a new empty one.

    For scratch and saved arrays that layers keep between calls: fresh large arrays cost more in page
    faults than the kernels that fill them."""
    module = xp()
    if buffer is None or not isinstance(buffer, module.ndarray) or buffer.shape != tuple(shape) \
            or buffer.dtype != np.dtype(dtype):
        return module.empty(shape, dtype)
    return buffer


# -- free memory -----------------------------------------------------------------------------------

def free_memory() -> int | None:
    """Bytes one more allocation of the current mode can take (None when unknown): the GPU's free
    memory in GPU mode, the host's otherwise. For refusing a blob that cannot fit with a clear error
    before the allocation fails (or, with Linux's overcommit, before the OOM killer ends the process)."""
    return device_free_memory() if on_gpu() else host_free_memory()


def host_free_memory() -> int | None:
    """The least of what the kernel, the container and the process limit allow: MemAvailable, the
    cgroup's limit less its usage, and RLIMIT_AS (ulimit -v) less the address space already mapped.
    None when none of them is known (not Linux, and no sysconf)."""
    known = [n for n in (_memavailable(), _cgroup_headroom(), _address_space_headroom()) if n is not None]
    return min(known) if known else None


def device_free_memory() -> int | None:
    """Free memory of the current GPU, plus what CuPy's pool holds unused (it gives that out first)."""
    cupy = xp()
    try:
        free, _total = cupy.cuda.runtime.memGetInfo()
        return int(free) + int(cupy.get_default_memory_pool().free_bytes())
    except (AttributeError, RuntimeError):  # cupy's CUDARuntimeError is a RuntimeError
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _memavailable() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """limit - (usage - inactive file cache) of this container's memory cgroup (v2, else v1), as the
    kubelet counts it: the page cache of files read long ago is reclaimed before the limit bites.
    None without a limit."""
    for folder, limit_name, usage_name, stat_key in (
            (root, "memory.max", "memory.current", "inactive_file"),
            (os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file")):
        limit = _read_int(os.path.join(folder, limit_name))
        usage = _read_int(os.path.join(folder, usage_name))
        if limit is None or usage is None:
            continue
        inactive = 0
        try:
            with open(os.path.join(folder, "memory.stat")) as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == stat_key:
                        inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, limit - max(0, usage - inactive))
    return None


def _address_space_headroom() -> int | None:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as file:
            mapped = int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, IndexError):
        return None
    return max(0, soft - mapped)
