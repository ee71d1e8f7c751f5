"""Convolution (Caffe's ConvolutionLayer): im2col kernels (kernels/convolution.cu) + GEMM.

Forward, per chunk of images: col = im2col(x) with rows (c, ki, kj) and columns (n, oh, ow), then
one GEMM per group, y = W_g @ col_g, over the whole chunk at once rather than one per image (see the
layer's docstring for why); the chunk size only bounds the column buffer.
Backward: dW_g += dy_g @ col_g^T (col recomputed, as Caffe does; added in place by BLAS with beta = 1,
minicaffe/blas.py), dcol_g = W_g^T @ dy_g then col2im. The GEMMs write into reused buffers.
A 1x1 stride-1 unpadded convolution skips im2col: the input is its own column matrix (as in Caffe),
one GEMM per image and group. A depthwise convolution (group == channels == num_output) runs the direct
depthwise_* kernels instead of one 1-row GEMM per channel.

The geometry helpers (conv_geometry, im2col, col2im) read a ConvolutionParameter the way Caffe does
and are usable by other layers that take one (e.g. Deconvolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import backend
from ..blas import gemm_accumulate
from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("convolution.cu")

# Upper bound (elements) of the im2col buffer; a batch whose columns need more is done in chunks of
# images. 2**24 elements is 64 MiB in float32.
COL_BUFFER_LIMIT = 1 << 24


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, pad, stride and dilation of a 2-d convolution, as (h, w) pairs."""

    kernel: tuple[int, int]
    pad: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Caffe's (in + 2 * pad - (dilation * (k - 1) + 1)) / stride + 1, floored; <= 0 if none fits."""
        sizes = []
        for size, k, p, s, d in zip((height, width), self.kernel, self.pad, self.stride, self.dilation):
            extent = d * (k - 1) + 1
            sizes.append((size + 2 * p - extent) // s + 1)
        return sizes[0], sizes[1]

    def kernel_args(self) -> tuple[int, ...]:
        return (*self.kernel, *self.pad, *self.stride, *self.dilation)


def conv_geometry(param, num_spatial_axes: int, fail: Callable[[str], None]) -> ConvGeometry:
    """Read kernel/pad/stride/dilation from a caffe.ConvolutionParameter (Caffe's LayerSetUp rules).

    Each repeated field holds one value for every spatial axis or one per axis; kernel_h/kernel_w,
    pad_h/pad_w and stride_h/stride_w are the 2-d alternatives and exclude the repeated form.
    """
    if num_spatial_axes != 2:
        fail(f"only 2 spatial axes (N, C, H, W) are supported, the input has {num_spatial_axes}")

    def pair(name: str, repeated, h_field: str, w_field: str, default: int) -> tuple[int, int]:
        has_hw = h_field and (param.HasField(h_field) or param.HasField(w_field))
        if has_hw:
            if len(repeated):
                fail(f"give either {name} or {h_field}/{w_field}, not both")
            return getattr(param, h_field), getattr(param, w_field)
        if len(repeated) == 0:
            return default, default
        if len(repeated) == 1:
            return repeated[0], repeated[0]
        if len(repeated) != 2:
            fail(f"{name} has {len(repeated)} values; give 1, or 1 per spatial axis (2)")
        return repeated[0], repeated[1]

    if not param.HasField("kernel_h") and not param.HasField("kernel_w") and not len(param.kernel_size):
        fail("kernel_size (or kernel_h and kernel_w) is required")
    kernel = pair("kernel_size", param.kernel_size, "kernel_h", "kernel_w", 0)
    pad = pair("pad", param.pad, "pad_h", "pad_w", 0)
    stride = pair("stride", param.stride, "stride_h", "stride_w", 1)
    dilation = pair("dilation", param.dilation, "", "", 1)
    if min(kernel) <= 0:
        fail(f"kernel dimensions must be nonzero, got {list(kernel)}")
    if min(stride) <= 0:
        fail(f"stride must be nonzero, got {list(stride)}")
    if min(dilation) <= 0:
        fail(f"dilation must be nonzero, got {list(dilation)}")
    return ConvGeometry(kernel, pad, stride, dilation)


def im2col(x, col, geometry: ConvGeometry, out_size: tuple[int, int], *, images_outer: bool = False) -> None:
    """x (num, C, H, W) -> col. Layout (C*kh*kw, num, oh*ow), or (num, C*kh*kw, oh*ow) if images_outer."""
    num, channels, height, width = x.shape
    row_stride, image_stride = _col_strides(x.shape, geometry, out_size, images_outer)
    planes = num * channels * geometry.kernel[0] * geometry.kernel[1]
    KERNELS.im2col(planes, x, col, channels, height, width, *geometry.kernel_args(), *out_size,
                   row_stride, image_stride, extents=(planes, out_size[1]))


def col2im(col, x, geometry: ConvGeometry, out_size: tuple[int, int], *, images_outer: bool = False) -> None:
    """The adjoint of im2col: x (num, C, H, W) = sum of the columns at the pixels they came from.

    Writes x (zeroes it first). One kernel launch per kernel column offset keeps the GPU race-free
    (see col2im_add in kernels/convolution.cu)."""
    num, channels, height, width = x.shape
    row_stride, image_stride = _col_strides(x.shape, geometry, out_size, images_outer)
    x.fill(0)
    planes = num * channels
    for kj in range(geometry.kernel[1]):
        KERNELS.col2im_add(planes, col, x, channels, height, width, *geometry.kernel_args(), *out_size,
                           row_stride, image_stride, kj, extents=(planes, out_size[1]))


def _col_strides(x_shape, geometry: ConvGeometry, out_size, images_outer: bool) -> tuple[int, int]:
    num, channels = x_shape[0], x_shape[1]
    positions = out_size[0] * out_size[1]
    rows = channels * geometry.kernel[0] * geometry.kernel[1]
    return (positions, rows * positions) if images_outer else (num * positions, positions)


@register("Convolution")
class ConvolutionLayer(Layer):
    """Caffe's Convolution: y[n, m] = sum_c W[m, c] * x[n, c] (+ b[m]), with groups.

    Each bottom/top pair is convolved with the same weights, as in Caffe. Axes before `axis` are
    batch axes; exactly two spatial axes must follow the channel axis.

    Why one GEMM per chunk of images rather than one per image: measured on LeNet's conv2 (64x20x12x12
    -> 50 outputs, 5x5, float32) on a 2-core CPU, forward+backward took about 10 ms batched against
    11 ms per image (numpy stacked matmul) with two BLAS threads, as large GEMMs parallelize better;
    with one BLAS thread both took about 13 ms (the weight gradient, one GEMM over all images when
    batched, made up for the transposes). The column buffer is bounded by COL_BUFFER_LIMIT.
    """

    min_num_bottom = 1
    min_num_top = 1
    equal_num_bottom_top = True

    def layer_setup(self, bottom, top):
        param = self.param.convolution_param
        try:
            self.channel_axis = bottom[0].canonical_axis(param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.num_axes = bottom[0].num_axes
        self.geometry = conv_geometry(param, self.num_axes - self.channel_axis - 1, self.fail)
        self.channels = bottom[0].shape[self.channel_axis]
        self.num_output = param.num_output
        self.group = param.group
        self.bias_term = param.bias_term
        if self.num_output <= 0:
            self.fail("num_output must be given and positive")
        if self.group <= 0:
            self.fail(f"group must be positive, got {self.group}")
        if self.channels % self.group:
            self.fail(f"input channels ({self.channels}, bottom shape {list(bottom[0].shape)}) "
                      f"must be a multiple of group ({self.group})")
        if self.num_output % self.group:
            self.fail(f"num_output ({self.num_output}) must be a multiple of group ({self.group})")

        # The top must fit before the weights are made and filled: a kernel larger than the padded input
        # fails here, so does a top too large for the memory (pad 4294967295 asks for 2^67 values).
        shape, g = bottom[0].shape, self.geometry
        top_shape = (*shape[:self.channel_axis], self.num_output, *self._output_size(shape))
        self.check_memory(f"top (bottom shape {list(shape)}, kernel {list(g.kernel)}, pad {list(g.pad)}, "
                          f"stride {list(g.stride)}, dilation {list(g.dilation)})", top_shape,
                          math.prod(top_shape) * self.dtype.itemsize)
        kh, kw = self.geometry.kernel
        weight_shape = (self.num_output, self.channels // self.group, kh, kw)
        shapes = [weight_shape] + ([(self.num_output,)] if self.bias_term else [])
        self.setup_params(shapes, [param.weight_filler, param.bias_filler])

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.num_axes:
            self.fail(f"bottom number of axes may not change: was {self.num_axes}, now shape {list(shape)}")
        if shape[self.channel_axis] != self.channels:
            self.fail(f"input channels changed from {self.channels} to {shape[self.channel_axis]} "
                      f"(bottom shape {list(shape)}); the weights do not fit")
        for i, (b, t) in enumerate(zip(bottom, top)):
            if b.shape != shape:
                self.fail(f"all bottoms must have the same shape: bottom 0 is {list(shape)}, "
                          f"bottom {i} is {list(b.shape)}")
            if t is b:
                self.fail("cannot run in place (top and bottom are the same blob)")
        self.height, self.width = shape[-2:]
        self.out_size = self._output_size(shape)
        self.num = bottom[0].count_range(0, self.channel_axis)
        # Images per GEMM: the whole batch unless its column buffer would exceed COL_BUFFER_LIMIT.
        col_per_image = self.channels * self.geometry.kernel[0] * self.geometry.kernel[1] * \
            self.out_size[0] * self.out_size[1]
        self.chunk_images = max(1, min(self.num, COL_BUFFER_LIMIT // col_per_image))
        top_shape = (*shape[:self.channel_axis], self.num_output, *self.out_size)
        for t in top:
            t.reshape(top_shape)

    # -- helpers -----------------------------------------------------------------------------
    def _output_size(self, shape) -> tuple[int, int]:
        """(oh, ow) for a bottom of `shape`; fails when the kernel is larger than the padded input."""
        out_size = self.geometry.output_size(*shape[-2:])
        if min(out_size) <= 0:
            g = self.geometry
            self.fail(f"kernel {list(g.kernel)} (dilation {list(g.dilation)}) is larger than the padded "
                      f"input: bottom shape {list(shape)}, pad {list(g.pad)}, stride {list(g.stride)}")
        return out_size

    def _chunks(self) -> Iterator[tuple[int, int]]:
        """(first image, number of images) chunks of at most self.chunk_images images."""
        for start in range(0, self.num, self.chunk_images):
            yield start, min(self.chunk_images, self.num - start)

    def _columns(self, x):
        """im2col of the images x (nb, C, H, W), as (group, K/group, nb * positions)."""
        col = self._column_buffer(x.shape[0])
        im2col(x, col, self.geometry, self.out_size)
        return col

    def _column_buffer(self, count: int):
        """The column buffer for `count` images, as (group, K/group, count * positions)."""
        positions = self.out_size[0] * self.out_size[1]
        rows = self.channels * self.geometry.kernel[0] * self.geometry.kernel[1]
        col = self.buffer("columns", (rows * self.chunk_images * positions,))
        return col[:rows * count * positions].reshape(self.group, rows // self.group, count * positions)

    def _top_columns(self, count: int):
        """Scratch for a top (or top diff) chunk in the GEMM's layout (group, M/group, count * positions)."""
        positions = self.out_size[0] * self.out_size[1]
        buffer = self.buffer("top_columns", (self.num_output * self.chunk_images * positions,))
        return buffer[:self.num_output * count * positions].reshape(
            self.group, self.num_output // self.group, count * positions)

    def _images(self, array):
        """A bottom's data or diff as (num, C, H, W): the batch axes before `axis` flattened."""
        return array.reshape(self.num, self.channels, self.height, self.width)

    def _weights(self):
        return self.blobs[0].get_data().reshape(self.group, self.num_output // self.group, -1)

    def _is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: the input is its own column buffer, as in Caffe."""
        g = self.geometry
        return g.kernel == (1, 1) and g.stride == (1, 1) and g.pad == (0, 0)

    def _is_depthwise(self) -> bool:
        """One input and one output channel per group: the direct depthwise kernels, no GEMM."""
        return self.group == self.channels == self.num_output

    def _grouped(self, array, channels: int):
        """(num, channels, ...) data as (num, group, channels/group, positions), a view."""
        return array.reshape(self.num, self.group, channels // self.group, -1)

    # -- forward / backward ------------------------------------------------------------------
    def forward(self, bottom, top):
        xp = backend.xp()
        weights = self._weights()
        bias = self.blobs[1].get_data()[:, None] if self.bias_term else None
        positions = self.out_size[0] * self.out_size[1]
        for b, t in zip(bottom, top):
            if self._is_depthwise():
                self._forward_depthwise(b, t)
                continue
            if self._is_pointwise():  # y[n, g] = W_g @ x[n, g], one GEMM per image and group
                y = t.mutable_data()
                xp.matmul(weights, self._grouped(b.get_data(), self.channels),
                          out=self._grouped(y, self.num_output))
                if bias is not None:
                    y = y.reshape(self.num, self.num_output, positions)
                    y += bias
                continue
            x = self._images(b.get_data())
            y = t.mutable_data().reshape(self.num, self.num_output, positions)
            for start, count in self._chunks():
                col = self._columns(x[start:start + count])
                out = self._top_columns(count)
                xp.matmul(weights, col, out=out)
                out = out.reshape(self.num_output, count, positions).transpose(1, 0, 2)
                chunk = y[start:start + count]
                if bias is None:
                    chunk[...] = out
                else:  # bias added in the same pass as the copy out of the GEMM's layout
                    xp.add(out, bias, out=chunk)

    def backward(self, top, propagate_down, bottom):
        xp = backend.xp()
        weight_grad = self.param_propagate_down[0]
        bias_grad = self.bias_term and self.param_propagate_down[1]
        weights = self._weights()
        # The weight gradient is added in place by BLAS (beta = 1): no weight-sized temporary.
        weight_diff = self.blobs[0].mutable_diff().reshape(weights.shape) if weight_grad else None
        positions = self.out_size[0] * self.out_size[1]
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = t.get_diff().reshape(self.num, self.num_output, positions)
            if bias_grad:
                self.blobs[1].mutable_diff()[...] += dy.sum(axis=(0, 2))
            if not (weight_grad or propagate_down[i]):
                continue
            if self._is_depthwise():
                self._backward_depthwise(t.get_diff(), b, weight_grad, propagate_down[i])
                continue
            if self._is_pointwise():
                self._backward_pointwise(dy, b, weight_diff, propagate_down[i])
                continue
            x = self._images(b.get_data())
            dx = self._images(b.mutable_diff()) if propagate_down[i] else None
            for start, count in self._chunks():
                # dy of the chunk as (group, M / group, count * positions), matching the columns.
                dy_chunk = self._top_columns(count)
                dy_chunk.reshape(self.num_output, count, positions)[...] = \
                    dy[start:start + count].transpose(1, 0, 2)
                if weight_grad:
                    col = self._columns(x[start:start + count])
                    for g in range(self.group):
                        gemm_accumulate(dy_chunk[g], col[g].T, weight_diff[g])
                if dx is not None:  # the column buffer is free again: it takes dcol
                    dcol = self._column_buffer(count)  # (group, K / group, count * positions)
                    xp.matmul(weights.transpose(0, 2, 1), dy_chunk, out=dcol)
                    col2im(dcol, dx[start:start + count], self.geometry, self.out_size)

    def _backward_pointwise(self, dy, bottom, weight_diff, propagate) -> None:
        """Backward of a 1x1 stride-1 unpadded convolution: the input is the column buffer."""
        dy = self._grouped(dy, self.num_output)
        if weight_diff is not None:
            x = self._grouped(bottom.get_data(), self.channels)
            for n in range(self.num):
                for g in range(self.group):
                    gemm_accumulate(dy[n, g], x[n, g].T, weight_diff[g])
        if propagate:
            backend.xp().matmul(self._weights().transpose(0, 2, 1), dy,
                                out=self._grouped(bottom.mutable_diff(), self.channels))

    # -- depthwise (kernels/convolution.cu, depthwise_*) ---------------------------------------
    def _depthwise_args(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width, *self.geometry.kernel_args(), *self.out_size)

    def _forward_depthwise(self, bottom, top) -> None:
        planes = self.num * self.channels
        weights = self.blobs[0].get_data()
        bias = self.blobs[1].get_data() if self.bias_term else weights  # not read without a bias
        KERNELS.depthwise_forward(planes, bottom.get_data(), weights, bias, int(self.bias_term),
                                  top.mutable_data(), *self._depthwise_args(),
                                  extents=(planes, self.out_size[1]))

    def _backward_depthwise(self, dy, bottom, weight_grad: bool, propagate: bool) -> None:
        planes = self.num * self.channels
        out_w = self.out_size[1]
        kh, kw = self.geometry.kernel
        if weight_grad:  # per-plane partial sums, then one fixed-order sum per weight
            weights = self.channels * kh * kw
            terms = self.buffer("weight_terms", (self.num * weights * out_w,))
            KERNELS.depthwise_weight_terms(planes * kh * kw, dy, bottom.get_data(), terms,
                                           *self._depthwise_args(), extents=(planes * kh * kw, out_w))
            KERNELS.depthwise_weight_sum(1, terms, self.blobs[0].mutable_diff(), weights, self.num, out_w,
                                         extents=(1, weights))
        if propagate:
            dx = bottom.mutable_diff()
            dx.fill(0)
            for kj in range(kw):  # one launch per kernel column offset keeps the GPU race-free
                KERNELS.depthwise_backward_data_add(planes, dy, self.blobs[0].get_data(), dx,
                                                    *self._depthwise_args(), kj, extents=(planes, out_w))
