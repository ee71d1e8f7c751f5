"""Embed: a lookup table, y[..., :] = W[x[...], :] + b, as Caffe's EmbedLayer.

The bottom holds integer word indices as floats (any shape); the top is the bottom's shape plus
num_output. W is (input_dim, num_output), b (num_output,) with bias_term (default). An index that is
not an integer in 0..input_dim - 1 is an error naming it. The indices have no gradient (Caffe refuses
to backpropagate to them); W's gradient sums the top diff rows of each word, b's all rows, both
deterministically (kernels/indices.cu, layers/reduce.py), added into the parameter diffs.
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from .indices import gather_rows, read_indices, sum_rows_by_index
from .reduce import channel_sums_of

BROADCAST = KernelFile("broadcast.cu")


@register("Embed")
class EmbedLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.embed_param
        self.num_output, self.input_dim, self.bias_term = param.num_output, param.input_dim, param.bias_term
        if self.num_output <= 0:
            self.fail("embed_param.num_output must be given and positive")
        if self.input_dim <= 0:
            self.fail("embed_param.input_dim must be given and positive")
        shapes = [(self.input_dim, self.num_output)] + ([(self.num_output,)] if self.bias_term else [])
        self.setup_params(shapes, [param.weight_filler, param.bias_filler])

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (the top has another shape)")
        top[0].reshape((*bottom[0].shape, self.num_output))

    def forward(self, bottom, top):
        index = read_indices(self, bottom[0], self.input_dim, "index")
        y = top[0].mutable_data()
        gather_rows(index, self.blobs[0].get_data(), y, self.num_output)
        if self.bias_term and index.size:
            rows = y.reshape(index.size, self.num_output)
            BROADCAST.broadcast_add_rows(index.size, self.num_output, rows, self.blobs[1].get_data(), rows,
                                         extents=(index.size, self.num_output))

    def planned_kept_bytes(self, bottom, top):
        return bottom[0].count * 4  # the int32 indices (read_indices)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.fail("cannot backpropagate to its input (the indices have no gradient; Caffe refuses too)")
        dy, index = top[0].get_diff(), self.buffers["index"]
        if self.param_propagate_down[0]:
            sum_rows_by_index(self, index, dy, self.blobs[0].mutable_diff(), self.input_dim, self.num_output,
                              accumulate=True)
        if self.bias_term and self.param_propagate_down[1] and index.size:
            channel_sums_of(self, (index.size, self.num_output, 1), dy, self.blobs[1].mutable_diff())
