"""Caffe's HDF5 files: weights and solver states of `snapshot_format: HDF5`, and h5py for the HDF5 layers.

Caffe's layout, which this module reads and writes both ways (a file Caffe wrote loads here, ours in Caffe):

    <prefix>_iter_N.caffemodel.h5     /data/<layer name>/<j>   blob j of the layer (float32, its shape)
                                      /diff/<layer name>/<j>   (only with snapshot_diff)
    <prefix>_iter_N.solverstate.h5    /iter, /current_step     scalar ints
                                      /learned_net             the .caffemodel.h5 written with it
                                      /history/<j>             solver history blob j

A parameter shared with an earlier layer (ParamSpec name) is written once, by its owner, as in Caffe. A
file is recognised by its name ending in ".h5", as Caffe does. Writes are whole or nothing: the file is
built in memory and written with io.write_atomic."""

from __future__ import annotations

import io as bytes_io
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from . import io
from .files import open_file


def h5py(needed_by: str):
    """The h5py module; an ImportError saying what needs it and how to install it when it is missing."""
    try:
        import h5py as module
    except ImportError:
        raise ImportError(f"{needed_by} needs h5py: `pip install minicaffe[hdf5]` (or `pip install h5py`)"
                          ) from None
    return module


def is_hdf5(path) -> bool:
    return str(path).endswith(".h5")


@contextmanager
def open_read(path, needed_by: str = "reading HDF5 files") -> Iterator:
    """An HDF5 file open for reading, through files.open_file (a regular file; HDF5 files may exceed
    protobuf's 2 GB, so no size limit). A file that is not HDF5 is an io.FormatError naming it."""
    module = h5py(needed_by)
    with open_file(path, limit=None) as raw:
        try:
            handle = module.File(raw, "r")
        except OSError as error:
            raise io.FormatError(f"{path}: not an HDF5 file ({error})") from None
        with handle:
            yield handle


def write(path, fill: Callable, needed_by: str = "writing HDF5 files") -> None:
    """Build an HDF5 file in memory with fill(h5py.File), then write it atomically to `path`."""
    module = h5py(needed_by)
    buffer = bytes_io.BytesIO()
    with module.File(buffer, "w") as handle:
        fill(handle)
    io.write_atomic(path, buffer.getvalue())


def dataset(group, name: str, where: str) -> np.ndarray:
    """The array of dataset `name` in `group`; an io.FormatError naming `where` if it is not one."""
    item = group.get(name)
    if item is None or not hasattr(item, "dtype") or item.dtype.kind not in "fiu":
        raise io.FormatError(f"{where}: needs a numeric dataset '{name}'")
    return np.asarray(item[()])


def text(group, name: str) -> str:
    """A string dataset (Caffe writes learned_net as a fixed-length HDF5 string); '' when absent."""
    item = group.get(name)
    if item is None:
        return ""
    value = item[()]
    return value.decode() if isinstance(value, bytes) else str(value)
