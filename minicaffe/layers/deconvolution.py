"""Deconvolution (Caffe's DeconvolutionLayer): the transpose of a convolution, e.g. FCN's upsampling.

It reads convolution_param as Convolution does. The top of a bottom (N, C, H, W) is (N, num_output,
OH, OW) with OH = stride * (H - 1) + dilation * (kernel - 1) + 1 - 2 * pad (so a Convolution of the
same geometry maps the top's size back to the bottom's), and the weights are shaped
(C, num_output / group, kh, kw), as Caffe stores them, so .caffemodel files interchange.

The machinery is Convolution's (minicaffe/layers/convolution.py) with its two sides swapped: the top is
the image side (what im2col reads, col2im writes) and the bottom the column side. So forward is the
convolution's adjoint (_backward_gemm: col2im of W^T @ x), the bottom diff is a convolution of the top
diff (_forward_gemm), and the weight gradient is _weight_gemm of (top diff, bottom), as in Caffe.
"""

from __future__ import annotations

import math

from ..layer import register
from .convolution import ConvolutionLayer
from .reduce import channel_sums_of


@register("Deconvolution")
class DeconvolutionLayer(ConvolutionLayer):
    def _conv_channels(self) -> tuple[int, int]:
        return self.num_output, self.channels  # the top is the image side

    def _top_size(self, shape) -> tuple[int, int]:
        top_size = self.geometry.transposed_output_size(*shape[-2:])
        if min(top_size) <= 0:
            g = self.geometry
            self.fail(f"the output would be empty ({list(top_size)}): bottom shape {list(shape)}, kernel "
                      f"{list(g.kernel)}, dilation {list(g.dilation)}, stride {list(g.stride)}, pad "
                      f"{list(g.pad)} (pad is taken off the output)")
        return top_size

    def _image_and_column_sizes(self, bottom_size, top_size):
        return tuple(top_size), tuple(bottom_size)

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            y = self._images(t.mutable_data())
            self._backward_gemm(self._outputs(b.get_data()), y)
            if self.bias_term:
                y.reshape(self.num, self.num_output, -1)[...] += self.blobs[1].get_data()[:, None]

    def backward(self, top, propagate_down, bottom):
        weight_grad = self.param_propagate_down[0]
        bias_grad = self.bias_term and self.param_propagate_down[1]
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self._images(t.get_diff())
            if bias_grad:
                dims = (dy.shape[0], dy.shape[1], math.prod(dy.shape[2:]))
                channel_sums_of(self, dims, dy, self.blobs[1].mutable_diff())
            if weight_grad:
                self._weight_gemm(dy, self._outputs(b.get_data()))
            if propagate_down[i]:
                self._forward_gemm(dy, self._outputs(b.mutable_diff()))
