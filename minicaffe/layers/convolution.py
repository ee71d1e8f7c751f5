"""Convolution (Caffe's ConvolutionLayer): im2col kernels (kernels/convolution.cu) + GEMM.

Forward, per chunk of images: col = im2col(x) with rows (c, ki, kj) and columns (n, oh, ow), then one
GEMM per group, y = W_g @ col_g, over the chunk's images at once.
Backward: dW_g += (col_g @ dy_g^T)^T (col recomputed, as Caffe does; summed by BLAS with beta = 1 into
reused buffers, minicaffe/blas.py), dcol_g = W_g^T @ dy_g then col2im.
On the CPU the batch is cut into one contiguous range of images per thread, each range worked through
in cache-sized chunks (COL_CACHE_LIMIT) with the thread's own buffers, its kernel launches and GEMMs
single-threaded; on the GPU a chunk is the whole batch (up to COL_BUFFER_LIMIT). See the layer's
docstring for why.
A 1x1 stride-1 unpadded convolution skips im2col: the input is its own column matrix (as in Caffe),
one GEMM per image and group. A depthwise convolution (group == channels == num_output) runs the direct
depthwise_* kernels instead of one 1-row GEMM per channel (at stride 1 with the output the input's size,
e.g. 3x3 pad 1, the depthwise_same_* ones, which read the blobs as they are). A 3x3 stride-1
convolution with wide enough GEMMs runs Winograd F(4x4, 3x3) (the winograd_* kernels, 36 GEMMs of a
quarter of the multiplications; ConvolutionLayer._is_winograd), unless engine: CAFFE asks for Caffe's
own im2col + GEMM. Its float32 results differ from im2col's by rounding (a few 1e-6 of the largest output).

The geometry helpers (conv_geometry, im2col, col2im) read a ConvolutionParameter the way Caffe does
and are usable by other layers that take one (e.g. Deconvolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import backend, threads
from ..blas import PARALLEL_MIN_FLOPS, gemm_accumulate, matmul
from ..kernel import KernelFile, data_address, run_parts
from ..layer import Layer, register
from ..proto import caffe_pb2
from .broadcast import KERNELS as BROADCAST
from .concat import copy_block
from .eltwise import KERNELS as ELTWISE
from .reduce import channel_sums, channel_sums_of

KERNELS = KernelFile("convolution.cu")

# Output positions (images x out_h x out_w) per thread below which the weight gradient is not summed per
# thread (see ConvolutionLayer._weight_gemm).
WEIGHT_PARTS_MIN_POSITIONS = 1024
# Upper bound (elements) of the im2col buffer; a batch whose columns need more is done in chunks of
# images. 2**24 elements is 64 MiB in float32.
COL_BUFFER_LIMIT = 1 << 24
# On the CPU, chunks of images whose column buffer fits this (elements; 2**18 is 1 MiB in float32, a
# Zen 4 core's L2): im2col writes it and the GEMMs read it while it is still in the caches. Measured on
# LeNet's conv1 and conv2 forward (batch 64, one thread): chunks of 2**17 to 2**19 elements took
# 0.7-0.9x the time of chunks of 2**16, the whole batch (2**20) 0.9-1.1x: fewer, larger GEMMs gain
# until the buffer leaves the L2, and the L3 is shared by the cores.
COL_CACHE_LIMIT = 1 << 18
# engine: CAFFE: the user asks for Caffe's own im2col + GEMM, never Winograd.
CAFFE_ENGINE = caffe_pb2.ConvolutionParameter.CAFFE
# Where Winograd F(4x4, 3x3) is used (ConvolutionLayer._is_winograd), from forward + backward times
# (ms, float32, 2 cores) against im2col + GEMM. Layer by layer it paid with the input and output channels
# >= 32, at least 12 tiles per image, and at most 1.35x the outputs computed (tiles cut by the edges
# compute the rest and drop it): 8x32x32x32 -> 32: 3.1 (6.0); 64x56x56: 3.2 (6.0); 128x28x28: 3.0 (4.7);
# 32x27x27 -> 128: 1.6 (1.7). It lost at 13x13 (16 tiles, 1.51x): 64 -> 256: 2.2 (1.6), 48 -> 192: 1.4
# (1.1), 256 -> 384: 6.2 (6.0); at 7x7 (4 tiles per image) with 512 channels, batch 1: 18 (5.7), batch
# 4: 23 (20); and with 20 input channels (64x20x12x12 -> 50, pad 0): 4.6 (4.1).
# In a net the 36 filter matrices (4x the weights, written and read in every pass) come from memory,
# not from the caches a layer timed alone keeps them in: SphereFace-20's eight 256-channel 14x12 layers
# (batch 1, 12 tiles) took 57-65 ms with Winograd and 44-45 ms without, where alone they had gained
# (3.7 against 4.3 ms). ResNet-50's 64- and 128-channel stages gained in the net (27-28 against 33-38 ms,
# 36-37 against 47 ms). So the filter matrices must also be at most WINOGRAD_MAX_FILTER_SHARE times the
# batch's tile matrices: out * in <= 2 * (in + out) * tiles (128x28x28: 1.3x; 256x14x14 at batch 1: 8x).
# The limit was 4 until SqueezeNet-1.1 at batch 1, whose four 14x14 expand3x3 layers (48 -> 192: 2.4x,
# 64 -> 256: 3.2x) it let through: the net ran in 42.4-44.0 ms without Winograd there and 48.9-51.4 ms
# with (alternating in one process).
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_TILES_PER_IMAGE = 12
WINOGRAD_MAX_WASTE = 1.35
WINOGRAD_MAX_FILTER_SHARE = 2
# "measured": the rule above; "always" (every 3x3 stride-1 convolution that Winograd can do) or "never":
# for tests and A/B measurements.
WINOGRAD_CHOICE = "measured"
# Upper bound (elements) of each Winograd buffer (36 x channels x tiles); a batch that needs more is
# done in chunks of images. 2**20 elements is 4 MiB in float32: a layer keeps three such buffers.
WINOGRAD_BUFFER_LIMIT = 1 << 20


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

    def transposed_output_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size whose convolution output is (height, width), as Caffe's Deconvolution sizes its
        top: stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad; <= 0 if none fits."""
        sizes = []
        for size, k, p, s, d in zip((height, width), self.kernel, self.pad, self.stride, self.dilation):
            sizes.append(s * (size - 1) + d * (k - 1) + 1 - 2 * p)
        return sizes[0], sizes[1]

    def kernel_args(self) -> tuple[int, ...]:
        return (*self.kernel, *self.pad, *self.stride, *self.dilation)


