"""LRN: local response normalisation, y = x * (shift + mult * sum_window(x^2))^-beta (Caffe's LRNLayer).

ACROSS_CHANNELS sums over local_size neighbouring channels (shift k, mult alpha / local_size);
WITHIN_CHANNEL over a local_size x local_size spatial box, zero padded (shift 1, mult alpha /
local_size^2: Caffe builds it from AVE pooling, whose divisor counts the padding, and ignores k).
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from ..proto import caffe_pb2

KERNELS = KernelFile("lrn.cu")
ACROSS_CHANNELS = caffe_pb2.LRNParameter.ACROSS_CHANNELS
WITHIN_CHANNEL = caffe_pb2.LRNParameter.WITHIN_CHANNEL


@register("LRN")
class LRNLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 == 0:
            self.fail(f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.region = p.norm_region
        if self.region not in (ACROSS_CHANNELS, WITHIN_CHANNEL):
            self.fail(f"unknown norm_region {self.region}")
        self.pre = (self.size - 1) // 2
        self.post = self.size - self.pre - 1
        if self.region == ACROSS_CHANNELS:
            self.shift, self.mult = self.k, self.alpha / self.size
        else:
            self.shift, self.mult = 1.0, self.alpha / (self.size * self.size)

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("LRN cannot run in place (top and bottom are the same blob)")
        if bottom[0].num_axes != 4:
            self.fail(f"needs a 4-d bottom (num, channels, height, width), got shape {list(bottom[0].shape)}")
        top[0].reshape_like(bottom[0])

    def _window_sum(self, values, out, squared: bool, mirrored: bool) -> None:
        """out = sum over each position's window of values (or of their squares)."""
        n, c, h, w = values.shape
        before, after = (self.post, self.pre) if mirrored else (self.pre, self.post)

        def within(length: int) -> tuple[int, int]:
            # Taps farther than the axis is long see only padding: cutting them changes no sum, and
            # keeps the kernels' int loops (l + after, d <= after) from overflowing for a huge local_size.
            return min(before, length), min(after, length)

        if self.region == ACROSS_CHANNELS:
            KERNELS.lrn_window_sum(n * c, c, h * w, *within(c), int(squared), values, out,
                                   extents=(n * c, h * w))
            return
        # Spatial box = sum along rows, then along columns.
        rows = self.buffer("rows", values.shape)
        KERNELS.lrn_row_window_sum(n * c * h, w, *within(w), int(squared), values, rows,
                                   extents=(n * c * h, w))
        KERNELS.lrn_window_sum(n * c * h, h, w, *within(h), 0, rows, out, extents=(n * c * h, w))

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        scale = self.buffer("scale", x.shape)  # also for backward
        self._window_sum(x, scale, squared=True, mirrored=False)
        KERNELS.lrn_forward_output(x.size, x, scale, scale, top[0].mutable_data(),
                                   self.shift, self.mult, self.beta, extents=x.size)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].get_data()
        dy = top[0].get_diff()
        dx = bottom[0].mutable_diff()
        ratio = self.buffer("ratio", x.shape)
        scale = self.buffer("scale", x.shape)  # as forward left it
        KERNELS.lrn_backward_ratio(x.size, x, dy, scale, ratio, dx, self.beta, extents=x.size)
        ratio_sum = self.buffer("ratio_sum", x.shape)
        self._window_sum(ratio, ratio_sum, squared=False, mirrored=True)
        KERNELS.lrn_backward_finish(x.size, x, ratio_sum, dx, 2.0 * self.mult * self.beta, extents=x.size)
