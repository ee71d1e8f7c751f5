"""Filter: keep the items (first-axis entries) whose selector is nonzero, as Caffe's FilterLayer.

Bottoms: the blobs to filter, then the selector (last; shape (N,) or (N, 1, ...)); one top per filtered
blob, with as many items as the selector has nonzero values (0 too), in order. A NaN selector is
nonzero, as in Caffe's test. The tops' size follows the selector on every forward; at setup, before the
selector holds data, they take all N items (Caffe's first reshape). Backward copies the top diff to the
kept items and writes 0 to the others; the selector has no gradient (Caffe refuses it).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..layer import Layer, register
from .indices import gather_rows, sum_rows_by_index


@register("Filter")
class FilterLayer(Layer):
    min_num_bottom = 2
    min_num_top = 1

    def layer_setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            self.fail(f"needs one top per filtered bottom (all bottoms but the last, the selector): "
                      f"{len(bottom) - 1}, got {len(top)}")
        self.first_reshape = True
        self.selector_index = len(bottom) - 1

    def reshape(self, bottom, top):
        selector, items = bottom[-1], bottom[-1].shape[0] if bottom[-1].num_axes else None
        if items is None or any(d != 1 for d in selector.shape[1:]):
            self.fail(f"the selector (last bottom) must have shape (N,) or (N, 1, ...), got "
                      f"{list(selector.shape)}")
        for i, blob in enumerate(bottom[:-1]):
            if blob.num_axes == 0 or blob.shape[0] != items:
                self.fail(f"bottom {i} of shape {list(blob.shape)} does not have the selector's {items} "
                          "items on its first axis")
            if any(t is blob for t in top) or any(t is selector for t in top):
                self.fail("cannot run in place")
        if self.first_reshape:
            kept = items
            self.first_reshape = False
        else:
            picked = backend.xp().flatnonzero(selector.get_data().reshape(-1) != 0)
            kept = int(picked.size)
            self.buffer("index", (kept,), np.int32)[...] = picked
        for blob, t in zip(bottom, top):
            t.reshape((kept, *blob.shape[1:]))

    def forward(self, bottom, top):
        index = self.buffers["index"]
        for blob, t in zip(bottom, top):
            gather_rows(index, blob.get_data(), t.mutable_data(), blob.count_range(1))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self.selector_index

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            self.fail("cannot backpropagate to the selector (the last bottom)")
        index = self.buffers["index"]
        for blob, t, down in zip(bottom, top, propagate_down):
            if down:
                sum_rows_by_index(self, index, t.get_diff(), blob.mutable_diff(), blob.shape[0],
                                  blob.count_range(1), accumulate=False)
