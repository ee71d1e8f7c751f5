"""Sigmoid: y = 1 / (1 + exp(-x)); in place allowed (backward uses y only)."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("activation.cu")


@register("Sigmoid")
class SigmoidLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.sigmoid_forward(x.size, x, top[0].mutable_data(), grid=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = top[0].get_data()
        KERNELS.sigmoid_backward(y.size, y, top[0].get_diff(), bottom[0].mutable_diff(), grid=y.size)
