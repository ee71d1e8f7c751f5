"""Slice: cut the bottom along slice_param.axis (default 1; legacy slice_dim) at slice_point (or into
equal parts, one per top); backward joins the tops' gradients back."""

from __future__ import annotations

from ..layer import Layer, register
from .concat import copy_block, legacy_axis


@register("Slice")
class SliceLayer(Layer):
    exact_num_bottom = 1
    min_num_top = 1

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        param = self.param.slice_param
        self.axis = axis = legacy_axis(self, bottom[0], param, "slice_dim")
        size = shape[axis]
        points = list(param.slice_point)
        if points:
            if len(points) != len(top) - 1:
                self.fail(f"{len(points)} slice_point values for {len(top)} tops (need {len(top) - 1})")
            bounds = [0, *points, size]
            if any(a >= b for a, b in zip(bounds, bounds[1:])):
                self.fail(f"slice_point {points} must increase strictly inside (0, {size}) "
                          f"(axis {axis} of bottom {list(shape)})")
        else:
            if size % len(top):
                self.fail(f"{len(top)} tops do not evenly divide axis {axis} of size {size} "
                          f"(bottom {list(shape)}); give slice_point")
            bounds = [i * (size // len(top)) for i in range(len(top) + 1)]
        self.sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        self.outer = bottom[0].count_range(0, axis)
        self.inner = bottom[0].count_range(axis + 1)
        for blob, part in zip(top, self.sizes):
            if blob is bottom[0]:
                self.fail("cannot run in place")
            blob.reshape(shape[:axis] + (part,) + shape[axis + 1:])

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        bottom_axis = bottom[0].shape[self.axis] * self.inner
        offset = 0
        for blob, part in zip(top, self.sizes):
            n = part * self.inner
            copy_block(x, blob.mutable_data(), self.outer, n, bottom_axis, offset, n, 0)
            offset += n

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].mutable_diff()
        bottom_axis = bottom[0].shape[self.axis] * self.inner
        offset = 0
        for blob, part in zip(top, self.sizes):
            n = part * self.inner
            copy_block(blob.get_diff(), dx, self.outer, n, n, 0, bottom_axis, offset)
            offset += n
