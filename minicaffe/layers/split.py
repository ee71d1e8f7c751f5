"""Split: one bottom to several tops sharing its data; backward sums the tops' gradients.

The Net inserts these where one blob feeds several layers (Caffe's InsertSplits)."""

from __future__ import annotations

from ..layer import Layer, register
from .eltwise import weighted_sum


@register("Split")
class SplitLayer(Layer):
    exact_num_bottom = 1
    min_num_top = 1

    def reshape(self, bottom, top):
        for blob in top:
            if blob is bottom[0]:
                self.fail("a Split top cannot be its bottom (in place)")
            blob.reshape_like(bottom[0])
            blob.share_data(bottom[0])

    def forward(self, bottom, top):
        pass  # tops share the bottom's data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].mutable_diff()
        if len(top) == 1:
            dx[...] = top[0].get_diff()
            return
        # Eltwise SUM's sum with coefficients 1 (exact products): the bits of adding the tops' diffs in
        # order, in one threaded pass for the first two (numpy's copy and add made two, on one core:
        # ResNet-50's 16 Splits took 4.4 ms of backward where PyTorch's adds took 1.4).
        weighted_sum([blob.get_diff() for blob in top], [1.0] * len(top), dx)
