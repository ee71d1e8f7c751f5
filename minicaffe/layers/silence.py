"""Silence: consumes its bottoms (so they are not net outputs); backward writes zero gradients."""

from __future__ import annotations

from ..layer import Layer, register


@register("Silence")
class SilenceLayer(Layer):
    min_num_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for blob, down in zip(bottom, propagate_down):
            if down:
                blob.mutable_diff()[...] = 0
