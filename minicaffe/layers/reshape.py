"""Reshape: replace input axes [axis, axis + num_axes) by reshape_param.shape, where a 0 copies the
input dim at that place and one -1 is inferred from the count (Caffe's semantics).

The top shares the bottom's data and diff (no copy), so forward and backward have nothing to do."""

from __future__ import annotations

from ..layer import ViewLayer, register


@register("Reshape")
class ReshapeLayer(ViewLayer):
    def layer_setup(self, bottom, top):
        dims = list(self.param.reshape_param.shape.dim)
        if dims.count(-1) > 1:
            self.fail(f"shape {dims} has more than one -1 (only one dim can be inferred)")
        if any(d < -1 for d in dims):
            self.fail(f"shape {dims} has a dim below -1 (use 0 to copy a dim, -1 to infer one)")
        self.dims = dims

    def top_shape(self, bottom):
        param, shape = self.param.reshape_param, bottom.shape
        start = param.axis if param.axis >= 0 else len(shape) + param.axis + 1
        if not 0 <= start <= len(shape):
            self.fail(f"axis {param.axis} out of range for bottom {list(shape)}")
        if param.num_axes < -1:
            self.fail(f"num_axes {param.num_axes} must be >= 0 (or -1: through the last axis)")
        end = len(shape) if param.num_axes == -1 else start + param.num_axes
        if end > len(shape):
            self.fail(f"axis {param.axis} + num_axes {param.num_axes} go past the {len(shape)} axes of "
                      f"bottom {list(shape)}")
        middle = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= len(shape):
                    self.fail(f"shape {self.dims}: dim {i} is 0 (copy) but bottom {list(shape)} has no "
                              f"axis {start + i}")
                d = shape[start + i]
            middle.append(d)
        new_shape = list(shape[:start]) + middle + list(shape[end:])
        if -1 in middle:
            known = 1
            for d in new_shape:
                known *= d if d != -1 else 1
            if known == 0 or bottom.count % known:
                self.fail(f"cannot infer the -1 in shape {self.dims}: bottom {list(shape)} has "
                          f"{bottom.count} values, not a multiple of {known}")
            new_shape[new_shape.index(-1)] = bottom.count // known
        count = 1
        for d in new_shape:
            count *= d
        if count != bottom.count:
            self.fail(f"bottom {list(shape)} has {bottom.count} values, the new shape {new_shape} "
                      f"has {count} (shape {self.dims}, axis {param.axis}, num_axes {param.num_axes})")
        return new_shape
