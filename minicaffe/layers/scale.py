"""Scale: y = x * s (+ b), s broadcast along axes [axis, axis + s's num_axes) of x, as Caffe's ScaleLayer.

s is a learned blob (one bottom; filler default constant 1) or the second bottom, which then gets a
gradient; the axis logic is BroadcastLayer's (layers/broadcast.py). bias_term adds a learned b through
an inner Bias layer, as Caffe does; its blob is the last one.
"""

from __future__ import annotations

from .. import filler, rng
from ..layer import register
from ..proto import caffe_pb2
from .bias import BiasLayer
from .broadcast import KERNELS, BroadcastLayer
from .reduce import KERNELS as REDUCE
from .reduce import paired_channel_sums


@register("Scale")
class ScaleLayer(BroadcastLayer):
    operand = "scale"
    keeps = "input"  # the scale gradient needs x
    # Set by the Net for an in-place BatchNorm (global statistics) right before this in-place Scale with a
    # bias term, when one forward or backward runs both (Net._fusable_batch_norm_scales): the BatchNorm
    # then only computes its statistics, and this layer normalizes in its own pass (`normalizing`), or
    # gives the BatchNorm's input gradient with its own (`propagating_for`). The same bits as apart.
    normalizing = None
    propagating_for = None

    def axes_param(self):
        return self.param.scale_param

    def layer_setup(self, bottom, top):
        p = self.param.scale_param
        if len(bottom) == 1:
            shape = self.learned_shape(bottom[0])
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

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if self.bias_layer is not None:
            # The Net may have swapped in a shared blob for ours after setup.
            self.bias_layer.blobs[0] = self.blobs[self.bias_index]
            self.bias_layer.reshape([top[0]], [top[0]])  # in place on the scaled top

    def keeps_in_forward(self, bottom, top) -> bool:
        return self._bias_in_one_pass()

    def _bias_in_one_pass(self) -> bool:
        return self.bias_layer is not None and self.bias_layer.dims == self.dims

    def forward(self, bottom, top):
        scale = self.operand_blob(bottom)
        bias = self.bias_layer
        if self.normalizing is not None:  # x is the BatchNorm's bottom: normalized, scaled, biased here
            x = bottom[0].get_data()
            planes, inner = self.dims[0] * self.dims[1], self.dims[2]
            KERNELS.normalize_mul_add_planes(planes, inner, self.dims[1], x, *self.normalizing.statistics(),
                                             scale.get_data(), bias.blobs[0].get_data(),
                                             top[0].mutable_data(), self.buffer("kept", x.shape, kept=True),
                                             extents=(planes, inner))
            return
        if self._bias_in_one_pass():  # the bias term, and in place the copy of x, in the same pass
            x = bottom[0].get_data()
            kept = self.buffer("kept", x.shape, kept=True) if top[0] is bottom[0] else None
            self.broadcast("mul", x, scale.get_data(), top[0].mutable_data(), bias=bias.blobs[0].get_data(),
                           kept=kept)
            return
        self.broadcast("mul", bottom[0].get_data(), scale.get_data(), top[0].mutable_data())
        if bias is not None:
            bias.run_forward([top[0]], [top[0]])

    def backward(self, top, propagate_down, bottom):
        # Both parameter gradients read dy before dx overwrites it (in place they share memory).
        scale = self.operand_blob(bottom)
        learned = len(bottom) == 1
        dy = top[0].get_diff()
        scale_grad = (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1])
        bias = self.bias_layer
        bias_grad = bias is not None and self.param_propagate_down[self.bias_index]
        factor = None if self.propagating_for is None else self.propagating_for.statistics()[1]
        if scale_grad and bias_grad and self._bias_in_one_pass():
            dx = bottom[0].mutable_diff() if propagate_down[0] else None
            self._scale_and_bias_gradients(dy, self.kept_input(bottom), scale, learned, dx, factor)
            scale_grad = bias_grad = False
            if dx is not None:
                return
        if bias_grad:
            bias.run_backward(top, [False], [top[0]])
        if scale_grad:
            # The scale's gradient: dy * x summed over outer and inner (the learned one accumulates).
            self.reduce_to_operand(REDUCE.product_sum_partials, (dy, self.kept_input(bottom)),
                                   scale.mutable_diff(), accumulate=learned)
        if propagate_down[0]:
            dx = bottom[0].mutable_diff()
            self.broadcast("mul", dy, scale.get_data(), dx)
            if factor is not None:  # the fused BatchNorm's input gradient (bn_normalize's rounding)
                self.broadcast("mul", dx, factor, dx)

    def _scale_and_bias_gradients(self, dy, x, scale, learned: bool, dx=None, factor=None) -> None:
        """The bias gradient (dy summed over outer and inner) and the scale's (dy * x summed), both from
        one read of dy: reduce.cu's sum_and_product_partials, then one stage 2 over both. The same bits
        as the two sums apart (Bias's and the one above). With dx, also dx = dy * scale (* factor, per
        channel: a fused BatchNorm's 1 / std) in that pass (broadcast.cu's scale_bias_backward_partials;
        dx may be dy)."""
        dim = self.dims[1]
        if dx is None:
            stage1, args = REDUCE.sum_and_product_partials, (dim, dy, x)
        else:
            if factor is None:
                factor = self.buffer("ones", (dim,))
                factor.fill(1)
            stage1, args = KERNELS.scale_bias_backward_partials, (dim, dy, x, scale.get_data(), factor, dx)
        totals = paired_channel_sums(self, self.dims, stage1, args, "gradient_totals")
        bias_diff = self.bias_layer.blobs[0].mutable_diff().reshape(-1)
        bias_diff += totals[:dim]
        scale_diff = scale.mutable_diff().reshape(-1)
        if learned:
            scale_diff += totals[dim:]
        else:  # a second bottom's gradient is written
            scale_diff[...] = totals[dim:]
