"""SPP (Caffe's SPPLayer): spatial pyramid pooling, a fixed-length vector from an input of any size.

Level i (0 .. pyramid_height - 1) pools the (N, C, H, W) input into 2^i x 2^i bins: a Pooling layer
with kernel ceil(H / bins), stride = kernel and pad = (kernel * bins - H + 1) / 2 (per axis, as Caffe
computes them), then Flatten; Concat joins the levels into (N, C * sum of 4^i). With pyramid_height 1
the top is the one Pooling's output, (N, C, 1, 1), as in Caffe. As in Caffe the work is done by inner
layers (Split, Pooling, Flatten, Concat), run with run_forward / run_backward and rebuilt when the
input's height or width changes (the kernels depend on them).
"""

from __future__ import annotations

import math

from ..blob import Blob
from ..layer import Layer, create_layer, register
from ..proto import caffe_pb2

STOCHASTIC = caffe_pb2.SPPParameter.STOCHASTIC


def level_geometry(size: int, bins: int) -> tuple[int, int]:
    """(kernel, pad) of one axis of `size` pooled into `bins` bins, as Caffe's SPP computes them."""
    kernel = math.ceil(size / bins)
    return kernel, (kernel * bins - size + 1) // 2


@register("SPP")
class SPPLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.spp_param
        if param.pyramid_height < 1:
            self.fail(f"spp_param.pyramid_height must be given and at least 1, got {param.pyramid_height}")
        if param.pool == STOCHASTIC:
            self.fail("pool: STOCHASTIC is not supported (use MAX or AVE)")
        self.levels = param.pyramid_height
        self.size: tuple[int, int] | None = None

    def _inner(self, kind: str, name: str, bottom: list[Blob], top: list[Blob], **params) -> Layer:
        """An inner layer of type `kind`, set up on these blobs; params: its *_param messages."""
        param = caffe_pb2.LayerParameter(name=f"{self.name}/{name}", type=kind, **params)
        layer = create_layer(param, self.phase, self.dtype)
        layer.setup(bottom, top)
        return layer

    def _build(self, bottom: Blob, top: Blob) -> None:
        """The inner layers for the bottom's height and width."""
        height, width = bottom.shape[2:]
        poolings = []
        for level in range(self.levels):
            bins = 2 ** level
            (kernel_h, pad_h), (kernel_w, pad_w) = level_geometry(height, bins), level_geometry(width, bins)
            if pad_h >= kernel_h or pad_w >= kernel_w:
                self.fail(f"the input {height}x{width} (bottom shape {list(bottom.shape)}) is too small for "
                          f"pyramid level {level} ({bins}x{bins} bins): it needs height and width such "
                          "that each bin's padding is less than its kernel")
            poolings.append(caffe_pb2.PoolingParameter(
                pool=self.param.spp_param.pool, kernel_h=kernel_h, kernel_w=kernel_w, stride_h=kernel_h,
                stride_w=kernel_w, pad_h=pad_h, pad_w=pad_w))
        self.size = (height, width)
        if self.levels == 1:
            self.layers = [(self._inner("Pooling", "level 0", [bottom], [top], pooling_param=poolings[0]),
                            [bottom], [top])]
            return
        copies = [Blob((), self.dtype) for _ in range(self.levels)]
        pooled = [Blob((), self.dtype) for _ in range(self.levels)]
        flat = [Blob((), self.dtype) for _ in range(self.levels)]
        self.layers = [(self._inner("Split", "split", [bottom], copies), [bottom], copies)]
        for level, pooling in enumerate(poolings):
            blobs = [copies[level]], [pooled[level]]
            self.layers.append((self._inner("Pooling", f"level {level}", *blobs, pooling_param=pooling),
                                *blobs))
            blobs = [pooled[level]], [flat[level]]
            self.layers.append((self._inner("Flatten", f"level {level} flatten", *blobs), *blobs))
        self.layers.append((self._inner("Concat", "concat", flat, [top]), flat, [top]))

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (top is bottom)")
        if bottom[0].num_axes != 4:
            self.fail(f"input must have 4 axes (num, channels, height, width), got shape "
                      f"{list(bottom[0].shape)}")
        if bottom[0].shape[2:] != self.size:
            self._build(bottom[0], top[0])
            return
        for layer, inner_bottom, inner_top in self.layers:
            layer.reshape(inner_bottom, inner_top)

    def forward(self, bottom, top):
        for layer, inner_bottom, inner_top in self.layers:
            layer.run_forward(inner_bottom, inner_top)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        for layer, inner_bottom, inner_top in reversed(self.layers):
            layer.run_backward(inner_top, [True] * len(inner_bottom), inner_bottom)
