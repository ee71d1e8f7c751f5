"""HDF5Data: rows of HDF5 datasets, one top per dataset named as the top (Caffe's HDF5DataLayer).

hdf5_data_param.source is a text file listing .h5 files, one per line; the rows of all files form one
sequence, read batch_size at a time and wrapping around at the end. With shuffle, as in Caffe, each
epoch visits the files in a new random order and each file's rows in a new random order. Those orders
come from rng.shared_stream("data", layer name, "epoch", e, ...), so the rows of forward pass f are a pure
function of f (a resumed run reads the same batches). Files are loaded whole, one or two at a time.
In a data-parallel run rank r of K reads rows r, r+K, ... in TRAIN (minicaffe.parallel.record).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import hdf5, parallel, rng
from ..io import FormatError, read_file
from ..layer import Layer, register

INT_MAX = 2**31 - 1


@register("HDF5Data")
class HDF5DataLayer(Layer):
    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.hdf5_data_param
        self.batch_size = int(param.batch_size)
        if self.batch_size <= 0:
            self.fail("hdf5_data_param.batch_size must be positive")
        self.shuffle = bool(param.shuffle)
        try:
            hdf5.h5py("the HDF5Data layer")  # fail here, with the layer named, when h5py is missing
        except ImportError as error:
            self.fail(str(error))
        self.files = self._list_files(param.source)
        self.names = list(self.param.top)
        self.rows: list[int] = []
        self.row_shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            try:
                with hdf5.open_read(path) as f:
                    self.rows.append(self._check_file(f, path))
            except (OSError, FormatError) as error:
                self.fail(f"cannot read HDF5 file {path} ({error})")
        self.total = sum(self.rows)
        if self.total == 0:
            self.fail(f"the HDF5 files listed in {param.source} have no rows")
        self._loaded: dict[int, dict[str, np.ndarray]] = {}
        self._orders: dict[tuple, np.ndarray] = {}

    def _list_files(self, source: str) -> list[Path]:
        if not source:
            self.fail("hdf5_data_param.source is not set")
        try:
            lines = read_file(source).decode().splitlines()
        except FormatError as error:
            self.fail(f"cannot read source list: {error}")
        except UnicodeDecodeError:
            self.fail(f"cannot read source list {source}: it is not UTF-8 text")
        files = []
        for line in (line.strip() for line in lines):
            if not line:
                continue
            path = Path(line)
            # Caffe resolves names against the working directory; also accept names relative to the list.
            if not path.exists() and (Path(source).parent / path).exists():
                path = Path(source).parent / path
            if not path.exists():  # anything else there (a folder, a FIFO) is refused when opened
                self.fail(f"HDF5 file {line} listed in {source} does not exist")
            files.append(path)
        if not files:
            self.fail(f"source list {source} names no HDF5 files")
        return files

    def _check_file(self, f, path: Path) -> int:
        """Rows in file `f`, checking it has every top's dataset with consistent shapes."""
        rows = None
        for name in self.names:
            if name not in f:
                self.fail(f"HDF5 file {path} has no dataset '{name}' (tops are named after datasets; "
                          f"it has {sorted(f.keys())})")
            shape = tuple(f[name].shape)
            if len(shape) < 1:
                self.fail(f"dataset '{name}' in {path} is a scalar; it needs a row axis")
            if rows is not None and shape[0] != rows:
                self.fail(f"datasets in {path} have different row counts ({rows} and {shape[0]} in '{name}')")
            rows = shape[0]
            if math.prod(shape) > INT_MAX:
                self.fail(f"dataset '{name}' in {path} has shape {list(shape)}: more than {INT_MAX} values "
                          "(Caffe's limit for one blob)")
            if self.row_shapes.setdefault(name, shape[1:]) != shape[1:]:
                self.fail(f"dataset '{name}' has rows of shape {list(shape[1:])} in {path}, "
                          f"{list(self.row_shapes[name])} in an earlier file")
        return rows

    def reshape(self, bottom, top):
        for name, blob in zip(self.names, top):
            blob.reshape((self.batch_size, *self.row_shapes[name]))

    # -- which row comes when --------------------------------------------------------------------
    def _order(self, *key) -> np.ndarray | None:
        """A cached random permutation keyed by (epoch[, file]); None without shuffle (identity)."""
        if not self.shuffle:
            return None
        key = (rng.random_seed(), *key)
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            size = len(self.files) if len(key) == 2 else self.rows[key[2]]
            self._orders[key] = rng.shared_stream("data", self.name, "epoch", *key[1:]).permutation(size)
        return self._orders[key]

    def _locate(self, row: int) -> tuple[int, int]:
        """(file index, row in that file) of global row number `row` (counting over all epochs)."""
        epoch, position = divmod(row, self.total)
        file_order = self._order(epoch)
        for slot in range(len(self.files)):
            j = int(file_order[slot]) if file_order is not None else slot
            if position < self.rows[j]:
                rows_order = self._order(epoch, j)
                return j, int(rows_order[position]) if rows_order is not None else position
            position -= self.rows[j]
        raise AssertionError("row beyond the total")  # unreachable: position < total

    def _read_file(self, j: int) -> dict[str, np.ndarray]:
        if j in self._loaded:
            return self._loaded[j]
        with hdf5.open_read(self.files[j]) as f:
            return {name: np.asarray(f[name][()], dtype=self.dtype) for name in self.names}

    def forward(self, bottom, top):
        first = self.forward_index * self.batch_size
        places = [self._locate(parallel.record(first + i, self.phase)) for i in range(self.batch_size)]
        # Keep in memory just the files this batch uses (usually one, two where it straddles files).
        self._loaded = {j: self._read_file(j) for j in dict.fromkeys(j for j, _ in places)}
        for name, blob in zip(self.names, top):
            batch = np.stack([self._loaded[j][name][r] for j, r in places])
            blob.set_data(batch)
