"""Dropout, as Caffe's DropoutLayer: identity at test time; at train time y = x * mask / (1 - ratio)
with mask ~ Bernoulli(1 - ratio) (Caffe's "inverted" dropout, scaled while training).

The mask comes from a counter-based hash in the kernel (see kernels/dropout.cu), keyed by
rng.key32("dropout", layer name) and the layer's forward_index, so it is the same on CPU and GPU and
a resumed run replays it. The mask is kept for backward (a byte per element), which makes in-place use
correct.
"""

from __future__ import annotations

import numpy as np

from .. import rng
from ..kernel import KernelFile
from ..layer import TRAIN, NeuronLayer, register

KERNELS = KernelFile("dropout.cu")


@register("Dropout")
class DropoutLayer(NeuronLayer):
    def layer_setup(self, bottom, top):
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            self.fail(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        # Caffe keeps scale_ as a float, also in double nets.
        self.scale = float(np.float32(1.0 / (1.0 - self.ratio)))

    def planned_kept_bytes(self, bottom, top):
        return bottom[0].count if self.phase == TRAIN else 0  # the mask

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                top[0].mutable_data()[...] = x
            return
        mask = self.buffer("mask", x.shape, np.uint8, kept=True)
        key = rng.key32("dropout", self.name)
        counter = int(self.forward_index) & 0xFFFFFFFF
        KERNELS.dropout_forward(x.size, x, top[0].mutable_data(), mask, key, counter,
                                self.ratio, self.scale, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].get_diff()
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                bottom[0].mutable_diff()[...] = dy
            return
        mask = self.buffer("mask", dy.shape, np.uint8)  # as forward left it
        KERNELS.dropout_backward(dy.size, dy, mask, bottom[0].mutable_diff(), self.scale, extents=dy.size)
