"""Blob: an N-d array of data and one of gradients (diff), as Caffe's Blob.

Each is a SyncedArray that keeps a host (numpy) and a device (cupy) copy and copies lazily, like
Caffe's SyncedMemory: ``blob.data[...] = x`` from Python writes the host copy and marks it newest, and
the next GPU layer that reads the blob copies it up. Layers use ``get_data()`` / ``mutable_data()``
(and the diff twins), which give the array of the current mode.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

from . import backend

_UNINIT, _HOST, _DEVICE, _SYNCED = "uninit", "host", "device", "synced"

# Allocations from this size up are checked against the free memory first. Reading it costs about
# 0.2 ms, nothing next to filling 64 MiB, but too much for every small reshape.
CHECK_MEMORY_FROM_BYTES = 64 << 20


class BlobSizeError(ValueError):
    """A blob shape that is invalid, or that needs more memory than there is; names the shape and bytes."""


def describe_bytes(count: int) -> str:
    """'576000000000 bytes (536.4 GiB)': exact for tests and scripts, readable for people."""
    size, unit = float(count), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{count} bytes" if unit == "bytes" else f"{count} bytes ({size:.1f} {unit})"


def checked_shape(shape: Sequence[int], what: str = "blob") -> tuple[tuple[int, ...], int]:
    """The shape as Python ints and its exact count. Counting with Python ints, never int64, means a
    product that wraps (dims from protobuf's int64, e.g. 2^32 x 2^32) cannot pass as a small count;
    check_memory then refuses a count too large."""
    dims = []
    for d in shape:
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool):
            raise BlobSizeError(f"{what} shape {list(shape)} has a dimension that is not an integer: {d!r}")
        dims.append(int(d))
    if any(d < 0 for d in dims):
        raise BlobSizeError(f"{what} shape {dims} has a negative dimension")
    if any(d > sys.maxsize for d in dims):
        raise BlobSizeError(f"{what} shape {dims} has a dimension above 2^63 - 1")
    return tuple(dims), math.prod(dims)


def check_memory(what: str, shape: Sequence[int], nbytes: int, on_host: bool = False) -> None:
    """Refuse `nbytes` for `what` of `shape` when they exceed the free memory of the current mode (the
    host's if `on_host`): a clear error now rather than a MemoryError, or the OOM killer, later.
    Sizes below CHECK_MEMORY_FROM_BYTES are not checked; where the free memory is unknown, only sizes
    beyond any address space are refused."""
    if nbytes < CHECK_MEMORY_FROM_BYTES:
        return
    gpu = backend.on_gpu() and not on_host
    free = backend.device_free_memory() if gpu else backend.host_free_memory()
    limit = sys.maxsize if free is None else min(free, sys.maxsize)
    if nbytes > limit:
        available = (f"the {describe_bytes(free)} of {'GPU' if gpu else 'host'} memory available"
                     if free is not None else "any address space")
        raise BlobSizeError(f"{what} of shape {list(shape)} needs {describe_bytes(nbytes)}, more than "
                            f"{available}")


def _allocate(make, count: int, dtype: np.dtype, where: str):
    """make(count, dtype) (numpy's or cupy's zeros / empty), an out-of-memory error as BlobSizeError:
    the check at reshape cannot see what other blobs take before this one is first touched."""
    try:
        return make(count, dtype)
    except MemoryError:  # cupy's OutOfMemoryError is one too
        raise BlobSizeError(f"out of {where} memory: cannot allocate {count} {dtype} values, "
                            f"{describe_bytes(count * dtype.itemsize)}") from None


class SyncedArray:
    """A flat array of `count` elements living on host, device or both."""

    __slots__ = ("count", "dtype", "_host", "_device", "_head")

    def __init__(self, count: int, dtype: np.dtype):
        self.count, self.dtype = count, np.dtype(dtype)
        self._host = self._device = None
        self._head = _UNINIT

    def host(self, write: bool) -> np.ndarray:
        if self._head == _UNINIT:
            self._host = _allocate(np.zeros, self.count, self.dtype, "host")
            self._head = _HOST
        elif self._head == _DEVICE:
            if self._host is None:
                self._host = _allocate(np.empty, self.count, self.dtype, "host")
            self._device.get(out=self._host)
            self._head = _SYNCED
        if write:
            self._head = _HOST
        return self._host

    def device(self, write: bool):
        cupy = backend.xp()
        if self._head == _UNINIT:
            self._device = _allocate(cupy.zeros, self.count, self.dtype, "GPU")
            self._head = _DEVICE
        elif self._head == _HOST:
            if self._device is None:
                self._device = _allocate(cupy.empty, self.count, self.dtype, "GPU")
            self._device.set(self._host)
            self._head = _SYNCED
        if write:
            self._head = _DEVICE
        return self._device

    def current(self, write: bool):
        return self.device(write) if backend.on_gpu() else self.host(write)


class Blob:
    """Data and diff of one shape; ``data`` and ``diff`` are numpy views, writable (as in pycaffe)."""

    def __init__(self, shape: Sequence[int] = (), dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self._shape: tuple[int, ...] = ()
        self._count = 1
        self._data = self._diff = SyncedArray(0, self.dtype)
        self.reshape(shape)

    # -- shape -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return self._count

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    def reshape(self, *shape) -> None:
        """Reshape (``blob.reshape(2, 3)`` or ``blob.reshape((2, 3))``); new memory when count changes.

        Memory is taken when first used, but a shape that cannot fit in the free memory is refused here
        (BlobSizeError), so that the layer asking for it is named."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape, count = checked_shape(shape)
        if count != self._data.count or count != self._diff.count:
            check_memory("blob", shape, count * self.dtype.itemsize)
            self._data = SyncedArray(count, self.dtype)
            self._diff = SyncedArray(count, self.dtype)
        self._shape, self._count = shape, count

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    def canonical_axis(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex: negative axes count from the end."""
        if not -self.num_axes <= axis < max(self.num_axes, 1):
            raise ValueError(f"axis {axis} out of range for a blob of shape {self.shape}")
        return axis % self.num_axes if self.num_axes else 0

    def count_range(self, start: int, end: int | None = None) -> int:
        return math.prod(self._shape[start:end])

    def _legacy(self, index: int) -> int:
        if self.num_axes > 4:
            raise ValueError(f"legacy accessor used on a blob of {self.num_axes} axes {self.shape}")
        return self._shape[index] if index < self.num_axes else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    # -- values ----------------------------------------------------------------------------
    @property
    def data(self) -> np.ndarray:
        return self._data.host(write=True).reshape(self._shape)

    @data.setter
    def data(self, value) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._diff.host(write=True).reshape(self._shape)

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    def get_data(self):
        return self._data.current(write=False).reshape(self._shape)

    def set_data(self, values) -> None:
        """Copy host values (this blob's shape) into the data of the current mode: in GPU mode one
        upload into the device copy, which ``blob.data[...] = values`` would first bring down."""
        target = self.mutable_data()
        if isinstance(target, np.ndarray):
            target[...] = values
        else:
            target.set(np.ascontiguousarray(values, dtype=self.dtype))

    def mutable_data(self):
        return self._data.current(write=True).reshape(self._shape)

    def get_diff(self):
        return self._diff.current(write=False).reshape(self._shape)

    def mutable_diff(self):
        return self._diff.current(write=True).reshape(self._shape)

    def share_data(self, other: Blob) -> None:
        """Use other's data memory (Caffe's ShareData); counts must match."""
        if other.count != self.count:
            raise ValueError(f"share_data: count {self.count} {self.shape} vs {other.count} {other.shape}")
        self._data = other._data

    def share_diff(self, other: Blob) -> None:
        if other.count != self.count:
            raise ValueError(f"share_diff: count {self.count} {self.shape} vs {other.count} {other.shape}")
        self._diff = other._diff

    # -- protobuf --------------------------------------------------------------------------
    def to_proto(self, proto=None, write_diff: bool = False):
        """Fill a caffe BlobProto (float data, or double_data for float64 blobs).

        Reads the host copies without marking them newest (as ``blob.data`` would): the device copies
        stay valid, so a snapshot in GPU mode does not make the next pass upload every parameter."""
        from .proto import caffe_pb2

        proto = proto if proto is not None else caffe_pb2.BlobProto()
        proto.Clear()
        proto.shape.dim.extend(self._shape)
        doubles = self.dtype == np.float64
        data, diff = (proto.double_data, proto.double_diff) if doubles else (proto.data, proto.diff)
        data.extend(self._data.host(write=False).tolist())
        if write_diff:
            diff.extend(self._diff.host(write=False).tolist())
        return proto

    def from_proto(self, proto, reshape: bool = True, where: str = "blob") -> None:
        """Load a BlobProto; with reshape=False the shapes must agree (legacy 4-d shapes by count)."""
        self.load(proto_shape(proto), proto_values(proto), proto_values(proto, diff=True), reshape, where)

    def load(self, shape, data: np.ndarray, diff: np.ndarray | None = None, reshape: bool = True,
             where: str = "blob") -> None:
        """Load `data` (and `diff`, when not empty) stored with `shape` in a file (a BlobProto, an HDF5
        dataset); with reshape=False the shapes must agree (legacy 4-d shapes by count)."""
        shape = tuple(int(d) for d in shape)
        if reshape:
            try:
                self.reshape(shape)
            except BlobSizeError as error:  # int64 dims from a file: name where they came from
                raise BlobSizeError(f"{where}: {error}") from None
        elif shape != self.shape and not _legacy_match(shape, self.shape):
            raise ValueError(
                f"{where}: shape mismatch, file has {list(shape)} but the net expects {list(self.shape)}"
            )
        for name, target, values in (("data", self.data, data), ("diff", self.diff, diff)):
            if values is None or values.size == 0:
                continue
            if values.size != self.count:
                raise ValueError(f"{where}: {name} has {values.size} values, shape needs {self.count}")
            target[...] = values.reshape(self.shape)

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape}, dtype={self.dtype})"


def proto_values(proto, diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff), flat: float64 when stored as double_data/double_diff, else float32."""
    doubles = proto.double_diff if diff else proto.double_data
    if len(doubles):
        return np.asarray(doubles, dtype=np.float64)
    return np.asarray(proto.diff if diff else proto.data, dtype=np.float32)


def proto_shape(proto) -> tuple[int, ...]:
    if proto.HasField("shape"):
        return tuple(int(d) for d in proto.shape.dim)
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return (proto.num, proto.channels, proto.height, proto.width)
    count = len(proto.double_data) or len(proto.data)
    # Caffe's ToProto writes no shape field for a blob with zero axes (e.g. a channel-shared PReLU
    # slope), and its FromProto reads that back as shape (); a single value is read so here too.
    return (count,) if count > 1 else ()


def _legacy_match(file_shape: Sequence[int], shape: Sequence[int]) -> bool:
    """Caffe accepts a legacy 4-d (num, channels, height, width) blob that matches once padded with 1s."""
    if len(file_shape) != 4 or len(shape) > 4:
        return False
    return tuple(file_shape) == (1,) * (4 - len(shape)) + tuple(shape)
