"""Clip and Threshold, as Caffe's layers of those types (math in kernels/clip.cu).

    Clip:      y = max(min, min(x, max)),  dy/dx = 1 where min <= x <= max, else 0 (Caffe's convention
               at the bounds); a nan x gives min, as in Caffe
    Threshold: y = 1 where x > threshold, else 0; no gradient
"""

from __future__ import annotations

import math

import numpy as np

from ..kernel import KernelFile
from ..layer import NeuronLayer, register

KERNELS = KernelFile("clip.cu")


@register("Clip")
class ClipLayer(NeuronLayer):
    # Backward needs to know whether min <= x <= max, which y has lost at the bounds: in place, that is
    # kept as one byte per element (lean_keep), as ReLU keeps x > 0.
    keeps = "input"

    def layer_setup(self, bottom, top):
        param = self.param.clip_param
        if not (param.HasField("min") and param.HasField("max")):
            self.fail("needs clip_param { min: ... max: ... } (both are required in Caffe)")
        self.min, self.max = float(param.min), float(param.max)
        if not self.min <= self.max:
            self.fail(f"clip_param min {self.min} must be <= max {self.max}")

    def lean_keep(self, bottom, top):
        return True  # the mask min <= x <= max is all backward needs

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        if self.kept_lean:
            passes = self.buffer("passes", x.shape, np.uint8, kept=True)
            KERNELS.clip_forward_masked(x.size, x, top[0].mutable_data(), self.min, self.max, passes,
                                        extents=x.size)
        else:
            KERNELS.clip_forward(x.size, x, top[0].mutable_data(), self.min, self.max, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].get_diff()
        if self.kept_lean:
            KERNELS.clip_backward_masked(dy.size, self.buffers["passes"], dy, bottom[0].mutable_diff(),
                                         extents=dy.size)
        else:
            x = self.kept_input(bottom)
            KERNELS.clip_backward(x.size, x, dy, bottom[0].mutable_diff(), self.min, self.max, extents=x.size)


@register("Threshold")
class ThresholdLayer(NeuronLayer):
    """A step function has no gradient: Caffe's ThresholdLayer refuses backward (NOT_IMPLEMENTED), so a
    Net runs it only where no gradient is asked of its bottom. Here too, with an error naming the layer
    (and the way out) instead of Caffe's abort; with propagate_down false, backward does nothing."""

    def layer_setup(self, bottom, top):
        self.threshold = float(self.param.threshold_param.threshold)
        if math.isnan(self.threshold):
            self.fail("threshold_param.threshold is nan")

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        KERNELS.threshold_forward(x.size, x, top[0].mutable_data(), self.threshold, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.fail("has no gradient (y is a step function of x), and Caffe's Threshold layer has no "
                      "backward either; give the layer propagate_down: false if nothing below it learns "
                      "through it")
