"""BatchReindex: top[m] = bottom[0][index[m]] along the first axis, index = bottom[1] (integers as floats,
one axis), as Caffe's BatchReindexLayer. An index may repeat or be left out; one outside 0..N - 1 (or
not an integer) is an error naming it. Backward: dx[n] = the sum of dy[m] over the m with index[m] == n,
in ascending m (0 where no m picks n), deterministically (kernels/indices.cu); the indices have none."""

from __future__ import annotations

from ..layer import Layer, register
from .indices import gather_rows, read_indices, sum_rows_by_index


@register("BatchReindex")
class BatchReindexLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1

    def reshape(self, bottom, top):
        data, index = bottom
        if top[0] is data or top[0] is index:
            self.fail("cannot run in place")
        if data.num_axes == 0:
            self.fail("needs a data bottom with at least one axis, got a scalar")
        if index.num_axes != 1:
            self.fail(f"the index bottom must have one axis, got shape {list(index.shape)}")
        top[0].reshape((index.shape[0], *data.shape[1:]))

    def forward(self, bottom, top):
        index = read_indices(self, bottom[1], bottom[0].shape[0], "index")
        gather_rows(index, bottom[0].get_data(), top[0].mutable_data(), bottom[0].count_range(1))

    def planned_kept_bytes(self, bottom, top):
        return bottom[1].count * 4  # the int32 indices (read_indices)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to the indices (bottom 1)")
        if propagate_down[0]:
            sum_rows_by_index(self, self.buffers["index"], top[0].get_diff(), bottom[0].mutable_diff(),
                              bottom[0].shape[0], bottom[0].count_range(1), accumulate=False)
