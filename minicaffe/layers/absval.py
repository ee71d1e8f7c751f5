"""AbsVal: y = |x|, dy/dx = sign(x) (0 at 0).

Caffe refuses to run it in place because backward needs the sign of x, which y = |x| has lost. Here
in place works: the sign of x is kept for backward, one byte per element."""

from __future__ import annotations

import numpy as np

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("activation.cu")


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    keeps = "input"

    def lean_keep(self, bottom, top):
        return True  # the sign of x is all backward needs

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        if self.kept_lean:
            sign = self.buffer("sign", x.shape, np.uint8, kept=True)
            KERNELS.absval_forward_masked(x.size, x, top[0].mutable_data(), sign, extents=x.size)
        else:
            KERNELS.absval_forward(x.size, x, top[0].mutable_data(), extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].get_diff()
        if self.kept_lean:
            KERNELS.absval_backward_masked(dy.size, self.buffers["sign"], dy, bottom[0].mutable_diff(),
                                           extents=dy.size)
        else:
            x = self.kept_input(bottom)
            KERNELS.absval_backward(x.size, x, dy, bottom[0].mutable_diff(), extents=x.size)
