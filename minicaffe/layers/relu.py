"""ReLU: y = max(0, x) + negative_slope * min(0, x)."""

from __future__ import annotations

import numpy as np

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("relu.cu")


@register("ReLU")
class ReLULayer(NeuronLayer):
    # In place, backward must not read the blob: it holds y, and later in-place layers may have changed
    # it again (a negative slope or a Power flips signs). So what backward needs of x is kept: in place
    # only whether x > 0, one byte per element (lean_keep). (Caffe reads the blob.)
    keeps = "input"

    def layer_setup(self, bottom, top):
        self.negative_slope = self.param.relu_param.negative_slope

    def lean_keep(self, bottom, top):
        return True  # the mask x > 0 is all backward needs

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        if self.kept_lean:
            positive = self.buffer("positive", x.shape, np.uint8, kept=True)
            KERNELS.relu_forward_masked(x.size, x, top[0].mutable_data(), self.negative_slope, positive,
                                        extents=x.size)
        else:
            KERNELS.relu_forward(x.size, x, top[0].mutable_data(), self.negative_slope, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].get_diff()
        if self.kept_lean:
            KERNELS.relu_backward_masked(dy.size, self.buffers["positive"], dy, bottom[0].mutable_diff(),
                                         self.negative_slope, extents=dy.size)
        else:
            x = self.kept_input(bottom)
            KERNELS.relu_backward(x.size, x, dy, bottom[0].mutable_diff(), self.negative_slope,
                                  extents=x.size)
