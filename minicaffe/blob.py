"""Blob: an N-d array of data and one of gradients (diff), as Caffe's Blob.

Each is a SyncedArray that keeps a host (numpy) and a device (cupy) copy and copies lazily, like
Caffe's SyncedMemory: ``blob.data[...] = x`` from Python writes the host copy and marks it newest, and
the next GPU layer that reads the blob copies it up. Layers use ``get_data()`` / ``mutable_data()``
(and the diff twins), which give the array of the current mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import backend

_UNINIT, _HOST, _DEVICE, _SYNCED = "uninit", "host", "device", "synced"


class SyncedArray:
    """A flat array of `count` elements living on host, device or both."""

    __slots__ = ("count", "dtype", "_host", "_device", "_head")

    def __init__(self, count: int, dtype: np.dtype):
        self.count, self.dtype = count, np.dtype(dtype)
        self._host = self._device = None
        self._head = _UNINIT

    def host(self, write: bool) -> np.ndarray:
        if self._head == _UNINIT:
            self._host = np.zeros(self.count, self.dtype)
            self._head = _HOST
        elif self._head == _DEVICE:
            if self._host is None:
                self._host = np.empty(self.count, self.dtype)
            self._device.get(out=self._host)
            self._head = _SYNCED
        if write:
            self._head = _HOST
        return self._host

    def device(self, write: bool):
        cupy = backend.xp()
        if self._head == _UNINIT:
            self._device = cupy.zeros(self.count, self.dtype)
            self._head = _DEVICE
        elif self._head == _HOST:
            if self._device is None:
                self._device = cupy.empty(self.count, self.dtype)
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
        self._data = self._diff = SyncedArray(0, self.dtype)
        self.reshape(shape)

    # -- shape -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    def reshape(self, *shape) -> None:
        """Reshape (``blob.reshape(2, 3)`` or ``blob.reshape((2, 3))``); new memory when count changes."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob shape {shape} has a negative dimension")
        old_count = self.count
        self._shape = shape
        if self.count != old_count or self._data.count != self.count:
            self._data = SyncedArray(self.count, self.dtype)
            self._diff = SyncedArray(self.count, self.dtype)

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    def canonical_axis(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex: negative axes count from the end."""
        if not -self.num_axes <= axis < max(self.num_axes, 1):
            raise ValueError(f"axis {axis} out of range for a blob of shape {self.shape}")
        return axis % self.num_axes if self.num_axes else 0

    def count_range(self, start: int, end: int | None = None) -> int:
        return int(np.prod(self._shape[start:end], dtype=np.int64))

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
        shape = proto_shape(proto)
        if reshape:
            self.reshape(shape)
        elif tuple(shape) != self.shape and not _legacy_match(shape, self.shape):
            raise ValueError(
                f"{where}: shape mismatch, file has {list(shape)} but the net expects {list(self.shape)}"
            )
        for name, target in (("data", self.data), ("diff", self.diff)):
            values = proto_values(proto, diff=name == "diff")
            if values.size == 0:
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
