"""Im2col (Caffe's Im2colLayer): the column matrix a convolution multiplies, as a layer.

It reads kernel, pad, stride and dilation from convolution_param (num_output and group play no part).
A bottom (..., C, H, W) gives the top (..., C * kh * kw, OH, OW): channel (c, ki, kj) of the top at
(oh, ow) is the input pixel that tap (ki, kj) of a convolution reads there (0 in the padding). Forward
is the im2col kernel of kernels/convolution.cu, backward its adjoint col2im.
"""

from __future__ import annotations

from ..layer import Layer, register
from .convolution import axis_and_geometry, col2im, im2col


@register("Im2col")
class Im2colLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.channel_axis, self.geometry = axis_and_geometry(self, bottom[0])

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (top is bottom)")
        shape, g = bottom[0].shape, self.geometry
        if len(shape) != self.channel_axis + 3:
            self.fail(f"needs 2 spatial axes after the channel axis {self.channel_axis}, bottom shape "
                      f"{list(shape)}")
        self.out_size = g.output_size(*shape[-2:])
        if min(self.out_size) <= 0:
            self.fail(f"kernel {list(g.kernel)} (dilation {list(g.dilation)}) is larger than the padded "
                      f"input: bottom shape {list(shape)}, pad {list(g.pad)}, stride {list(g.stride)}")
        self.image_shape = (bottom[0].count_range(0, self.channel_axis), *shape[self.channel_axis:])
        rows = shape[self.channel_axis] * g.kernel[0] * g.kernel[1]
        top[0].reshape((*shape[:self.channel_axis], rows, *self.out_size))

    def forward(self, bottom, top):
        im2col(bottom[0].get_data().reshape(self.image_shape), top[0].mutable_data(), self.geometry,
               self.out_size, images_outer=True)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            col2im(top[0].get_diff(), bottom[0].mutable_diff().reshape(self.image_shape), self.geometry,
                   self.out_size, images_outer=True)
