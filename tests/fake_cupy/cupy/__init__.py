"""A fake CuPy for CPU-only test runs: host/device discipline and kernel launches, checked, on numpy.

tests/test_gpu_paths.py puts this package on sys.path inside a fixture only (and takes it off again), so
that minicaffe's GPU code paths (Blob host/device sync, backend.xp(), kernel.KernelFile._launch_gpu,
every layer's and solver's use of device arrays) run on a machine with no GPU. It is never shipped.

What it checks, as real CuPy would refuse it (messages follow CuPy's):
  * a device array (``cupy.ndarray``) wraps a numpy array but is not a numpy subclass, as in CuPy (numpy
    converts a subclass silently, without asking its ``__array__``; and ``isinstance(dev, np.ndarray)``
    is False, as on a GPU). ``np.asarray(dev)``, ``np.array(dev)`` and ``host[...] = dev`` raise
    TypeError ("Implicit conversion to a NumPy array is not allowed"); numpy ufuncs and functions mixing
    a host ndarray with a device array raise TypeError ("Unsupported type <class 'numpy.ndarray'>"), so
    do ``dev + host`` and ``dev += host``; ``dev[...] = host`` raises ValueError ("non-scalar
    numpy.ndarray cannot be used for fill").
  * what CuPy allows is allowed: Python and numpy scalars with device arrays, ``float()`` / ``int()`` /
    ``bool()`` of a one-element array, ``.item()``, ``.tolist()``, ``.get()``, ``.set(host)``, ``repr``,
    host arrays and lists as indices, ``cupy.asarray(host)`` (a copy to the device). Reductions and
    integer indexing give 0-d device arrays, not numpy scalars, as in CuPy.
  * ``RawModule(code=..., options=...).get_function(name)(grid, block, args)`` validates the launch as
    CUDA and CuPy would take it: grid a tuple of 1 to 3 positive ints (x <= 2**31 - 1, y and z <= 65535),
    block a tuple of positive ints with at most 1024 threads, and every argument exactly of its kind in
    the kernel's signature (parsed from `code` by minicaffe.kernel.parse_signatures): a C-contiguous
    device array of the build's real type (MC_REAL from the options), int32 for int*, uint8 for unsigned
    char*; a numpy scalar of exactly np.int32 / np.uint32 / the real type for scalars. A Python int or
    float is an error: CuPy would pass it as a 64-bit value and the kernel would read garbage.
    The kernel then runs: the CPU build of the same source (minicaffe.kernel.KernelFile.build_cpu for
    that MC_REAL), called through ctypes on the arrays' memory, so its real logic is executed, serially.
  * fresh memory is not clean: ``empty``, ``empty_like`` and ``ndarray(shape)`` are filled with NaN
    (floating types) or nonzero garbage (integers), so that a read of memory nothing wrote shows.

What it cannot check: CUDA itself. Nothing is compiled by NVRTC here (tests/test_kernels_nvrtc.py does
that), races between GPU threads (tests/test_race.py checks those, on a ThreadSanitizer build), block/grid
coverage of the data (the kernels' grid-stride loops cover any grid), out-of-bounds accesses, asynchrony
(everything is synchronous), multiple devices (there is one), memory limits (memGetInfo reports a
fixed figure), and numerical differences of the GPU's math library (the CPU build is used; type
promotion is numpy's, which CuPy follows). Functions CuPy has but this fake lacks raise AttributeError:
add them here when minicaffe needs them.
"""

from __future__ import annotations

import builtins
import ctypes
import functools
import re
import sys
import types
from pathlib import Path

import numpy as _np

__version__ = "14.0.0+fake"
IS_FAKE = True

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

# dtypes and constants, as CuPy re-exports them from numpy
dtype = _np.dtype
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64 = _np.int8, _np.int16, _np.int32, _np.int64
uint8, uint16, uint32, uint64 = _np.uint8, _np.uint16, _np.uint32, _np.uint64
bool_, intp, complex64, complex128 = _np.bool_, _np.intp, _np.complex64, _np.complex128
newaxis, pi, e, inf, nan = None, _np.pi, _np.e, _np.inf, _np.nan