def axis_and_geometry(layer: Layer, bottom) -> tuple[int, ConvGeometry]:
    """The channel axis (convolution_param.axis) and the geometry of a layer that takes a
    ConvolutionParameter, for its bottom blob."""
    param = layer.param.convolution_param
    try:
        channel_axis = bottom.canonical_axis(param.axis)
    except ValueError as error:
        layer.fail(str(error))
    return channel_axis, conv_geometry(param, bottom.num_axes - channel_axis - 1, layer.fail)


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
                   row_stride, image_stride, extents=(planes, out_size[1]),
                   work=planes * out_size[0] * out_size[1])  # each plane loops over the output rows


def col2im(col, x, geometry: ConvGeometry, out_size: tuple[int, int], *, images_outer: bool = False) -> None:
    """The adjoint of im2col: x (num, C, H, W) = sum of the columns at the pixels they came from.

    Writes x. With stride_w 1, one launch that gathers each pixel's terms (col2im_gather in
    kernels/convolution.cu); else x is zeroed and col2im_add scatters the columns into it, one launch
    per kernel column offset, which keeps the GPU race-free."""
    num, channels, height, width = x.shape
    row_stride, image_stride = _col_strides(x.shape, geometry, out_size, images_outer)
    (kernel_h, kernel_w), (pad_h, pad_w), (stride_h, stride_w), (dilation_h, dilation_w) = \
        geometry.kernel, geometry.pad, geometry.stride, geometry.dilation
    if stride_w == 1:
        planes = num * channels * height
        KERNELS.col2im_gather(planes, col, x, channels, height, width, kernel_h, kernel_w, pad_h, pad_w,
                              stride_h, dilation_h, dilation_w, *out_size, row_stride, image_stride,
                              extents=(planes, width), work=planes * width * kernel_h * kernel_w)
        return
    x.fill(0)
    planes = num * channels
    for kj in range(geometry.kernel[1]):
        KERNELS.col2im_add(planes, col, x, channels, height, width, *geometry.kernel_args(), *out_size,
                           row_stride, image_stride, kj, extents=(planes, out_size[1]),
                           work=planes * kernel_h * out_size[0] * out_size[1])


