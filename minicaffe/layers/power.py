"""Power: y = (shift + scale * x)^power, as Caffe's PowerLayer; in place allowed."""

from __future__ import annotations

import numpy as np

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("power.cu")


@register("Power")
class PowerLayer(NeuronLayer):
    def layer_setup(self, bottom, top):
        param = self.param.power_param
        self.power, self.scale, self.shift = float(param.power), float(param.scale), float(param.shift)
        # dy/dx = power * scale * (...)^(power - 1): zero everywhere when power or scale is 0, and then
        # y is a constant (1 for power 0, shift^power for scale 0).
        self.diff_scale = self.power * self.scale
        # Backward needs x only for powers other than 0 and 1.
        self.keeps = "input" if self.diff_scale != 0 and self.power != 1 else None

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        y = top[0].mutable_data()
        n = x.size
        if self.diff_scale == 0:
            with np.errstate(all="ignore"):  # Caffe's pow: a negative shift to a fractional power is nan
                value = 1.0 if self.power == 0 else np.power(self.dtype.type(self.shift),
                                                             self.dtype.type(self.power))
            y.fill(value)
        elif self.power == 1:
            KERNELS.power_forward_linear(n, x, y, self.scale, self.shift, extents=n)
        elif self.power == 2:
            KERNELS.power_forward_square(n, x, y, self.scale, self.shift, extents=n)
        else:
            KERNELS.power_forward(n, x, y, self.power, self.scale, self.shift, extents=n)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].get_diff()
        dx = bottom[0].mutable_diff()
        n = dy.size
        if self.diff_scale == 0:
            dx.fill(0)
        elif self.power == 1:
            KERNELS.power_backward_linear(n, dy, dx, self.scale, extents=n)
        else:
            x = self.kept_input(bottom)
            if self.power == 2:
                KERNELS.power_backward_square(n, x, dy, dx, self.scale, self.shift, extents=n)
            else:
                KERNELS.power_backward(n, x, dy, dx, self.power, self.scale, self.shift, extents=n)
