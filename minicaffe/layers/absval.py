"""AbsVal: y = |x|, dy/dx = sign(x) (0 at 0).

Caffe refuses to run it in place because backward needs the sign of x, which y = |x| has lost. Here
in place works: x is kept for backward."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("activation.cu")


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    keeps = "input"

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.absval_forward(x.size, x, top[0].mutable_data(), extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.kept_input(bottom)
        KERNELS.absval_backward(x.size, x, top[0].get_diff(), bottom[0].mutable_diff(), extents=x.size)
