"""Pooling: MAX or AVE over (kernel_h, kernel_w) windows, as Caffe's PoolingLayer.

Output size as Caffe: ceil (or floor with round_mode FLOOR) of (H + 2 pad - kernel) / stride, plus 1;
with padding the last window must start inside the image, else it is dropped. MAX keeps the argmax
of every window (an int32 mask, indices within the (n, c) plane) for backward, and gives it as a second
top when asked, as float, as Caffe does.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernel import KernelFile
from ..layer import Layer, register
from ..proto import caffe_pb2

KERNELS = KernelFile("pooling.cu")

MAX = caffe_pb2.PoolingParameter.MAX
AVE = caffe_pb2.PoolingParameter.AVE
STOCHASTIC = caffe_pb2.PoolingParameter.STOCHASTIC
FLOOR = caffe_pb2.PoolingParameter.FLOOR
# MAX backward of 2x2 / 2 windows gathers (pool_max_backward_2x2) on rows of at least this many output
# cells, a vector's worth; shorter rows scatter (kernels/pooling.cu says what was measured).
GATHER_2X2_MIN_CELLS = 16


def pooled_size(size: int, kernel: int, stride: int, pad: int, floor: bool) -> int:
    """Caffe's output extent along one axis (float32 division, as in Caffe's Reshape)."""
    ratio = float(np.float32(size + 2 * pad - kernel) / np.float32(stride))
    pooled = (math.floor(ratio) if floor else math.ceil(ratio)) + 1
    # With padding, the last window must start inside the image, not in the padding.
    if pad > 0 and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def covering_columns(width: int, kernel: int, stride: int, pad: int, pooled: int) -> tuple:
    """For each input column w: the output columns [start, end) whose windows cover it."""
    wp = np.arange(width) + pad
    start = np.where(wp < kernel, 0, (wp - kernel) // stride + 1)
    end = np.minimum(wp // stride + 1, pooled)
    return start.astype(np.int32), end.astype(np.int32)


@register("Pooling")
class PoolingLayer(Layer):
    exact_num_bottom = 1
    min_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.pooling_param
        self.method = p.pool
        if self.method == STOCHASTIC:
            self.fail("pool: STOCHASTIC is not supported (use MAX or AVE)")
        if len(top) > (2 if self.method == MAX else 1):
            self.fail(f"takes at most {2 if self.method == MAX else 1} top blob(s) for pool "
                      f"{caffe_pb2.PoolingParameter.PoolMethod.Name(self.method)}, got {len(top)}")
        has_size = p.HasField("kernel_size")
        has_hw = p.HasField("kernel_h"), p.HasField("kernel_w")
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if has_size or any(has_hw):
                self.fail("with global_pooling: true, kernel_size / kernel_h / kernel_w cannot be given")
        elif has_size and any(has_hw):
            self.fail("kernel size is kernel_size OR kernel_h and kernel_w, not both")
        elif not has_size and not all(has_hw):
            self.fail("needs kernel_size, or both kernel_h and kernel_w (or global_pooling)")
        if p.HasField("pad") and (p.HasField("pad_h") or p.HasField("pad_w")):
            self.fail("pad is pad OR pad_h and pad_w, not both")
        if p.HasField("pad_h") != p.HasField("pad_w"):
            self.fail("pad_h and pad_w must be given together")
        if p.HasField("stride") and (p.HasField("stride_h") or p.HasField("stride_w")):
            self.fail("stride is stride OR stride_h and stride_w, not both")
        if p.HasField("stride_h") != p.HasField("stride_w"):
            self.fail("stride_h and stride_w must be given together")

        if not self.global_pooling:
            self.kernel_h, self.kernel_w = ((p.kernel_size, p.kernel_size) if has_size
                                            else (p.kernel_h, p.kernel_w))
            if self.kernel_h <= 0 or self.kernel_w <= 0:
                self.fail(f"kernel size must be positive, got {self.kernel_h}x{self.kernel_w}")
        self.pad_h, self.pad_w = ((p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad))
        self.stride_h, self.stride_w = ((p.stride_h, p.stride_w) if p.HasField("stride_h")
                                        else (p.stride, p.stride))
        if self.stride_h <= 0 or self.stride_w <= 0:
            self.fail(f"stride must be positive, got {self.stride_h}x{self.stride_w}")
        if self.global_pooling:
            if self.pad_h or self.pad_w or self.stride_h != 1 or self.stride_w != 1:
                self.fail("with global_pooling: true, only pad 0 and stride 1 are allowed")
        elif self.pad_h >= self.kernel_h or self.pad_w >= self.kernel_w:
            self.fail(f"pad must be less than kernel, got pad {self.pad_h}x{self.pad_w} "
                      f"for kernel {self.kernel_h}x{self.kernel_w}")
        self.floor = p.round_mode == FLOOR
        self._columns: dict = {}

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            self.fail(f"input must have 4 axes (num, channels, height, width), got shape "
                      f"{list(bottom[0].shape)}")
        if top[0] is bottom[0]:
            self.fail("cannot run in place (top is bottom)")
        n, c, h, w = bottom[0].shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = h, w
        self.pooled_h = pooled_size(h, self.kernel_h, self.stride_h, self.pad_h, self.floor)
        self.pooled_w = pooled_size(w, self.kernel_w, self.stride_w, self.pad_w, self.floor)
        if self.pooled_h <= 0 or self.pooled_w <= 0:
            self.fail(f"kernel {self.kernel_h}x{self.kernel_w} with pad {self.pad_h}x{self.pad_w} does "
                      f"not fit the input of shape {list(bottom[0].shape)}")
        shape = (n, c, self.pooled_h, self.pooled_w)
        for blob in top:
            blob.reshape(shape)
        key = (w, self.kernel_w, self.stride_w, self.pad_w, self.pooled_w)
        if self.method == AVE and self._columns.get("key") != key:  # only AVE's backward gathers
            start, end = covering_columns(*key)
            self._columns = {"key": key, "host": (start, end), "cover": int((end - start).max())}

    def _covering_columns(self):
        """The per-column tables in the current mode's array module (copied to the GPU once)."""
        mode = backend.mode()
        if mode not in self._columns:
            xp = backend.xp()
            self._columns[mode] = tuple(xp.asarray(a) for a in self._columns["host"])
        return self._columns[mode]

    def _disjoint_steps(self) -> tuple[int, int]:
        """(rows, columns) between output cells whose windows share no input pixel: 1 on an axis where
        kernel <= stride (or there is one window), else the fewest steps that span a kernel."""
        return tuple(1 if kernel <= stride or pooled == 1 else -(-kernel // stride)
                     for kernel, stride, pooled in ((self.kernel_h, self.stride_h, self.pooled_h),
                                                    (self.kernel_w, self.stride_w, self.pooled_w)))

    def _gathers_2x2(self) -> bool:
        """MAX backward by pool_max_backward_2x2: windows two columns wide that tile the image (kernel ==
        stride, 2 along the rows, no padding), on rows of at least GATHER_2X2_MIN_CELLS output cells."""
        return (self.kernel_w == self.stride_w == 2 and self.kernel_h == self.stride_h
                and self.pad_h == 0 and self.pad_w == 0 and self.pooled_w >= GATHER_2X2_MIN_CELLS)

    def _argmax(self, shape):
        """MAX: each window's argmax (forward writes it, backward reads it)."""
        return self.buffer("argmax", shape, np.int32)

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        n, c, h, w = x.shape
        planes = n * c * self.pooled_h
        geometry = (self.pooled_h, self.pooled_w, h, w, self.kernel_h, self.kernel_w,
                    self.stride_h, self.stride_w, self.pad_h, self.pad_w)
        y = top[0].mutable_data()
        work = y.size * self.kernel_h * self.kernel_w  # each output reads its window
        if self.method == AVE:
            KERNELS.pool_ave_forward(planes, *geometry, x, y, extents=(planes, self.pooled_w), work=work)
            return
        mask = self._argmax(y.shape)
        KERNELS.pool_max_forward(planes, *geometry, x, y, mask, extents=(planes, self.pooled_w), work=work)
        if len(top) > 1:
            top[1].mutable_data()[...] = mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        n, c, h, w = bottom[0].shape
        dy = top[0].get_diff()
        dx = bottom[0].mutable_diff()
        if self.method == AVE:
            planes = n * c * h
            col_start, col_end = self._covering_columns()
            cover = self._columns["cover"]
            work = dx.size * cover * -(-self.kernel_h // self.stride_h)  # the covering cells of each input
            KERNELS.pool_ave_backward(planes, self.pooled_h, self.pooled_w, h, w, self.kernel_h,
                                      self.kernel_w, self.stride_h, self.stride_w, self.pad_h,
                                      self.pad_w, cover, col_start, col_end, dy, dx, extents=(planes, w),
                                      work=work)
            return
        argmax = self._argmax(dy.shape)
        if self._gathers_2x2():  # a gather writes dx in one pass
            KERNELS.pool_max_backward_2x2(n * c * h, self.pooled_h, self.pooled_w, h, w, self.stride_h, dy,
                                          argmax, dx, extents=(n * c * h, self.pooled_w))
            return
        # MAX: a scatter through the argmax, one launch per class of windows that share no pixel.
        dx.fill(0)
        steps = self._disjoint_steps()
        for first_ph in range(min(steps[0], self.pooled_h)):
            for first_pw in range(min(steps[1], self.pooled_w)):
                rows = -(-(self.pooled_h - first_ph) // steps[0])
                cols = -(-(self.pooled_w - first_pw) // steps[1])
                KERNELS.pool_max_backward(n * c * rows, rows, cols, first_ph, first_pw, *steps, self.pooled_h,
                                          self.pooled_w, h, w, dy, argmax, dx, extents=(n * c * rows, cols))
