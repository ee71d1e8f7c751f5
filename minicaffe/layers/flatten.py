"""Flatten: merge axes flatten_param.axis..end_axis (inclusive; default 1..-1) into one.

The top shares the bottom's data and diff (no copy), so forward and backward have nothing to do."""

from __future__ import annotations

from ..layer import Layer, register


@register("Flatten")
class FlattenLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (its top is a reshaped view of the bottom: give it its own top)")
        param, shape = self.param.flatten_param, bottom[0].shape
        try:
            start = bottom[0].canonical_axis(param.axis)
            end = bottom[0].canonical_axis(param.end_axis)
        except ValueError as error:
            self.fail(str(error))
        if end < start:
            self.fail(f"end_axis {param.end_axis} comes before axis {param.axis} for bottom {list(shape)}")
        top[0].reshape(shape[:start] + (bottom[0].count_range(start, end + 1),) + shape[end + 1:])
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared
