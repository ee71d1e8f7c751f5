"""Parameter: a learned blob of parameter_param.shape as the top, as Caffe's ParameterLayer (no bottoms).

The blob starts at zeros, as in Caffe (set it by weights or a solver). Forward copies it to the top;
backward adds the top diff into its diff. Caffe shares the top's data and diff with the blob instead:
the same values, but a shared diff is overwritten by the layers above rather than accumulated, which
would lose all but the last gradient with iter_size > 1, and a later in-place layer on the top would
write into the parameter.
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

ELTWISE = KernelFile("eltwise.cu")


@register("Parameter")
class ParameterLayer(Layer):
    exact_num_bottom = 0
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.parameter_param
        if not param.HasField("shape"):
            self.fail("parameter_param.shape must be given")
        shape = tuple(param.shape.dim)
        if any(d < 0 for d in shape):
            self.fail(f"parameter_param.shape has a negative dim: {list(shape)}")
        if not self.check_param_blob(0, shape):
            self.add_param_blob(shape)  # zeros

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].mutable_data()[...] = self.blobs[0].get_data()  # a copy: pure data movement

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0] and top[0].count:
            ELTWISE.eltwise_axpy(top[0].count, top[0].get_diff(), self.blobs[0].mutable_diff(), 1.0,
                                 extents=top[0].count)
