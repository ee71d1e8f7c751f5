"""Data: batches of Caffe Datum records from an LMDB, transformed by transform_param (Caffe's DataLayer).

Records are read in key order (Caffe's cursor order) without shuffling, wrapping around at the end.
The batch of forward pass f starts at record (skip + f * batch_size) mod N, where skip is Caffe's
rand_skip draw (a random number below rand_skip, fixed per seed and layer name). So the batch is a
pure function of the forward index: a run resumed from a snapshot reads exactly the batches an
uninterrupted run would have read, and crops/mirrors are drawn from
rng.stream("data", layer name, forward index) for the same reason.

As Caffe's prefetching thread, the next batch (forward index + 1) is read and transformed in a
background thread while the net runs; a forward asking for another index reads synchronously.

In a data-parallel run (minicaffe.parallel) rank r of K reads, in TRAIN, the records r, r+K, r+2K, ...
from that start, as Caffe's multi-GPU reader: the K ranks' batches are the batch of one process with K
times the batch size. rand_skip is drawn alike on every rank (rng.shared_stream).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import parallel, rng
from ..data_transformer import DataTransformer, TransformError, legacy_transform_param
from ..db import DBError, LMDBReader, datum_to_array, key_name, looks_like_leveldb, parse_datum
from ..io import FormatError
from ..layer import Layer, register
from ..proto import caffe_pb2


class Prefetch:
    """One batch being read in a daemon thread; get() waits for it (and re-raises its error)."""

    def __init__(self, key, load: Callable[[], object]):
        self.key = key
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), daemon=True)
        self._thread.start()

    def _run(self, load) -> None:
        try:
            self._result = load()
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            self._error = error

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class PrefetchingDataLayer(Layer):
    """Base of data layers whose batch is a pure function of the forward index: subclasses define
    load_batch(index) -> list of host arrays, one per top; this class caches the current batch and
    prefetches the next one."""

    exact_num_bottom = 0
    prefetch = True
    _current: tuple | None = None  # (key, arrays) of the batch in the tops
    _pending: Prefetch | None = None  # the batch being read ahead

    def load_batch(self, index: int) -> list[np.ndarray]:
        raise NotImplementedError

    def batch(self, index: int) -> list[np.ndarray]:
        key = (index, rng.random_seed())  # a new seed means new random draws
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        pending, self._pending = self._pending, None
        arrays = pending.get() if pending is not None and pending.key == key else self.load_batch(index)
        self._current = (key, arrays)
        return arrays

    def reshape(self, bottom, top):
        for blob, array in zip(top, self.batch(self.forward_index)):
            blob.reshape(array.shape)

    def forward(self, bottom, top):
        index = self.forward_index
        for blob, array in zip(top, self.batch(index)):
            blob.reshape(array.shape)
            blob.set_data(array)
        if self.prefetch:
            key = (index + 1, rng.random_seed())
            if self._pending is None or self._pending.key != key:
                self._pending = Prefetch(key, lambda: self.load_batch(index + 1))


@register("Data")
class DataLayer(PrefetchingDataLayer):
    min_num_top = 1
    max_num_top = 2

    def layer_setup(self, bottom, top):
        param = self.param.data_param
        self.batch_size = int(param.batch_size)
        if self.batch_size <= 0:
            self.fail("data_param.batch_size must be positive")
        source = Path(param.source)
        if not param.source:
            self.fail("data_param.source is not set")
        explicit_leveldb = param.HasField("backend") and param.backend == caffe_pb2.DataParameter.LEVELDB
        if explicit_leveldb or looks_like_leveldb(source):
            self.fail(f"source '{source}': LEVELDB not supported, convert to LMDB "
                      "(e.g. `minicaffe convert-mnist` or a Python script) and set backend: LMDB")
        try:
            self.reader = LMDBReader(source)
        except DBError as error:
            self.fail(f"cannot read source: {error}")
        if len(self.reader) == 0:
            self.fail(f"source '{source}' is an empty database")
        try:
            self.transformer = DataTransformer(legacy_transform_param(self.param), self.phase, self.dtype)
        except (TransformError, FormatError) as error:
            self.fail(f"transform_param: {error}")
        self.prefetch = param.prefetch > 0
        # Caffe skips a random number of records below rand_skip (so that parallel clients start
        # apart); this draw is keyed, so a resumed run skips the same amount.
        self.skip = int(rng.shared_stream("data", self.name, "rand_skip").integers(param.rand_skip)) \
            if param.rand_skip else 0

    def load_batch(self, index: int) -> list[np.ndarray]:
        start = (self.skip + parallel.record(index * self.batch_size, self.phase)) % len(self.reader)
        stride = parallel.stride(self.phase)
        images, labels = [], np.empty(self.batch_size, dtype=self.dtype)
        param = self.transformer.param
        try:
            # Another rank's records in between are read and skipped, as Caffe's reader does.
            records = self.reader.read(start, (self.batch_size - 1) * stride + 1)[::stride]
            for i, (key, value) in enumerate(records):
                where = f"{self.reader.path} record {key_name(key)}"
                datum = parse_datum(value, where)
                images.append(datum_to_array(datum, param.force_color, param.force_gray, where))
                labels[i] = datum.label
        except DBError as error:
            self.fail(str(error))
        try:
            data = self.transformer.transform(images, rng.stream("data", self.name, index))
        except TransformError as error:
            self.fail(f"{self.reader.path}: {error}")
        return [data, labels]
