"""Sigmoid and TanH: element-wise, and their backward needs only the output y, so in place is allowed
(then y is kept: later in-place layers may change the shared blob before this layer's backward).

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

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        y = top[0].mutable_data()
        KERNELS.launch(f"{self.kernel}_forward", x.size, x.size, x, y)
        self.saved_output = self.keep(y) if top[0] is bottom[0] else None

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = self.saved_output if self.saved_output is not None else top[0].get_data()
        KERNELS.launch(f"{self.kernel}_backward", y.size, y.size, y, top[0].get_diff(),
                       bottom[0].mutable_diff())


@register("Sigmoid")
class SigmoidLayer(OutputGradientActivation):
    kernel = "sigmoid"


@register("TanH")
class TanHLayer(OutputGradientActivation):
    kernel = "tanh"
