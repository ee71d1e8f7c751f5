"""DummyData: tops of given shapes filled by fillers (Caffe's DummyDataLayer).

As in Caffe, a constant filler fills its top once at setup; any other filler refills it on every
forward pass, with numbers from rng.stream("data", layer name, forward index, top index) so that a
resumed run sees the same values. Without data_filler every top is constant 0.
"""

from __future__ import annotations

from .. import rng
from ..filler import FillerError, fill_array
from ..layer import Layer, register
from ..proto import caffe_pb2


@register("DummyData")
class DummyDataLayer(Layer):
    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.dummy_data_param
        n = len(top)
        if len(param.data_filler) not in (0, 1, n):
            self.fail(f"has {len(param.data_filler)} data_filler for {n} tops (give 0, 1 or {n})")
        legacy = {f: list(getattr(param, f)) for f in ("num", "channels", "height", "width")}
        if param.shape and any(legacy.values()):
            self.fail("give shape or the legacy num/channels/height/width, not both")
        if param.shape:
            if len(param.shape) not in (1, n):
                self.fail(f"has {len(param.shape)} shape for {n} tops (give 1 or {n})")
            self.shapes = [tuple(param.shape[i if len(param.shape) > 1 else 0].dim) for i in range(n)]
        else:
            for field, values in legacy.items():
                if len(values) not in (1, n):
                    self.fail(f"legacy field {field} has {len(values)} values for {n} tops (give 1 or {n})")
            self.shapes = [tuple(values[i if len(values) > 1 else 0] for values in legacy.values())
                           for i in range(n)]
        fillers = list(param.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = [fillers[i if len(fillers) > 1 else 0] for i in range(n)]
        self.refill = [f.type != "constant" for f in self.fillers]
        for i, blob in enumerate(top):
            # The filler makes the values on the host in float64 before they go into the top.
            shape, count = self.checked_size(f"top {i}", self.shapes[i])
            self.check_memory(f"top {i}", shape, count * (self.dtype.itemsize + 8), on_host=True)
            blob.reshape(shape)
            # Filling every top now also rejects an unknown filler type at setup, as Caffe does.
            self._fill(blob, i, rng.stream("data", self.name, self.forward_index, i))

    def _fill(self, blob, i: int, generator) -> None:
        try:
            values = fill_array(self.shapes[i], self.fillers[i], generator)
        except FillerError as error:
            self.fail(f"data_filler of top {i}: {error}")
        blob.set_data(values)

    def reshape(self, bottom, top):
        for blob, shape in zip(top, self.shapes):
            blob.reshape(shape)

    def forward(self, bottom, top):
        for i, blob in enumerate(top):
            if self.refill[i]:
                self._fill(blob, i, rng.stream("data", self.name, self.forward_index, i))
