"""Sigmoid and TanH: element-wise, and their backward needs only the output y, so in place is allowed
(y is kept: later in-place layers may change the top before this layer's backward).

    Sigmoid: y = 1 / (1 + exp(-x)),  dx = dy * y * (1 - y)
    TanH:    y = tanh(x),            dx = dy * (1 - y^2)
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("activation.cu")


class OutputGradientActivation(NeuronLayer):
    """An element-wise layer whose gradient is a function of its output; `kernel` names the pair
    `<kernel>_forward(count, x, y)` / `<kernel>_backward(count, y, dy, dx)` in activation.cu."""

    kernel = ""
    keeps = "output"

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        y = top[0].mutable_data()
        KERNELS.launch(f"{self.kernel}_forward", x.size, x.size, x, y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = self.kept_output(top)
        KERNELS.launch(f"{self.kernel}_backward", y.size, y.size, y, top[0].get_diff(),
                       bottom[0].mutable_diff())


@register("Sigmoid")
class SigmoidLayer(OutputGradientActivation):
    kernel = "sigmoid"


@register("TanH")
class TanHLayer(OutputGradientActivation):
    kernel = "tanh"
