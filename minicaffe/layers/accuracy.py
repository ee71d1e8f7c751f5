"""Accuracy: the fraction of targets whose label is among the top_k scores (Caffe's tie rule: fewer
than top_k classes score strictly higher). Optional second top: the accuracy of each class, shape (C,)
(0 for a class with no targets). Targets labelled ignore_label are not counted. No backward."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("accuracy.cu")


@register("Accuracy")
class AccuracyLayer(Layer):
    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2

    def layer_setup(self, bottom, top):
        accuracy_param = self.param.accuracy_param
        self.top_k = accuracy_param.top_k
        self.has_ignore = accuracy_param.HasField("ignore_label")
        self.ignore_label = accuracy_param.ignore_label

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        try:
            self.axis = bottom[0].canonical_axis(self.param.accuracy_param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.outer = bottom[0].count_range(0, self.axis)
        self.channels = shape[self.axis]
        self.inner = bottom[0].count_range(self.axis + 1)
        if not 1 <= self.top_k <= self.channels:
            self.fail(f"top_k {self.top_k} must be between 1 and the number of classes {self.channels} "
                      f"(scores {list(shape)}, axis {self.axis})")
        if bottom[1].count != self.outer * self.inner:
            self.fail(f"labels {list(bottom[1].shape)} have {bottom[1].count} values, but scores "
                      f"{list(shape)} with class axis {self.axis} need {self.outer * self.inner}")
        for blob in top:
            if blob is bottom[0] or blob is bottom[1]:
                self.fail("a top cannot be one of the bottoms (in place)")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        xp = backend.xp()
        targets = self.outer * self.inner
        correct = self.buffer("correct", (targets,))
        cls = self.buffer("class", (targets,), np.int32)
        label = bottom[1].get_data()
        scratch = self.buffer("scratch", (targets,))
        KERNELS.accuracy_forward(self.outer, self.channels, self.inner, bottom[0].get_data(), label,
                                 correct, cls, scratch, int(self.has_ignore), self.ignore_label,
                                 self.top_k, extents=(self.outer, self.inner))
        bad = cls < 0
        if bool(bad.any()):
            value = float(label.ravel()[bad][0])
            self.fail(f"label {value:g} is outside 0..{self.channels - 1} (scores {list(bottom[0].shape)})")
        # Bin `channels` collects the ignored targets and is dropped.
        per_class_total = xp.bincount(cls, minlength=self.channels + 1)[: self.channels]
        per_class_correct = xp.bincount(cls, weights=correct, minlength=self.channels + 1)[: self.channels]
        total = per_class_total.sum()
        top[0].mutable_data()[...] = xp.where(total > 0, per_class_correct.sum() / xp.maximum(total, 1), 0)
        if len(top) > 1:
            top[1].mutable_data()[...] = xp.where(
                per_class_total > 0, per_class_correct / xp.maximum(per_class_total, 1), 0)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("has no gradient (Caffe: not implemented); do not backpropagate through Accuracy")