# -- the device array ------------------------------------------------------------------------------

def _unsupported(value) -> TypeError:
    return TypeError(f"Unsupported type {type(value)} (fake cupy: a host numpy array where CuPy needs a "
                     "device array or a scalar; copy it with cupy.asarray first)")


def _to_numpy(value):
    """Arguments for the numpy call behind a CuPy function: device arrays unwrapped (recursively in
    lists, tuples and dicts); a host ndarray is refused, as CuPy refuses it."""
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, _np.ndarray):
        raise _unsupported(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def _to_device(value):
    """Results of the numpy call as CuPy gives them: arrays and numpy scalars as device arrays."""
    if isinstance(value, _np.ndarray):
        return ndarray._wrap(value)
    if isinstance(value, _np.generic):
        return ndarray._wrap(_np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


def _index(key):
    """An index for a device array: device arrays unwrapped; host arrays and lists allowed (CuPy copies
    index arrays to the device)."""
    if isinstance(key, ndarray):
        return key._array
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key


_SCALAR_TYPES = (bool, int, float, complex, _np.generic)


def _operand(value):
    """An operand of a CuPy ufunc: a device array or a Python/numpy scalar, nothing else (no host arrays,
    no lists), as CuPy's kernels take them."""
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, _np.ndarray):
        raise _unsupported(value)
    if isinstance(value, _SCALAR_TYPES):
        return value
    raise TypeError(f"Unsupported type {type(value)}")


def _apply_ufunc(ufunc, inputs, kwargs):
    out = kwargs.get("out")
    outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
    for o in outs:
        if not isinstance(o, ndarray):
            raise _unsupported(o) if isinstance(o, _np.ndarray) else TypeError(f"Unsupported type {type(o)}")
    kwargs = _to_numpy({k: v for k, v in kwargs.items() if k != "out"})
    if outs:
        kwargs["out"] = tuple(o._array for o in outs)
    result = ufunc(*[_operand(x) for x in inputs], **kwargs)
    if outs:
        return outs[0] if len(outs) == 1 else outs
    return _to_device(result)


def _has_array_index(key) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return builtins.any(isinstance(k, (ndarray, _np.ndarray, list)) for k in parts)


def _fill_value(value):
    """A value for `dev[...] = value` / `dev.fill(value)`: a device array or a scalar, as in CuPy."""
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, _np.ndarray):
        if value.shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        return value.item()
    if isinstance(value, (bool, int, float, complex, _np.generic)):
        return value
    raise TypeError(f"Unsupported type {type(value)}")


class _Flags:
    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, array: _np.ndarray):
        self.c_contiguous = array.flags.c_contiguous
        self.f_contiguous = array.flags.f_contiguous
        self.owndata = array.flags.owndata

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]


class _MemoryPointer:
    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr: int):
        self.ptr, self.device_id = ptr, 0


