"""Crop (Caffe's CropLayer): bottom 0 cut to the shape of bottom 1, as FCN aligns its upsampled scores
with the input.

crop_param.axis (default 2) is the first axis cropped; it and every later axis take bottom 1's size,
the axes before it keep bottom 0's. crop_param.offset gives where the window starts: none (0 on every
cropped axis), one for all cropped axes, or one per cropped axis. Bottom 1 only gives a shape: its diff
is 0. The copies are kernels/crop.cu.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("crop.cu")


@register("Crop")
class CropLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self._tables: dict = {}

    def reshape(self, bottom, top):
        if top[0] is bottom[0] or top[0] is bottom[1]:
            self.fail("cannot run in place (the top is one of the bottoms)")
        param, shape, reference = self.param.crop_param, bottom[0].shape, bottom[1].shape
        if len(shape) != len(reference):
            self.fail(f"the bottoms need the same number of axes: bottom 0 {list(shape)}, "
                      f"bottom 1 {list(reference)}")
        try:
            axis = bottom[0].canonical_axis(param.axis)
        except ValueError as error:
            self.fail(str(error))
        cropped = len(shape) - axis
        given = list(param.offset)
        if len(given) > 1 and len(given) != cropped:
            self.fail(f"{len(given)} offsets given for the {cropped} cropped axes {axis}..{len(shape) - 1}:"
                      " give none, one for all, or one per cropped axis")
        if len(given) <= 1:
            given = (given or [0]) * cropped  # one offset for every cropped axis, 0 without one
        offsets = [0] * axis + list(given)
        top_shape = tuple(shape[:axis]) + tuple(reference[axis:])
        for i in range(axis, len(shape)):
            if offsets[i] + top_shape[i] > shape[i]:
                self.fail(f"the crop does not fit on axis {i}: offset {offsets[i]} + size {top_shape[i]} > "
                          f"{shape[i]} (bottom 0 {list(shape)}, bottom 1 {list(reference)})")
        top[0].reshape(top_shape)
        self.offsets = offsets

    def _geometry(self, bottom, top):
        """(top shape, bottom shape, offsets) as int32 arrays of the current mode's array module."""
        key = (backend.mode(), bottom[0].shape, top[0].shape, tuple(self.offsets))
        if key not in self._tables:
            xp = backend.xp()
            self._tables = {key: tuple(xp.asarray(np.array(values, np.int32))
                                       for values in (top[0].shape, bottom[0].shape, self.offsets))}
        return self._tables[key]

    def forward(self, bottom, top):
        axes, width = top[0].num_axes, top[0].shape[-1]
        planes = top[0].count // width if width else 0
        KERNELS.crop_forward(planes, axes, *self._geometry(bottom, top), bottom[0].get_data(),
                             top[0].mutable_data(), extents=(planes, width))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            axes, width = bottom[0].num_axes, bottom[0].shape[-1]
            planes = bottom[0].count // width if width else 0
            KERNELS.crop_backward(planes, axes, *self._geometry(bottom, top), top[0].get_diff(),
                                  bottom[0].mutable_diff(), extents=(planes, width))
        if propagate_down[1]:  # bottom 1 gives only the shape
            bottom[1].mutable_diff().fill(0)
