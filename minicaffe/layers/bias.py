"""Bias: y = x + b, b broadcast along axes [axis, axis + b's num_axes) of x, as Caffe's BiasLayer.

b is a learned blob (one bottom; shape = bottom[0].shape[axis : axis + num_axes], num_axes -1 = to the
end, 0 = a scalar) or the second bottom. The helpers here are shared with the Scale layer, whose
bias_term runs an internal Bias layer; both use the broadcast kernels of kernels/scale.cu.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..blob import Blob
from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("scale.cu")  # Bias shares the broadcast kernels of the Scale layer


def _canonical_axis(layer: Layer, bottom: Blob, axis: int) -> int:
    try:
        return bottom.canonical_axis(axis)
    except ValueError:
        layer.fail(f"axis {axis} is out of range for bottom[0] of shape {list(bottom.shape)}")


def learned_shape(layer: Layer, bottom: Blob, axis: int, num_axes: int, what: str) -> tuple[int, ...]:
    """Shape of a learned scale/bias blob: bottom.shape[axis : axis + num_axes] (-1: to the end)."""
    axis = _canonical_axis(layer, bottom, axis)
    if num_axes < -1:
        layer.fail(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0], got {num_axes}")
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        layer.fail(f"{what} blob's shape extends past bottom[0]'s shape {list(bottom.shape)} when applied "
                   f"starting with bottom[0] axis {axis} (num_axes {num_axes})")
    return bottom.shape[axis:] if num_axes == -1 else bottom.shape[axis:axis + num_axes]


def broadcast_dims(layer: Layer, bottom: Blob, shape: Sequence[int], axis: int,
                   what: str) -> tuple[int, int, int]:
    """(outer, dim, inner) of bottom for a blob of `shape` applied from `axis`, after checking the shapes.

    A scalar applies from axis 0 whatever `axis` says (the same result, one plane), as in Caffe."""
    shape = tuple(shape)
    axis = 0 if not shape else _canonical_axis(layer, bottom, axis)
    if bottom.shape[axis:axis + len(shape)] != shape:
        layer.fail(f"dimension mismatch between bottom[0] {list(bottom.shape)} from axis {axis} and "
                   f"the {what} {list(shape)}")
    dim = 1
    for d in shape:
        dim *= d
    return bottom.count_range(0, axis), dim, bottom.count_range(axis + len(shape))


def broadcast(name: str, dims: tuple[int, int, int], x, values, y) -> None:
    """y = x (op) values[d] with the `name` ("scale" or "bias") kernels of scale.cu."""
    outer, dim, inner = dims
    if inner == 1:
        getattr(KERNELS, f"{name}_rows")(outer, dim, x, values, y, extents=(outer, dim))
    else:
        planes = outer * dim
        getattr(KERNELS, f"{name}_planes")(planes, inner, dim, x, values, y, extents=(planes, inner))


def sum_to_dim(values, dims: tuple[int, int, int]):
    """Sum over outer and inner: the gradient of a broadcast blob (Caffe does it with gemv)."""
    outer, dim, inner = dims
    return values.reshape(outer, dim, inner).sum(axis=(0, 2))


@register("Bias")
class BiasLayer(Layer):
    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.bias_param
        if len(bottom) == 1:
            shape = learned_shape(self, bottom[0], p.axis, p.num_axes, "bias")
            self.setup_params([shape], [p.filler])  # default filler: constant 0

    def reshape(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = broadcast_dims(self, bottom[0], bias.shape, self.param.bias_param.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        broadcast("bias", self.dims, bottom[0].get_data(), bias.get_data(), top[0].mutable_data())

    def backward(self, top, propagate_down, bottom):
        dy = top[0].get_diff()
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].mutable_diff()[...] = dy  # in place the diff is already dy
        if len(bottom) > 1:
            if propagate_down[1]:
                bottom[1].mutable_diff()[...] = sum_to_dim(dy, self.dims).reshape(bottom[1].shape)
        elif self.param_propagate_down[0]:
            self.blobs[0].mutable_diff()[...] += sum_to_dim(dy, self.dims).reshape(self.blobs[0].shape)