class ndarray:
    """A device array: a numpy array that the host cannot see except through .get() and .set()."""

    __slots__ = ("_array",)
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("fake cupy: ndarray(memptr=..., strides=...)")
        self._array = _garbage(_np.empty(shape, dtype, order=order))

    @classmethod
    def _wrap(cls, array: _np.ndarray) -> ndarray:
        self = object.__new__(cls)
        self._array = array
        return self

    # -- attributes ---------------------------------------------------------------------------
    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    size = property(lambda self: self._array.size)
    ndim = property(lambda self: self._array.ndim)
    strides = property(lambda self: self._array.strides)
    itemsize = property(lambda self: self._array.itemsize)
    nbytes = property(lambda self: self._array.nbytes)
    T = property(lambda self: ndarray._wrap(self._array.T))
    flags = property(lambda self: _Flags(self._array))
    data = property(lambda self: _MemoryPointer(self._array.ctypes.data))
    device = property(lambda self: cuda.Device(0))

    @shape.setter
    def shape(self, value) -> None:
        self._array.shape = value

    # -- host <-> device, explicitly ------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            return _np.array(self._array, order=order, copy=True)
        if not isinstance(out, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if self.dtype != out.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if self.shape != out.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
        if not (out.flags.c_contiguous or out.flags.f_contiguous):
            raise RuntimeError("`out` cannot be specified when copying to non-contiguous ndarray")
        out[...] = self._array
        return out

    def set(self, arr, stream=None) -> None:
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self._array.flags.c_contiguous or self._array.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        self._array[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    # Conversions CuPy allows (each copies to the host and synchronizes).
    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._array.item()

    def tolist(self):
        return self._array.tolist()

    def tobytes(self, order="C") -> bytes:
        return self._array.tobytes(order)

    def __float__(self) -> float:
        return float(self._array)

    def __int__(self) -> int:
        return int(self._array)

    def __complex__(self) -> complex:
        return complex(self._array)

    def __bool__(self) -> bool:
        return bool(self._array)

    def __repr__(self) -> str:
        return repr(self._array)

    def __str__(self) -> str:
        return str(self._array)

    def __format__(self, spec: str) -> str:
        return format(self._array, spec)

    def __len__(self) -> int:
        return len(self._array)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo) -> ndarray:
        return self.copy()

    def __reduce__(self):
        return array, (self.get(),)

    # -- indexing ---------------------------------------------------------------------------------
    def __getitem__(self, key):
        index = _index(key)
        result = self._array[index]
        if isinstance(result, _np.generic):
            # CuPy gives a 0-d view, not a scalar: writes through it reach the array.
            result = self._array[(*(index if isinstance(index, tuple) else (index,)), Ellipsis)]
        return ndarray._wrap(result)

    def __setitem__(self, key, value) -> None:
        if _has_array_index(key) and isinstance(value, _np.ndarray):
            value = asarray(value)  # CuPy's scatter for array indices copies values with cupy.array
        self._array[_index(key)] = _fill_value(value)

    def fill(self, value) -> None:
        self._array.fill(_fill_value(value))

    # -- numpy protocols ----------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or not hasattr(_this, ufunc.__name__):
            return NotImplemented  # numpy then raises TypeError, as with CuPy
        return _apply_ufunc(ufunc, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        ours = getattr(_this, func.__name__, None)
        if ours is None or func.__module__.split(".")[0] != "numpy":
            return NotImplemented
        return ours(*args, **kwargs)

    # -- operators (through the ufuncs, which check their operands) ---------------------------------
    def __neg__(self):
        return _np.negative(self)

    def __pos__(self):
        return self

    def __abs__(self):
        return _np.absolute(self)

    def __invert__(self):
        return _np.invert(self)


def _binary(ufunc, reflected: bool = False):
    def op(self, other):
        return ufunc(other, self) if reflected else ufunc(self, other)

    return op


def _inplace(ufunc):
    def op(self, other):
        ufunc(self, other, out=(self,))
        return self

    return op


for _name, _ufunc in [("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply),
                      ("truediv", _np.true_divide), ("floordiv", _np.floor_divide), ("mod", _np.remainder),
                      ("pow", _np.power), ("matmul", _np.matmul), ("and", _np.bitwise_and),
                      ("or", _np.bitwise_or), ("xor", _np.bitwise_xor), ("lshift", _np.left_shift),
                      ("rshift", _np.right_shift)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in [("lt", _np.less), ("le", _np.less_equal), ("eq", _np.equal),
                      ("ne", _np.not_equal), ("gt", _np.greater), ("ge", _np.greater_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))


def _method(name: str):
    def method(self, *args, **kwargs):
        return _to_device(getattr(self._array, name)(*_to_numpy(args), **_to_numpy(kwargs)))

    method.__name__ = name
    return method


# Methods of cupy.ndarray: the numpy method on the device memory, results as device arrays.
for _name in ["reshape", "ravel", "flatten", "copy", "astype", "view", "transpose", "swapaxes", "squeeze",
              "sum", "mean", "var", "std", "prod", "max", "min", "argmax", "argmin", "all", "any", "clip",
              "cumsum", "cumprod", "dot", "repeat", "take", "put", "nonzero", "sort", "argsort", "round",
              "diagonal", "trace", "conj", "conjugate"]:
    setattr(ndarray, _name, _method(_name))


# -- module functions -----------------------------------------------------------------------------------

_this = sys.modules[__name__]


def _device_function(function):
    """A CuPy function: the numpy one on device arrays (host arrays refused), results on the device."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        result = function(*_to_numpy(args), **_to_numpy(kwargs))
        out = kwargs.get("out")
        return out if isinstance(out, ndarray) else _to_device(result)

    return call


# ufuncs, and functions taking arrays (some shadow builtins here: this module calls builtins.any etc.)
for _name in ["add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "remainder", "mod",
              "power", "negative", "absolute", "abs", "sign", "sqrt", "square", "exp", "log", "log1p",
              "expm1", "tanh", "maximum", "minimum", "fmax", "fmin", "floor", "ceil", "rint", "invert",
              "equal", "not_equal", "less", "less_equal", "greater", "greater_equal", "logical_and",
              "logical_or", "logical_not", "isfinite", "isnan", "isinf", "bitwise_and", "bitwise_or",
              "bitwise_xor", "left_shift", "right_shift", "matmul",
              "sum", "mean", "var", "std", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "all",
              "any", "cumsum", "count_nonzero", "nonzero", "flatnonzero", "where", "clip", "bincount",
              "dot", "vdot", "inner", "outer", "tensordot", "einsum", "concatenate", "stack", "vstack",
              "hstack", "transpose", "reshape", "ravel", "squeeze", "expand_dims", "broadcast_to",
              "moveaxis", "swapaxes", "take", "repeat", "tile", "sort", "argsort", "unique", "around",
              "round", "copy", "array_equal", "allclose", "isclose", "shape", "ndim", "size"]:
    _function = getattr(_np, _name)
    if isinstance(_function, _np.ufunc):
        setattr(_this, _name, functools.partial(lambda f, *a, **k: _apply_ufunc(f, a, k), _function))
    else:
        setattr(_this, _name, _device_function(_function))


def copyto(dst, src, casting="same_kind", where=True) -> None:
    if not isinstance(dst, ndarray):
        raise TypeError(f"Unsupported type {type(dst)}")
    _np.copyto(dst._array, _fill_value(src) if not isinstance(src, ndarray) else src._array,
               casting=casting, where=_to_numpy(where))


# creation: new device memory
def _garbage(array: _np.ndarray) -> _np.ndarray:
    """Fill fresh memory as CuPy's pool may hand it out, so that reading memory nothing wrote shows:
    NaN for floating types, True for booleans, arbitrary nonzero bytes for the others."""
    if array.dtype.kind in "fc":
        array.fill(_np.nan)
    elif array.dtype.kind == "b":
        array.fill(True)
    elif array.size:
        array.view(_np.uint8).reshape(-1)[...] = _garbage_bytes(array.nbytes)
    return array


def _garbage_bytes(count: int) -> _np.ndarray:
    return _np.random.default_rng(count).integers(1, 256, count, dtype=_np.uint8)


def empty(shape, dtype=float, order="C") -> ndarray:
    return ndarray._wrap(_garbage(_np.empty(shape, dtype, order=order)))


def zeros(shape, dtype=float, order="C") -> ndarray:
    return ndarray._wrap(_np.zeros(shape, dtype, order=order))


def ones(shape, dtype=float, order="C") -> ndarray:
    return ndarray._wrap(_np.ones(shape, dtype, order=order))


def full(shape, fill_value, dtype=None, order="C") -> ndarray:
    return ndarray._wrap(_np.full(shape, _fill_value(fill_value), dtype, order=order))


def _like(function):
    @functools.wraps(function)
    def call(prototype, *args, **kwargs):
        # Only the prototype's shape and dtype are read: a host prototype moves no data.
        base = prototype._array if isinstance(prototype, ndarray) else prototype
        return ndarray._wrap(function(base, *_to_numpy(args), **_to_numpy(kwargs)))

    return call


zeros_like, ones_like, full_like = (_like(f) for f in (_np.zeros_like, _np.ones_like, _np.full_like))
empty_like = _like(lambda *args, **kwargs: _garbage(_np.empty_like(*args, **kwargs)))
arange, linspace, eye, identity = (_device_function(f) for f in (_np.arange, _np.linspace, _np.eye,
                                                                 _np.identity))


# conversion: host data may be copied to the device explicitly
def _host_data(obj):
    if isinstance(obj, ndarray):
        return obj._array
    if isinstance(obj, (list, tuple)):
        return [_host_data(o) for o in obj]
    return obj


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0) -> ndarray:
    return ndarray._wrap(_np.array(_host_data(obj), dtype=dtype, copy=True if copy else None, order=order,
                                   ndmin=ndmin))


def asarray(a, dtype=None, order=None) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or _np.dtype(dtype) == a.dtype) and order in (None, "K"):
        return a
    return ndarray._wrap(_np.array(_host_data(a), dtype=dtype, order=order or "K", copy=True))


asanyarray = asarray


def ascontiguousarray(a, dtype=None) -> ndarray:
    if isinstance(a, ndarray) and a._array.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    return ndarray._wrap(_np.array(_host_data(a), dtype=dtype, order="C", ndmin=1, copy=True))


def asnumpy(a, stream=None, order="C", out=None) -> _np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return _this if builtins.any(isinstance(a, ndarray) for a in args) else _np


def isscalar(element) -> bool:
    return _np.isscalar(element)


# -- cupy.cuda: one device ---------------------------------------------------------------------------

cuda = types.ModuleType("cupy.cuda")
runtime = types.ModuleType("cupy.cuda.runtime")
cuda.runtime = runtime
_current = {"device": 0, "count": 1}


class CUDARuntimeError(RuntimeError):
    pass


def _device_count() -> int:
    return _current["count"]


def _properties(device: int) -> dict:
    if not 0 <= device < _current["count"]:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return {"name": b"Fake CUDA Device (fake cupy)", "major": 9, "minor": 0, "totalGlobalMem": 80 << 30,
            "sharedMemPerBlock": 48 << 10, "regsPerBlock": 65536, "warpSize": 32, "memPitch": 2 ** 31 - 1,
            "maxThreadsPerBlock": 1024, "maxThreadsDim": (1024, 1024, 64),
            "maxGridSize": (2 ** 31 - 1, 65535, 65535), "clockRate": 1_755_000, "totalConstMem": 65536,
            "textureAlignment": 512, "deviceOverlap": 1, "multiProcessorCount": 132,
            "kernelExecTimeoutEnabled": 0}


runtime.CUDARuntimeError = CUDARuntimeError
runtime.getDeviceCount = _device_count
runtime.getDeviceProperties = _properties
runtime.deviceSynchronize = lambda: None
runtime.runtimeGetVersion = lambda: 13000
runtime.driverGetVersion = lambda: 13000
# Free memory: a fixed figure (the arrays live in host memory), which a test may lower.
_current["free_memory"] = 80 << 30
runtime.memGetInfo = lambda: (_current["free_memory"], 80 << 30)


class _MemoryPool:
    """CuPy's pool of freed blocks; the fake keeps none."""

    def free_bytes(self) -> int:
        return 0


_memory_pool = _MemoryPool()


def get_default_memory_pool() -> _MemoryPool:
    return _memory_pool


class Device:
    def __init__(self, device=None):
        self.id = _current["device"] if device is None else int(device)

    def use(self) -> None:
        _properties(self.id)  # raises for a device that does not exist
        _current["device"] = self.id

    def synchronize(self) -> None:
        pass

    @property
    def compute_capability(self) -> str:
        p = _properties(self.id)
        return f"{p['major']}{p['minor']}"

    def __enter__(self):
        self._previous = _current["device"]
        self.use()
        return self

    def __exit__(self, *exc) -> None:
        _current["device"] = self._previous

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class Stream:
    null = None
    ptr = 0  # the cudaStream_t handle NCCL calls take
    done = True  # everything "on the device" ran when it was called

    def __init__(self, non_blocking: bool = False):
        pass

    def synchronize(self) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Event:
    done = True  # what was queued before record() ran when it was queued

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


Stream.null = Stream()
cuda.Device, cuda.Stream, cuda.Event, cuda.CUDARuntimeError = Device, Stream, Event, CUDARuntimeError
cuda.get_current_stream = lambda: Stream.null
sys.modules["cupy.cuda"], sys.modules["cupy.cuda.runtime"] = cuda, runtime


# -- raw kernels: launches validated, then the CPU build of the same source runs -----------------------

MAX_GRID = (2 ** 31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
_REALS = {"float": _np.dtype(_np.float32), "double": _np.dtype(_np.float64)}
_libraries: dict[tuple[str, str], ctypes.CDLL] = {}
launches: list[tuple[str, tuple, tuple]] = []  # (kernel, grid, block) of every launch, for tests


class KernelLaunchError(TypeError):
    """A launch real CuPy/CUDA would refuse or run wrongly (bad grid, block or argument types)."""


def _dims(what: str, value, limits) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise KernelLaunchError(f"{what} must be a tuple of 1 to 3 ints, got {value!r}")
    for i, d in enumerate(value):
        if isinstance(d, bool) or not isinstance(d, (int, _np.integer)) or not 1 <= d <= limits[i]:
            raise KernelLaunchError(f"{what}[{i}] must be an int in 1..{limits[i]}, got {d!r} in {value!r}")
    return tuple(int(d) for d in value)


class RawKernel:
    def __init__(self, code: str, name: str, options: tuple = (), **kwargs):
        if not isinstance(options, tuple) or not builtins.all(isinstance(o, str) for o in options):
            raise TypeError(f"options must be a tuple of str, got {options!r}")
        from minicaffe.kernel import parse_signatures

        signatures = parse_signatures(code)
        if name not in signatures:
            raise CUDARuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        self.code, self.name, self.options = code, name, options
        self.kinds = signatures[name]
        defines = dict(re.findall(r"^-D(\w+)=(\S+)$", "\n".join(options), re.M))
        self.ctype = defines.get("MC_REAL", "float")
        if self.ctype not in _REALS:
            raise KernelLaunchError(f"MC_REAL={self.ctype} is neither float nor double")
        self.real = _REALS[self.ctype]
        includes = [o[2:] for o in options if o.startswith("-I")]
        self.path = _source_file(code, includes)

    def __call__(self, grid, block, args, *, shared_mem: int = 0) -> None:
        grid, block = _dims("grid", grid, MAX_GRID), _dims("block", block, MAX_BLOCK)
        if _np.prod(block) > MAX_THREADS_PER_BLOCK:
            raise KernelLaunchError(f"block {block} has more than {MAX_THREADS_PER_BLOCK} threads")
        if not isinstance(args, tuple):
            raise KernelLaunchError(f"args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.kinds):
            raise KernelLaunchError(f"{self.name} takes {len(self.kinds)} arguments, got {len(args)}")
        c_args = [self._c_arg(i, kind, arg) for i, (kind, arg) in enumerate(zip(self.kinds, args))]
        launches.append((self.name, grid, block))
        function = getattr(_library(self.path, self.ctype), self.name)
        function(*c_args)

    def _c_arg(self, index: int, kind: str, arg):
        where = f"kernel {self.name} (MC_REAL={self.ctype}) argument {index} ({kind})"
        if kind.endswith("*"):
            from minicaffe.kernel import POINTER_DTYPES

            want = self.real if kind == "real*" else POINTER_DTYPES[kind]
            if not isinstance(arg, ndarray):
                raise KernelLaunchError(f"{where} must be a device array, got {type(arg)}")
            if arg.dtype != want or not arg._array.flags.c_contiguous:
                raise KernelLaunchError(f"{where} must be a C-contiguous {want} device array, got {arg.dtype}"
                                        f" (C-contiguous: {arg._array.flags.c_contiguous})")
            return ctypes.c_void_p(arg._array.ctypes.data)
        want = {"int": _np.int32, "uint": _np.uint32, "real": self.real.type}[kind]
        if type(arg) is not want:
            raise KernelLaunchError(f"{where} must be a {want.__name__} scalar, got {type(arg).__name__} "
                                    f"{arg!r} (CuPy passes Python ints and floats as 64-bit values)")
        if kind == "int":
            return ctypes.c_int(int(arg))
        if kind == "uint":
            return ctypes.c_uint(int(arg))
        return ctypes.c_float(arg) if self.ctype == "float" else ctypes.c_double(arg)


class RawModule:
    def __init__(self, *, code: str | None = None, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", **kwargs):
        if (code is None) == (path is None):
            raise TypeError("One of `code` or `path` must be given")
        self.code = code if code is not None else Path(path).read_text()
        self.options = options
        self._kernels: dict[str, RawKernel] = {}

    def get_function(self, name: str) -> RawKernel:
        if name not in self._kernels:
            self._kernels[name] = RawKernel(self.code, name, self.options)
        return self._kernels[name]


def _source_file(code: str, include_dirs: list[str]) -> Path:
    """The .cu file (in an -I folder) whose text is `code`: it is built for the CPU by minicaffe."""
    for folder in include_dirs:
        for path in sorted(Path(folder).glob("*.cu")):
            if path.read_text() == code:
                return path
    raise KernelLaunchError(f"fake cupy runs minicaffe's kernels only: no .cu file in {include_dirs} "
                            "has this source")


def _library(path: Path, ctype: str) -> ctypes.CDLL:
    key = (str(path), ctype)
    if key not in _libraries:
        from minicaffe.kernel import KernelFile, kernel_dir

        if path.parent.resolve() != kernel_dir().resolve():
            raise KernelLaunchError(f"{path} is not in minicaffe's kernel folder {kernel_dir()}")
        _libraries[key] = ctypes.CDLL(str(KernelFile(path.name).build_cpu(ctype)))
    return _libraries[key]


# -- cupy.cublas: gemm, on the host by the same BLAS call as minicaffe's CPU path (bit-exact with it) -----

cublas = types.ModuleType("cupy.cublas")


def _cublas_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    """out = alpha * op(a) @ op(b) + beta * out (op: 'N' or 'T'), as cupy.cublas.gemm; out in place."""
    for value in (a, b) + (() if out is None else (out,)):
        if not isinstance(value, ndarray):
            raise _unsupported(value)
    ops = {"N": lambda m: m, "T": lambda m: m.T, 0: lambda m: m, 1: lambda m: m.T}
    if transa not in ops or transb not in ops:
        raise ValueError(f"fake cupy: cublas.gemm trans must be 'N' or 'T', got {transa!r}, {transb!r}")
    left, right = ops[transa](a._array), ops[transb](b._array)
    if out is None:
        out, beta = zeros((left.shape[0], right.shape[1]), a.dtype), 0.0
    if out.shape != (left.shape[0], right.shape[1]) or not out._array.flags.c_contiguous:
        raise ValueError(f"fake cupy: cublas.gemm out {out.shape} (C-contiguous "
                         f"{out._array.flags.c_contiguous}) does not fit {left.shape} @ {right.shape}")
    from minicaffe.blas import cpu_gemm

    cpu_gemm(alpha, left, right, beta, out._array)
    return out


cublas.gemm = _cublas_gemm
sys.modules["cupy.cublas"] = cublas