def winograd_point_step(size: int) -> int:
    """Elements between the 36 matrices of `size` elements of a Winograd buffer. On the CPU: size rounded
    up to 16 (a 64-byte line in float32), plus 16 if that is an even number of lines. The distance is then
    an odd number of lines, so the kernels' 36 streams, one per matrix, go to different cache sets (see
    kernels/convolution.cu). On the GPU: size, so that each stack of matrices is contiguous (CuPy's
    matmul copies any other into a contiguous one first)."""
    if backend.on_gpu():
        return size
    step = -(-size // 16) * 16
    return step + 16 if (step // 16) % 2 == 0 else step


def _add_bias(out, bias) -> None:
    """out (num, channels, positions) += bias[channel], in place, on the kernel threads (broadcast.cu's
    broadcast_add_planes: numpy's broadcast add ran on one core)."""
    num, channels, positions = out.shape
    planes = num * channels
    BROADCAST.broadcast_add_planes(planes, positions, channels, out, bias, out, extents=(planes, positions))


@dataclass(frozen=True)
class WinogradPoints:
    """The 36 matrices of a Winograd buffer, one per point of the 6x6 transform, `step` elements apart
    (winograd_point_step): `matrices` (36, rows, columns), a view for the GEMMs, and `flat`, the
    contiguous array under it for the kernels."""

    matrices: object
    flat: object
    step: int


def _tile_grid(size: tuple[int, int]) -> tuple[int, int]:
    """(tiles_h, tiles_w): the 4x4 tiles (Winograd F(4x4, 3x3)) that cover an output of `size`."""
    return (size[0] + 3) // 4, (size[1] + 3) // 4


def _tile_count(size: tuple[int, int]) -> int:
    return math.prod(_tile_grid(size))


def _padded_size(tiles: tuple[int, int]) -> tuple[int, int]:
    """The zero-padded input that (tiles_h, tiles_w) 6x6 tiles at a step of 4 read (winograd_input)."""
    return 4 * tiles[0] + 2, 4 * tiles[1] + 2


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

    As Caffe's BaseConvolutionLayer, the class is written in terms of the convolution's two sides, so
    that Deconvolution (minicaffe/layers/deconvolution.py) reuses it with the sides swapped: the image
    side (conv_in_channels x height x width, what im2col reads) and the column side (conv_out_channels
    x out_size, what the GEMM gives). Here the bottom is the image side and the top the column side.
    Three primitives do the work: _forward_gemm (the convolution W * x), _backward_gemm (its adjoint,
    W^T * y by col2im) and _weight_gemm (the weight gradient).

    Why one range of images per thread on the CPU: with the whole batch in one GEMM (split by
    blas.matmul over the threads) the column buffer (9.4 MB for 8x32x32x32, 3x3) left the caches
    between im2col and the GEMM, and every kernel launch woke the OpenMP threads. Per thread and per
    chunk, im2col writes a buffer that the GEMMs read from the caches, a one-image chunk's GEMM writes
    straight into the top (its layout is (M, positions) already), and the threads are handed work once
    per pass. Measured on a 2-core Zen 4 shared with other jobs (float32, best of 3 runs of 30, one
    thread, whose numbers the load moved less): the kernel benchmark's 8x32x32x32 3x3 -> 32 forward
    4.1 -> 2.8 ms, backward 9.1 -> 6.1 ms; LeNet's conv1 (64x1x28x28 5x5 -> 20) forward 1.4 -> 1.1 ms;
    conv2 (64x20x12x12 5x5 -> 50) forward 4.1 -> 3.7 ms, backward 8.9 ms both. Most of what is left is
    the GEMMs (OpenBLAS, 45-90 GFLOP/s on one core for these shapes).
    """

    min_num_bottom = 1
    min_num_top = 1
    equal_num_bottom_top = True

    def layer_setup(self, bottom, top):
        param = self.param.convolution_param
        self.channel_axis, self.geometry = axis_and_geometry(self, bottom[0])
        self.num_axes = bottom[0].num_axes
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
        self.conv_in_channels, self.conv_out_channels = self._conv_channels()
        # (bottom index, data address) whose Winograd input transform forward left in its buffer
        self._winograd_inputs_of: tuple[int, int] | None = None
        # the depthwise_same kernels' column table and the (array module, height, width) it was made for
        self._column_table_array, self._column_table_of = None, None

        # The top must fit before the weights are made and filled: a kernel larger than the padded input
        # fails here, so does a top too large for the memory (pad 4294967295 asks for 2^67 values).
        shape, g = bottom[0].shape, self.geometry
        top_shape = (*shape[:self.channel_axis], self.num_output, *self._top_size(shape))
        self.check_memory(f"top (bottom shape {list(shape)}, kernel {list(g.kernel)}, pad {list(g.pad)}, "
                          f"stride {list(g.stride)}, dilation {list(g.dilation)})", top_shape,
                          math.prod(top_shape) * self.dtype.itemsize)
        kh, kw = self.geometry.kernel
        weight_shape = (self.conv_out_channels, self.conv_in_channels // self.group, kh, kw)
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
        top_size = self._top_size(shape)
        (self.height, self.width), self.out_size = self._image_and_column_sizes(shape[-2:], top_size)
        self.num = bottom[0].count_range(0, self.channel_axis)
        top_shape = (*shape[:self.channel_axis], self.num_output, *top_size)
        for t in top:
            t.reshape(top_shape)

    # -- the two sides (overridden by Deconvolution) ------------------------------------------
    def _conv_channels(self) -> tuple[int, int]:
        """(conv_in_channels, conv_out_channels): the image side's channels and the column side's."""
        return self.channels, self.num_output

    def _top_size(self, shape) -> tuple[int, int]:
        """(oh, ow) for a bottom of `shape`; fails when the kernel is larger than the padded input."""
        out_size = self.geometry.output_size(*shape[-2:])
        if min(out_size) <= 0:
            g = self.geometry
            self.fail(f"kernel {list(g.kernel)} (dilation {list(g.dilation)}) is larger than the padded "
                      f"input: bottom shape {list(shape)}, pad {list(g.pad)}, stride {list(g.stride)}")
        return out_size

    def _image_and_column_sizes(self, bottom_size, top_size):
        """The spatial sizes (image side, column side): the bottom is the image here."""
        return tuple(bottom_size), tuple(top_size)

    # -- helpers -----------------------------------------------------------------------------
    def _column_rows(self) -> int:
        """Rows of the column buffer: one per (input channel, kernel row, kernel column)."""
        return self.conv_in_channels * self.geometry.kernel[0] * self.geometry.kernel[1]

    def _chunk_images(self) -> int:
        """Images per GEMM: on the CPU as many as keep the column buffer in a core's L2 cache
        (COL_CACHE_LIMIT), on the GPU the whole batch, in both at most COL_BUFFER_LIMIT elements."""
        per_image = self._column_rows() * self.out_size[0] * self.out_size[1]
        limit = COL_BUFFER_LIMIT if backend.on_gpu() else min(COL_BUFFER_LIMIT, COL_CACHE_LIMIT)
        return max(1, min(self.num, limit // per_image))

    def _parts(self) -> int:
        """Threads that share the batch, each a contiguous range of images: on the CPU the kernel
        threads when the GEMMs are large enough to repay the hand-off (blas.PARALLEL_MIN_FLOPS per
        part) and the parts' column buffers fit COL_BUFFER_LIMIT together (else one part, whose
        kernels and GEMMs use the threads themselves); on the GPU 1."""
        if backend.on_gpu():
            return 1
        rows = self._column_rows()
        positions = self.out_size[0] * self.out_size[1]
        flops = 2.0 * self.num * self.conv_out_channels * (rows // self.group) * positions
        buffers = COL_BUFFER_LIMIT // (rows * positions * self._chunk_images())
        return max(1, min(threads.kernel_threads(), self.num, int(flops // PARALLEL_MIN_FLOPS), buffers))

    def _chunks(self, first: int = 0, stop: int | None = None, size: int | None = None
                ) -> Iterator[tuple[int, int]]:
        """(first image, number of images) chunks of images [first, stop) of at most `size` images
        (default _chunk_images(), the im2col buffer's)."""
        stop = self.num if stop is None else stop
        size = size or self._chunk_images()
        for start in range(first, stop, size):
            yield start, min(size, stop - start)

    def _over_chunks(self, parts: int, work: Callable[[int, int, int], None]) -> None:
        """work(part, start, count) for every chunk of the batch, the images cut into `parts` contiguous
        ranges run at the same time (kernel.run_parts; a part's kernel launches and GEMMs run on its own
        thread), each range in chunks (_chunks) that reuse the part's buffers."""
        def run(part: int, _: int) -> None:
            for start, count in self._chunks(self.num * part // parts, self.num * (part + 1) // parts):
                work(part, start, count)

        run_parts(parts, parts, run)

    def _scratch(self, name: str, parts: int, channels: int):
        """Buffer `name`, one row per part, each for a chunk of `channels`-row columns; see _columns_of.
        Taken before the parts start (Layer.buffer is not for concurrent use)."""
        size = channels * self._chunk_images() * self.out_size[0] * self.out_size[1]
        return self.buffer(name, (parts * size,)).reshape(parts, size)

    def _columns_of(self, scratch, count: int, channels: int):
        """A part's row of a _scratch buffer as columns (group, channels/group, count * positions)."""
        positions = self.out_size[0] * self.out_size[1]
        return scratch[:channels * count * positions].reshape(self.group, channels // self.group,
                                                              count * positions)

    def _gemm_layout(self, chunk, scratch):
        """A column-side chunk (count, M, positions) in the GEMM's layout (group, M/group, count *
        positions): for one image the chunk itself, else copied into the part's `scratch` row."""
        count, channels, positions = chunk.shape
        if count == 1:
            return chunk.reshape(self.group, channels // self.group, positions)
        columns = self._columns_of(scratch, count, channels)
        columns.reshape(channels, count, positions)[...] = chunk.transpose(1, 0, 2)
        return columns

    def _images(self, array):
        """Image-side data or diff as (num, C, H, W): the batch axes before `axis` flattened."""
        return array.reshape(self.num, self.conv_in_channels, self.height, self.width)

    def _outputs(self, array):
        """Column-side data or diff as (num, M, positions)."""
        return array.reshape(self.num, self.conv_out_channels, self.out_size[0] * self.out_size[1])

    def _weights(self):
        return self.blobs[0].get_data().reshape(self.group, self.conv_out_channels // self.group, -1)

    def _is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: the input is its own column buffer, as in Caffe."""
        g = self.geometry
        return g.kernel == (1, 1) and g.stride == (1, 1) and g.pad == (0, 0)

    def _is_depthwise(self) -> bool:
        """One input and one output channel per group: the direct depthwise kernels, no GEMM."""
        return self.group == self.conv_in_channels == self.conv_out_channels

    def _is_depthwise_same(self) -> bool:
        """Depthwise, stride 1, and the output the input's size: the depthwise_same kernels, which read
        the planes as they are (no padded copy, no pitched output)."""
        return (self._is_depthwise() and self.geometry.stride == (1, 1)
                and tuple(self.out_size) == (self.height, self.width))

    def _grouped(self, array, channels: int):
        """(num, channels, ...) data as (num, group, channels/group, positions), a view."""
        return array.reshape(self.num, self.group, channels // self.group, -1)

    # -- forward / backward ------------------------------------------------------------------
    def forward(self, bottom, top):
        bias = self.blobs[1].get_data() if self.bias_term else None
        self._winograd_inputs_of = None
        for i, (b, t) in enumerate(zip(bottom, top)):
            images = self._images(b.get_data())
            self._forward_gemm(images, self._outputs(t.mutable_data()), bias)
            one_chunk = self._winograd_images_per_chunk(_tile_count(self.out_size)) >= self.num
            if self._is_winograd() and one_chunk:
                # the last pair's transformed input stays in its buffer for the weight gradient, as
                # pooling keeps its argmax: backward works from what forward saw
                self._winograd_inputs_of = (i, data_address(images))

    def backward(self, top, propagate_down, bottom):
        weight_grad = self.param_propagate_down[0]
        bias_grad = self.bias_term and self.param_propagate_down[1]
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self._outputs(t.get_diff())
            if bias_grad:
                channel_sums_of(self, dy.shape, dy, self.blobs[1].mutable_diff())  # fixed order, no temporary
            if weight_grad:
                images = self._images(b.get_data())
                kept = self._winograd_inputs_of == (i, data_address(images))
                if not kept:  # the buffer is about to hold this pair's transform instead
                    self._winograd_inputs_of = None
                self._weight_gemm(images, dy, winograd_inputs_kept=kept)
            if propagate_down[i]:
                self._backward_gemm(dy, self._images(b.mutable_diff()))

    # -- the three primitives, on (num, conv_in, H, W) images and (num, conv_out, positions) outputs ---
    def _forward_gemm(self, images, out, bias=None) -> None:
        """out = W * images (+ bias[m] per output channel), written: the convolution."""
        xp = backend.xp()
        if self._is_depthwise_same():
            self._depthwise_same(images, self.blobs[0].get_data(), bias, out)
            return
        if self._is_depthwise():
            phases, phase_size = self._phases(images)
            weights, stride = self.blobs[0].get_data(), self.geometry.stride
            self._depthwise("out", phases, phase_size, weights, bias, stride, self.out_size, out)
            return
        if self._is_winograd():
            self._winograd(images, (self.height, self.width), self.blobs[0].get_data(), 0, self.geometry.pad,
                           bias, out, self.out_size)
            return
        weights = self._weights()
        if self._is_pointwise():  # out[n, g] = W_g @ images[n, g], one GEMM per image and group
            matmul(weights, self._grouped(images, self.conv_in_channels),
                      out=self._grouped(out, self.conv_out_channels))
            if bias is not None:
                _add_bias(out, bias)
            return
        rows = self._column_rows()
        parts = self._parts()
        cols = self._scratch("columns", parts, rows)
        # Chunks of one image need no second buffer: their GEMM writes straight into out.
        results = self._scratch("output_columns", parts, self.conv_out_channels) \
            if self._chunk_images() > 1 else None

        def work(part: int, start: int, count: int) -> None:
            col = self._columns_of(cols[part], count, rows)
            im2col(images[start:start + count], col, self.geometry, self.out_size)
            chunk = out[start:start + count]
            if count == 1:  # out[start] (M, positions) is the GEMM's layout already
                matmul(weights, col, out=chunk.reshape(self.group, -1, chunk.shape[2]))
                if bias is not None:
                    _add_bias(chunk, bias)
                return
            result = self._columns_of(results[part], count, self.conv_out_channels)
            matmul(weights, col, out=result)
            result = result.reshape(self.conv_out_channels, count, -1).transpose(1, 0, 2)
            if bias is None:
                chunk[...] = result
            else:  # bias added in the same pass as the copy out of the GEMM's layout
                xp.add(result, bias[:, None], out=chunk)

        self._over_chunks(parts, work)

    def _backward_gemm(self, out_diff, images_diff) -> None:
        """images_diff = W^T * out_diff, written: the adjoint of the convolution (col2im)."""
        if self._is_depthwise_same():  # the same convolution with the taps flipped
            self._depthwise_same(out_diff, self._flipped_depthwise_weights(), None, images_diff)
            return
        if self._is_depthwise():
            # The adjoint is a stride-1 depthwise convolution with the taps flipped, over out_diff spread
            # onto the input's grid (zeros between the rows and columns of a stride > 1) and padded by the
            # kernel's extent less the padding: dx[h, w] = sum of flipped[ki, kj] * spread[h + ki d, w + kj d]
            # (at stride 1 the spread planes are their own single phase)
            g = self.geometry
            extent = [d * (k - 1) for k, d in zip(g.kernel, g.dilation)]
            spread_size = (self.height + extent[0], self.width + extent[1])
            spread = self._spread("depthwise_spread_diff", out_diff, self.out_size, spread_size,
                                  (extent[0] - g.pad[0], extent[1] - g.pad[1]), g.stride)
            image_size = (self.height, self.width)
            self._depthwise("diff", spread, spread_size, self._flipped_depthwise_weights(), None, (1, 1),
                            image_size, images_diff)
            return
        if self._is_winograd():  # the forward of out_diff padded by 2 - pad, filters flipped, sides swapped
            pad = tuple(2 - p for p in self.geometry.pad)
            self._winograd(out_diff, self.out_size, self.blobs[0].get_data(), 1, pad, None, images_diff,
                           (self.height, self.width))
            return
        weights_t = self._weights().transpose(0, 2, 1)
        if self._is_pointwise():
            matmul(weights_t, self._grouped(out_diff, self.conv_out_channels),
                      out=self._grouped(images_diff, self.conv_in_channels))
            return
        rows = self._column_rows()
        parts = self._parts()
        dcols = self._scratch("columns", parts, rows)
        copies = self._scratch("output_columns", parts, self.conv_out_channels)

        def work(part: int, start: int, count: int) -> None:
            columns = self._gemm_layout(out_diff[start:start + count], copies[part])
            dcol = self._columns_of(dcols[part], count, rows)
            matmul(weights_t, columns, out=dcol)
            col2im(dcol, images_diff[start:start + count], self.geometry, self.out_size)

        self._over_chunks(parts, work)

    def _weight_gemm(self, images, out_diff, winograd_inputs_kept: bool = False) -> None:
        """Weight diff += the gradient of <out_diff, W * images> in W, added in place (BLAS beta = 1, or
        the fixed-order depthwise sums): no weight-sized temporary. winograd_inputs_kept: the Winograd
        input transform of these images is still in its buffer from the forward pass."""
        weight_diff = self.blobs[0].mutable_diff()
        if self._is_depthwise_same():  # as below, reading the planes as they are
            g = self.geometry
            taps = self.conv_in_channels * g.kernel[0] * g.kernel[1]
            channel_sums(self, (self.num, taps, self.height * self.width),
                         KERNELS.depthwise_same_weight_partials,
                         (out_diff, images, self.height, self.width, *g.kernel, *g.pad, *g.dilation,
                          self._column_table()), weight_diff.reshape(-1))
            return
        if self._is_depthwise():  # per-plane partial sums, then one fixed-order sum per weight (reduce.py)
            g = self.geometry
            phases, phase_size = self._phases(images)
            out_h, out_w = self.out_size
            pitched = self._spread("depthwise_pitched_diff", out_diff, self.out_size,
                                   (out_h, phase_size[1]), (0, 0), (1, 1))  # zero in the columns >= out_w
            taps = self.conv_in_channels * g.kernel[0] * g.kernel[1]
            length = (out_h - 1) * phase_size[1] + out_w
            channel_sums(self, (self.num, taps, length), KERNELS.depthwise_weight_partials,
                         (pitched, phases, *phase_size, *g.kernel, *g.stride, *g.dilation, out_h),
                         weight_diff.reshape(-1))
            return
        if self._is_winograd():
            self._winograd_weight_diff(images, out_diff, weight_diff, winograd_inputs_kept)
            return
        weight_diff = weight_diff.reshape(self._weights().shape)
        if self._is_pointwise():
            dy = self._grouped(out_diff, self.conv_out_channels)
            x = self._grouped(images, self.conv_in_channels)
            for n in range(self.num):
                for g in range(self.group):
                    gemm_accumulate(dy[n, g], x[n, g].T, weight_diff[g])
            return
        # Each part sums its images' gradients transposed, (K/group, M/group) per group: on one core
        # (numpy's OpenBLAS) col @ dy^T ran at 74, 78 and 44 GFLOP/s where dy @ col^T ran at 45, 60 and
        # 35, for the kernel benchmark's one image and LeNet's conv2 and conv1 chunks. The parts' sums
        # are added in part order: the same bits on every run with the same thread count.
        # Those sums cost passes over weight-sized arrays (zeroing, the transposed add), which a large
        # weight with few output positions cannot repay (SphereFace's 512-channel 7x6 layers at batch 1:
        # 11 ms against 2.8 ms): with fewer than WEIGHT_PARTS_MIN_POSITIONS positions per part, one part
        # adds dy @ col^T straight into the diff (BLAS beta = 1), the product split by blas.py instead.
        rows = self._column_rows()
        parts = self._parts()
        positions = self.num * self.out_size[0] * self.out_size[1]
        cols = self._scratch("columns", parts, rows)  # as forward takes them: no new memory
        copies = self._scratch("output_columns", parts, self.conv_out_channels)
        per_part = parts > 1 and positions >= WEIGHT_PARTS_MIN_POSITIONS * parts
        if per_part:
            sums = self.buffer("weight_diff_parts", (parts, self.group, rows // self.group,
                                                     self.conv_out_channels // self.group))
            sums.fill(0)

        def work(part: int, start: int, count: int) -> None:
            columns = self._gemm_layout(out_diff[start:start + count], copies[part])
            col = self._columns_of(cols[part], count, rows)
            im2col(images[start:start + count], col, self.geometry, self.out_size)
            for g in range(self.group):
                if per_part:
                    gemm_accumulate(col[g], columns[g].T, sums[part, g])
                else:
                    gemm_accumulate(columns[g], col[g].T, weight_diff[g])

        self._over_chunks(parts if per_part else 1, work)
        if per_part:
            for part in range(parts):
                weight_diff += sums[part].transpose(0, 2, 1)

    # -- Winograd F(4x4, 3x3) (kernels/convolution.cu) --------------------------------------------------
    def _is_winograd(self) -> bool:
        """3x3, stride 1, no dilation, pad <= 2 (the input gradient pads by 2 - pad), one group, and
        engine not CAFFE (Caffe's own im2col + GEMM, asked for by name): the Winograd kernels, where
        they were measured faster (WINOGRAD_CHOICE and the thresholds above it)."""
        g = self.geometry
        possible = (self.param.convolution_param.engine != CAFFE_ENGINE and self.group == 1
                    and g.kernel == (3, 3) and g.stride == (1, 1) and g.dilation == (1, 1)
                    and max(g.pad) <= 2)
        if not possible or WINOGRAD_CHOICE != "measured":
            return possible and WINOGRAD_CHOICE != "never"
        tiles = _tile_count(self.out_size)
        channels_in, channels_out = self.conv_in_channels, self.conv_out_channels
        return (min(channels_in, channels_out) >= WINOGRAD_MIN_CHANNELS
                and tiles >= WINOGRAD_MIN_TILES_PER_IMAGE
                and 16 * tiles <= WINOGRAD_MAX_WASTE * self.out_size[0] * self.out_size[1]
                and channels_in * channels_out
                <= WINOGRAD_MAX_FILTER_SHARE * (channels_in + channels_out) * tiles * self.num)

    def _winograd_images_per_chunk(self, tiles_per_image: int) -> int:
        """Images per pass through the Winograd buffers: as many as keep each (36 x channels x tiles)
        buffer within WINOGRAD_BUFFER_LIMIT elements, at least one."""
        per_image = 36 * max(self.conv_in_channels, self.conv_out_channels) * tiles_per_image
        return max(1, min(self.num, WINOGRAD_BUFFER_LIMIT // per_image))

    def _winograd_points(self, name: str, rows: int, columns: int) -> WinogradPoints:
        """Buffer `name` as 36 (rows x columns) matrices, winograd_point_step apart. One buffer serves
        both directions (the forward's tiles cover the top, the input gradient's the bottom) and the
        filters, sized for the largest."""
        channels = max(self.conv_in_channels, self.conv_out_channels)
        tiles = max(_tile_count(self.out_size), _tile_count((self.height, self.width)))
        largest = max(channels * tiles * self._winograd_images_per_chunk(tiles), channels * channels)
        step = winograd_point_step(rows * columns)
        flat = self.buffer(name, (36 * winograd_point_step(largest),))[:36 * step]
        matrices = flat.reshape(36, step)[:, :rows * columns].reshape(36, rows, columns)
        return WinogradPoints(matrices, flat, step)

    def _winograd(self, x, in_size, weights, flip: int, pad, bias, y, out_size) -> None:
        """y (num, out_channels, *out_size) = the 3x3 stride-1 convolution of x (num, in_channels,
        *in_size) padded by `pad` (+ bias), written. flip 0: weights (out, in, 3, 3) as they are; flip 1:
        weights (in, out, 3, 3), each filter turned by 180 degrees (the input gradient)."""
        in_channels, out_channels = x.shape[1], y.shape[1]
        tiles_h, tiles_w = _tile_grid(out_size)
        filters = self._winograd_points("winograd_filters", out_channels, in_channels)
        KERNELS.winograd_weights(out_channels, weights, filters.flat, filters.step, in_channels, flip,
                                 extents=(out_channels, in_channels))
        # The input gradient's own buffer keeps forward's transformed input for the weight gradient.
        inputs_name = "winograd_inputs" if flip == 0 else "winograd_diff_inputs"
        bias_or_unread = filters.flat if bias is None else bias
        for start, count in self._chunks(size=self._winograd_images_per_chunk(tiles_h * tiles_w)):
            inputs = self._winograd_points(inputs_name, in_channels, count * tiles_h * tiles_w)
            products = self._winograd_points("winograd_products", out_channels, count * tiles_h * tiles_w)
            self._winograd_input(x[start:start + count], in_size, pad, (tiles_h, tiles_w), inputs)
            matmul(filters.matrices, inputs.matrices, out=products.matrices)
            planes = count * out_channels * tiles_h
            KERNELS.winograd_output(planes, products.flat, products.step, bias_or_unread,
                                    int(bias is not None), y[start:start + count], out_channels, *out_size,
                                    tiles_h, tiles_w, extents=(planes, tiles_w), work=36 * planes * tiles_w)

    def _winograd_input(self, x, size, pad, tiles, inputs: WinogradPoints) -> None:
        """inputs = B^T d B for the (tiles_h, tiles_w) tiles of x (count, channels, *size) padded by
        `pad`: x is first copied into a zero-padded buffer that every tile fits (im2col with a 1x1
        kernel), so the transform reads without tests (see winograd_input)."""
        count, channels = x.shape[0], x.shape[1]
        padded_size = _padded_size(tiles)
        padded = self._winograd_padded()[:count * channels * padded_size[0] * padded_size[1]]
        padded = padded.reshape(count, channels, -1)
        im2col(x.reshape(count, channels, *size), padded, ConvGeometry((1, 1), tuple(pad), (1, 1), (1, 1)),
               padded_size, images_outer=True)
        planes = count * channels * tiles[0]
        KERNELS.winograd_input(planes, padded, inputs.flat, inputs.step, channels, *padded_size, *tiles,
                               extents=(planes, tiles[1]), work=36 * planes * tiles[1])

    def _winograd_padded(self):
        """Buffer "winograd_padded": a chunk of zero-padded images for _winograd_input, of either
        direction, sized for the larger (one size, so that no pass makes it anew)."""
        largest = 0
        for channels, size in ((self.conv_in_channels, self.out_size),
                               (self.conv_out_channels, (self.height, self.width))):
            area = math.prod(_padded_size(_tile_grid(size)))
            largest = max(largest, self._winograd_images_per_chunk(_tile_count(size)) * channels * area)
        return self.buffer("winograd_padded", (largest,))

    def _winograd_weight_diff(self, images, out_diff, weight_diff, inputs_kept: bool) -> None:
        """weight_diff += G^T (sum over tiles of (A dy A^T) .* (B^T x B)) G: one GEMM per point xi
        over all tiles (the chunks' products added in chunk order), then G^T . G, added in.
        inputs_kept: B^T x B is in the "winograd_inputs" buffer already (forward's, one chunk)."""
        in_channels, out_channels = self.conv_in_channels, self.conv_out_channels
        tiles_h, tiles_w = _tile_grid(self.out_size)
        sums = self._winograd_points("winograd_filters", out_channels, in_channels)
        for start, count in self._chunks(size=self._winograd_images_per_chunk(tiles_h * tiles_w)):
            inputs = self._winograd_points("winograd_inputs", in_channels, count * tiles_h * tiles_w)
            diffs = self._winograd_points("winograd_products", out_channels, count * tiles_h * tiles_w)
            if not inputs_kept:
                self._winograd_input(images[start:start + count], (self.height, self.width),
                                     self.geometry.pad, (tiles_h, tiles_w), inputs)
            planes = count * out_channels * tiles_h
            KERNELS.winograd_output_diff(planes, out_diff[start:start + count], diffs.flat, diffs.step,
                                         out_channels, *self.out_size, tiles_h, tiles_w,
                                         extents=(planes, tiles_w), work=36 * planes * tiles_w)
            if start == 0:
                matmul(diffs.matrices, inputs.matrices.transpose(0, 2, 1), out=sums.matrices)
            else:  # a later chunk's sums through a second buffer, added in chunk order
                more = self.buffer("winograd_filter_diff_chunk", sums.matrices.shape)
                matmul(diffs.matrices, inputs.matrices.transpose(0, 2, 1), out=more)
                sums.matrices[...] += more
        filter_diff = self.buffer("winograd_filter_diff", weight_diff.shape)
        KERNELS.winograd_filter_diff(out_channels, sums.flat, sums.step, filter_diff, in_channels,
                                     extents=(out_channels, in_channels))
        ELTWISE.eltwise_axpy(filter_diff.size, filter_diff, weight_diff, 1.0, extents=filter_diff.size)

    # -- depthwise helpers (the kernels work on pitched planes: kernels/convolution.cu) ----------------
    def _phases(self, images):
        """The zero-padded images split into their stride phases (buffer "depthwise_input"): per image and
        channel stride_h * stride_w planes of (phase_h, phase_w), phase (a, b) holding the padded rows
        a + i * stride_h and columns b + j * stride_w. That is im2col with a stride-sized kernel and
        stride; each phase is large enough for every tap's reads (out + the kernel's extent / stride)."""
        g = self.geometry
        size = tuple(out + (d * (k - 1)) // s
                     for out, k, d, s in zip(self.out_size, g.kernel, g.dilation, g.stride))
        phases = g.stride[0] * g.stride[1]
        buffer = self.buffer("depthwise_input", (self.num, self.conv_in_channels * phases, size[0] * size[1]))
        im2col(images, buffer, ConvGeometry(g.stride, g.pad, g.stride, (1, 1)), size, images_outer=True)
        return buffer, size

    def _spread(self, name: str, source, source_size, size, offset, step):
        """Buffer `name`, (num * C, *size) planes: source's (num * C, *source_size) planes placed at
        offset + step * (i, j), zeros elsewhere (depthwise_spread)."""
        planes = self.num * self.conv_in_channels
        buffer = self.buffer(name, (planes, *size))
        KERNELS.depthwise_spread(planes, source, *source_size, buffer, *size, *offset, *step,
                                 extents=(planes, size[1]), work=buffer.size)
        return buffer

    def _flipped_depthwise_weights(self):
        """The depthwise filters turned by 180 degrees (buffer "depthwise_flipped"): the input gradient's."""
        weights = self.blobs[0].get_data().reshape(self.conv_in_channels, *self.geometry.kernel)
        flipped = self.buffer("depthwise_flipped", weights.shape)
        flipped[...] = weights[:, ::-1, ::-1]
        return flipped

    def _column_table(self):
        """column[o] = o % width for o < height * width (int32): the depthwise_same kernels' column of an
        output, a load where a division per element would not vectorize. Made once per plane size."""
        xp = backend.xp()
        key = (xp, self.height, self.width)
        if self._column_table_of != key:
            positions = xp.arange(self.height * self.width, dtype=xp.int32)
            self._column_table_array = positions % xp.int32(self.width)
            self._column_table_of = key
        return self._column_table_array

    def _depthwise_same(self, x, weights, bias, y) -> None:
        """y (num, C, H, W) = the stride-1 depthwise convolution of x (num, C, H, W) of the same size
        (+ bias), written (kernels/convolution.cu's depthwise_same_forward)."""
        g, planes = self.geometry, self.num * self.conv_in_channels
        size = self.height * self.width
        block_rows = max(1, 4096 // self.width)  # as in the kernel
        bias_or_unread = weights if bias is None else bias
        KERNELS.depthwise_same_forward(planes, x, weights, bias_or_unread, int(bias is not None), y,
                                       self.conv_in_channels, self.height, self.width, *g.kernel, *g.pad,
                                       *g.dilation, self._column_table(),
                                       extents=(planes, min(block_rows, self.height) * self.width),
                                       work=planes * size * g.kernel[0] * g.kernel[1])

    def _depthwise(self, name: str, phases, phase_size, weights, bias, stride, out_size, out) -> None:
        """out (num, C, *out_size) = the depthwise convolution with `stride` of the planes' phases (+ bias),
        through the kernel's pitched output (a buffer) copied into out without its scratch columns."""
        g, planes = self.geometry, self.num * self.conv_in_channels
        phase_w = phase_size[1]
        pitched = self.buffer(f"depthwise_pitched_{name}", (planes, out_size[0], phase_w))
        block_rows = max(1, 4096 // phase_w)  # as in the kernel
        length = (min(block_rows, out_size[0]) - 1) * phase_w + out_size[1]
        bias_or_unread = weights if bias is None else bias
        KERNELS.depthwise_forward(planes, phases, weights, bias_or_unread, int(bias is not None), pitched,
                                  self.conv_in_channels, *phase_size, *g.kernel, *stride, *g.dilation,
                                  *out_size, extents=(planes, length),
                                  work=planes * out_size[0] * phase_w * g.kernel[0] * g.kernel[1])
        # Into out without the scratch columns: rows of out_w values read at the pitch (one threaded
        # kernel; numpy's strided copy ran on one core).
        copy_block(pitched, out, planes * out_size[0], out_size[1], phase_w, 0, out_size[1], 0)
