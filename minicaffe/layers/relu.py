"""ReLU: y = max(0, x) + negative_slope * min(0, x)."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("relu.cu")


@register("ReLU")
class ReLULayer(NeuronLayer):
    # In place, backward must not read the blob: it holds y, and later in-place layers may have changed
    # it again (a negative slope or a Power flips signs). So x is kept. (Caffe reads the blob.)
    keeps = "input"

    def layer_setup(self, bottom, top):
        self.negative_slope = self.param.relu_param.negative_slope

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.relu_forward(x.size, x, top[0].mutable_data(), self.negative_slope, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.kept_input(bottom)
        dy = top[0].get_diff()
        KERNELS.relu_backward(x.size, x, dy, bottom[0].mutable_diff(), self.negative_slope, extents=x.size)
