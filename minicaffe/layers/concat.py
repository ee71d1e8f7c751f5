"""Concat: join the bottoms along concat_param.axis (default 1; legacy concat_dim); backward splits the
top's gradient back into the bottoms."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("concat.cu")


def copy_block(src, dst, planes: int, n: int, src_stride: int, src_offset: int, dst_stride: int,
               dst_offset: int) -> None:
    """Copy `planes` runs of n values: src[p * src_stride + src_offset + j] -> dst[p * dst_stride +
    dst_offset + j]. Also used by Slice."""
    if planes == 0 or n == 0:
        return
    src, dst = src.reshape(-1)[src_offset:], dst.reshape(-1)[dst_offset:]
    KERNELS.copy_planes(planes, n, src_stride, dst_stride, src, dst, extents=(planes, n))


def legacy_axis(layer: Layer, blob, param, legacy_field: str) -> int:
    """The axis from `axis` or the legacy non-negative `<legacy_field>` (not both), as Caffe."""
    if param.HasField(legacy_field):
        if param.HasField("axis"):
            layer.fail(f"give either axis or {legacy_field}, not both")
        axis = getattr(param, legacy_field)
        if axis >= blob.num_axes:
            layer.fail(f"{legacy_field} {axis} out of range for a blob of shape {list(blob.shape)}")
        return axis
    try:
        return blob.canonical_axis(param.axis)
    except ValueError as error:
        layer.fail(str(error))


@register("Concat")
class ConcatLayer(Layer):
    min_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        first = bottom[0].shape
        self.axis = axis = legacy_axis(self, bottom[0], self.param.concat_param, "concat_dim")
        for i, blob in enumerate(bottom):
            if blob is top[0]:
                self.fail("cannot run in place")
            if len(blob.shape) != len(first) or any(
                    a != b for k, (a, b) in enumerate(zip(blob.shape, first)) if k != axis):
                self.fail(f"bottom {i} has shape {list(blob.shape)}, bottom 0 {list(first)}: all must "
                          f"match except on the concat axis {axis}")
        self.outer = bottom[0].count_range(0, axis)
        self.inner = bottom[0].count_range(axis + 1)
        total = sum(blob.shape[axis] for blob in bottom)
        top[0].reshape(first[:axis] + (total,) + first[axis + 1:])

    def forward(self, bottom, top):
        out = top[0].mutable_data()
        top_axis = top[0].shape[self.axis] * self.inner
        offset = 0
        for blob in bottom:
            n = blob.shape[self.axis] * self.inner
            copy_block(blob.get_data(), out, self.outer, n, n, 0, top_axis, offset)
            offset += n

    def backward(self, top, propagate_down, bottom):
        dy = top[0].get_diff()
        top_axis = top[0].shape[self.axis] * self.inner
        offset = 0
        for blob, down in zip(bottom, propagate_down):
            n = blob.shape[self.axis] * self.inner
            if down:
                copy_block(dy, blob.mutable_diff(), self.outer, n, top_axis, offset, n, 0)
            offset += n
