"""Bias: y = x + b, b broadcast along axes [axis, axis + b's num_axes) of x, as Caffe's BiasLayer.

b is a learned blob (one bottom; default filler constant 0) or the second bottom; the axis logic is
BroadcastLayer's (layers/broadcast.py). The Scale layer's bias_term runs one of these.
"""

from __future__ import annotations

from ..layer import register
from .broadcast import BroadcastLayer
from .reduce import channel_sums_of


@register("Bias")
class BiasLayer(BroadcastLayer):
    operand = "bias"

    def axes_param(self):
        return self.param.bias_param

    def layer_setup(self, bottom, top):
        if len(bottom) == 1:
            self.setup_params([self.learned_shape(bottom[0])], [self.param.bias_param.filler])

    def forward(self, bottom, top):
        bias = self.operand_blob(bottom)
        self.broadcast("add", bottom[0].get_data(), bias.get_data(), top[0].mutable_data())

    def backward(self, top, propagate_down, bottom):
        dy = top[0].get_diff()
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].mutable_diff()[...] = dy  # in place the diff is already dy
        # The bias gradient: dy summed over outer and inner (the learned one accumulates).
        if len(bottom) > 1:
            if propagate_down[1]:
                channel_sums_of(self, self.dims, dy, bottom[1].mutable_diff(), accumulate=False)
        elif self.param_propagate_down[0]:
            channel_sums_of(self, self.dims, dy, self.blobs[0].mutable_diff(), accumulate=True)
