"""ArgMax: the top_k largest values of each item (or along argmax_param.axis), as indices or values.

Caffe's shapes: without an axis the item's values (axes 1 on) are ranked and the top is (N, 1, top_k)
of indices, or (N, 2, top_k) with out_max_val (indices, then values), padded with 1s to the bottom's
axis count; with an axis the top is the bottom with that axis cut to top_k, holding indices, or the
values with out_max_val. Ties rank the larger index first, as Caffe's sort of (value, index) pairs.
Indices are written as floats (exact up to 2^24 in float32, checked). No gradient: Caffe has none.
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("argmax.cu")
FLOAT32_EXACT = 2**24  # the largest integer range float32 holds exactly


@register("ArgMax")
class ArgMaxLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.argmax_param
        self.out_max_val = param.out_max_val
        self.top_k = param.top_k
        self.has_axis = param.HasField("axis")
        if self.top_k < 1:
            self.fail(f"top_k must be at least 1, got {self.top_k}")

    def reshape(self, bottom, top):
        blob = bottom[0]
        if top[0] is blob:
            self.fail("cannot run in place (the top has another shape)")
        if blob.num_axes == 0:
            self.fail("needs a bottom with at least one axis, got a scalar")
        if self.has_axis:
            try:
                axis = blob.canonical_axis(self.param.argmax_param.axis)
            except ValueError as error:
                self.fail(str(error))
            self.outer, self.dim, self.inner = blob.count_range(0, axis), blob.shape[axis], \
                blob.count_range(axis + 1)
            what = f"the size {self.dim} of axis {axis}"
            shape = list(blob.shape)
            shape[axis] = self.top_k
        else:
            self.outer, self.dim, self.inner = blob.shape[0], blob.count_range(1), 1
            what = f"the {self.dim} values per item"
            shape = [1] * max(blob.num_axes, 3)
            shape[0], shape[1], shape[2] = blob.shape[0], 2 if self.out_max_val else 1, self.top_k
        if self.top_k > self.dim:
            self.fail(f"top_k {self.top_k} is more than {what} (bottom shape {list(blob.shape)})")
        if self.dtype.itemsize == 4 and self.dim > FLOAT32_EXACT:
            self.fail(f"{what} are too many for float32 indices (at most {FLOAT32_EXACT})")
        top[0].reshape(shape)

    def forward(self, bottom, top):
        if self.has_axis:  # one output per (outer, k, inner), indices or values
            plane_stride = self.top_k * self.inner
            index_offset, value_offset = (-1, 0) if self.out_max_val else (0, -1)
        else:  # per item: top_k indices, then (out_max_val) top_k values
            plane_stride = self.top_k * (2 if self.out_max_val else 1)
            index_offset, value_offset = 0, (self.top_k if self.out_max_val else -1)
        if bottom[0].count == 0:
            return
        if self.top_k == 1:
            best = self.buffer("best", (self.outer, self.inner))
            best_index = self.buffer("best_index", (self.outer, self.inner))
            KERNELS.argmax_top1_forward(self.outer, self.dim, self.inner, bottom[0].get_data(), best,
                                        best_index, top[0].mutable_data(), plane_stride, index_offset,
                                        value_offset, extents=(self.outer, self.inner))
            return
        KERNELS.argmax_forward(self.outer, self.dim, self.inner, self.top_k, bottom[0].get_data(),
                               top[0].mutable_data(), plane_stride, index_offset, value_offset,
                               extents=(self.outer, self.inner))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.fail("has no gradient (Caffe: not implemented); do not backpropagate through ArgMax")
