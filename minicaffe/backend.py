"""CPU / GPU mode, as Caffe's global ``Caffe::mode()``.

The array module (numpy or cupy) is chosen by the mode; cupy is imported only when the GPU is asked for,
so ``import minicaffe`` works on a machine with neither cupy nor a GPU.
"""

from __future__ import annotations

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
