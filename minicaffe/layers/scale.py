"""Scale: y = x * s (+ b), s broadcast along axes [axis, axis + s's num_axes) of x, as Caffe's ScaleLayer.

s is a learned blob (one bottom; shape = bottom[0].shape[axis : axis + num_axes], num_axes -1 = to
the end, 0 = a scalar; filler default constant 1) or the second bottom, which then gets a gradient.
bias_term adds a learned b through an internal Bias layer, as Caffe does; its blob is the last one.
"""

from __future__ import annotations

from .. import backend, filler, rng
from ..layer import Layer, register
from ..proto import caffe_pb2
from .bias import KERNELS, BiasLayer, broadcast, broadcast_dims, learned_shape, sum_to_dim


@register("Scale")
class ScaleLayer(Layer):
    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.scale_param
        if len(bottom) == 1:
            shape = learned_shape(self, bottom[0], p.axis, p.num_axes, "scale")
            if not self.check_param_blob(0, shape):
                blob = self.add_param_blob(shape)
                if p.HasField("filler"):
                    filler.fill(blob, p.filler, rng.stream("filler", self.name, 0))
                else:
                    blob.data[...] = 1.0  # Caffe's default: constant 1
        self.bias_layer = None
        if p.bias_term:
            self.bias_index = 1 if len(bottom) == 1 else 0  # after the learned scale, if any
            bias_param = caffe_pb2.LayerParameter(name=f"{self.name}/bias", type="Bias")
            bias_param.bias_param.axis = p.axis
            bias_param.bias_param.num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            bias_param.bias_param.filler.CopyFrom(p.bias_filler)  # unset: constant 0
            self.bias_layer = BiasLayer(bias_param, self.phase, self.dtype)
            if self.bias_index < len(self.blobs):  # loaded with the net's weights
                self.bias_layer.blobs = [self.blobs[self.bias_index]]
            self.bias_layer.setup([bottom[0]], [top[0]])
            if self.bias_index == len(self.blobs):
                self.blobs.append(self.bias_layer.blobs[0])
        self.saved_input = self.product = None
        self.in_place = False

    def _scale_blob(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        scale = self._scale_blob(bottom)
        self.dims = broadcast_dims(self, bottom[0], scale.shape, self.param.scale_param.axis, "scale")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])
        if self.bias_layer is not None:
            # The Net may have swapped in a shared blob for ours after setup.
            self.bias_layer.blobs[0] = self.blobs[self.bias_index]
            self.bias_layer.reshape([top[0]], [top[0]])  # in place on the scaled top

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        # In place, the scale gradient still needs x.
        self.in_place = top[0] is bottom[0]
        if self.in_place:
            self.saved_input = backend.reuse(self.saved_input, x.shape, x.dtype)
            self.saved_input[...] = x
        broadcast("scale", self.dims, x, self._scale_blob(bottom).get_data(), top[0].mutable_data())
        if self.bias_layer is not None:
            self.bias_layer.forward([top[0]], [top[0]])

    def backward(self, top, propagate_down, bottom):
        # Both parameter gradients read dy before dx overwrites it (in place they share memory).
        if self.bias_layer is not None and self.param_propagate_down[self.bias_index]:
            self.bias_layer.backward(top, [False], [top[0]])
        scale = self._scale_blob(bottom)
        learned = len(bottom) == 1
        dy = top[0].get_diff()
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            x = self.saved_input if self.in_place else bottom[0].get_data()
            product = self.product = backend.reuse(self.product, dy.shape, dy.dtype)
            KERNELS.scale_product(dy.size, dy, x, product, extents=dy.size)
            gradient = sum_to_dim(product, self.dims).reshape(scale.shape)
            if learned:
                scale.mutable_diff()[...] += gradient
            else:
                scale.mutable_diff()[...] = gradient
        if propagate_down[0]:
            broadcast("scale", self.dims, dy, scale.get_data(), bottom[0].mutable_diff())
