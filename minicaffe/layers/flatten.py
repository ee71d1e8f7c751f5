"""Flatten: merge axes flatten_param.axis..end_axis (inclusive; default 1..-1) into one.

The top shares the bottom's data and diff (no copy), so forward and backward have nothing to do."""

from __future__ import annotations

from ..layer import ViewLayer, register


@register("Flatten")
class FlattenLayer(ViewLayer):
    def top_shape(self, bottom):
        param, shape = self.param.flatten_param, bottom.shape
        try:
            start = bottom.canonical_axis(param.axis)
            end = bottom.canonical_axis(param.end_axis)
        except ValueError as error:
            self.fail(str(error))
        if end < start:
            self.fail(f"end_axis {param.end_axis} comes before axis {param.axis} for bottom {list(shape)}")
        return shape[:start] + (bottom.count_range(start, end + 1),) + shape[end + 1:]
