"""BNLL and Swish, as Caffe's layers of those types (math in kernels/smooth_relu.cu).

    BNLL:  y = log(1 + exp(x)),       dy/dx = sigmoid(x)
    Swish: y = x * sigmoid(beta x),   dy/dx = beta y + sigmoid(beta x) * (1 - beta y)

(swish_param's beta is a constant, as in Caffe.) Both differentiate from x: in place they keep a copy.
"""

from __future__ import annotations

import math

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("smooth_relu.cu")


@register("BNLL")
class BNLLLayer(NeuronLayer):
    keeps = "input"

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.bnll_forward(x.size, x, top[0].mutable_data(), extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.kept_input(bottom)
        KERNELS.bnll_backward(x.size, x, top[0].get_diff(), bottom[0].mutable_diff(), extents=x.size)


@register("Swish")
class SwishLayer(NeuronLayer):
    keeps = "input"

    def layer_setup(self, bottom, top):
        self.beta = float(self.param.swish_param.beta)
        if not math.isfinite(self.beta):
            self.fail(f"swish_param.beta must be finite, got {self.beta}")

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.swish_forward(x.size, x, top[0].mutable_data(), self.beta, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.kept_input(bottom)
        KERNELS.swish_backward(x.size, x, top[0].get_diff(), bottom[0].mutable_diff(), self.beta,
                               extents=x.size)
