"""SoftmaxWithLoss: softmax over softmax_param.axis, then the multinomial logistic loss of the labels.

As in Caffe the probabilities come from an internal Softmax layer; an optional second top shares them.
loss = -sum log(max(p[label], FLT_MIN)) / normalizer, where loss_param.normalization picks the
normalizer (VALID: counted targets, default; BATCH_SIZE: outer count; FULL: all targets; NONE: 1) and
the legacy loss_param.normalize (true: VALID, false: BATCH_SIZE) applies when normalization is unset.
A NaN p is not clamped: the loss is NaN, so NaN data shows in the log (the solver then stops).
"""

from __future__ import annotations

from .. import backend
from ..blob import Blob
from ..kernel import KernelFile
from ..layer import Layer, create_layer, register
from ..proto import caffe_pb2

KERNELS = KernelFile("loss.cu")
Mode = caffe_pb2.LossParameter


def normalization_mode(loss_param) -> int:
    """Caffe's rule: the legacy `normalize` bool counts only when `normalization` is unset."""
    if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
        return Mode.VALID if loss_param.normalize else Mode.BATCH_SIZE
    return loss_param.normalization


def inner_softmax(layer: Layer, axis: int) -> Layer:
    """The Softmax layer a loss layer runs inside (SoftmaxWithLoss, InfogainLoss), as Caffe makes it: the
    loss layer's parameters with type Softmax, softmax_param.axis `axis`, no loss weight."""
    param = caffe_pb2.LayerParameter()
    param.CopyFrom(layer.param)
    param.type = "Softmax"
    param.name = layer.name + "/softmax"
    param.softmax_param.axis = axis
    del param.loss_weight[:]
    del param.bottom[:]
    del param.top[:]
    return create_layer(param, layer.phase, layer.dtype)


def loss_normalizer(layer: Layer, mode: int, outer: int, inner: int, valid=None):
    """Caffe's get_normalizer of the loss layers, for `outer` x `inner` targets: a one-element array (kept
    on the device: a backward kernel reads it there), at least 1. valid: the targets' flags (1 counted,
    0 ignored) when an ignore_label is set, else None (every target counts)."""
    xp = backend.xp()
    if mode == Mode.VALID and valid is not None:
        count = valid.sum()
    elif mode in (Mode.VALID, Mode.FULL):
        count = outer * inner
    elif mode == Mode.BATCH_SIZE:
        count = outer
    elif mode == Mode.NONE:
        count = 1
    else:
        layer.fail(f"unknown loss_param.normalization {mode}")
    return xp.maximum(xp.asarray(count, layer.dtype), 1).reshape(1)


def check_labels(layer: Layer, valid, label, classes: int, context: str) -> None:
    """Fail, naming the first bad label, where a loss kernel flagged one with valid < 0 (a label outside
    0..classes - 1). `context` says what the labels index (the scores' shape, the class axis)."""
    bad = valid < 0
    if bool(bad.any()):
        value = float(label.reshape(valid.shape)[bad][0])
        layer.fail(f"label {value:g} is outside 0..{classes - 1} ({context})")


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(Layer):
    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        self.softmax = inner_softmax(self, self.param.softmax_param.axis)
        self.prob = Blob((), self.dtype)
        self.softmax.setup([bottom[0]], [self.prob])
        loss_param = self.param.loss_param
        self.has_ignore = loss_param.HasField("ignore_label")
        self.ignore_label = loss_param.ignore_label
        self.normalization = normalization_mode(loss_param)

    def reshape(self, bottom, top):
        if top[0] is bottom[0] or top[0] is bottom[1]:
            self.fail("the loss top cannot be one of its bottoms (in place)")
        self.softmax.reshape([bottom[0]], [self.prob])
        axis, shape = self.softmax.axis, bottom[0].shape
        self.outer, self.channels, self.inner = self.softmax.outer, self.softmax.channels, self.softmax.inner
        if bottom[1].num_axes == 0 or bottom[0].shape[0] != bottom[1].shape[0]:
            self.fail(f"scores {list(shape)} and labels {list(bottom[1].shape)} need the same first "
                      "dimension")
        if bottom[1].count != self.outer * self.inner:
            self.fail(f"labels {list(bottom[1].shape)} have {bottom[1].count} values, but scores "
                      f"{list(shape)} with softmax axis {axis} need {self.outer * self.inner} "
                      f"(one label in 0..{self.channels - 1} per element outside axis {axis})")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape_like(bottom[0])
            top[1].share_data(self.prob)

    def forward(self, bottom, top):
        self.softmax.run_forward([bottom[0]], [self.prob])
        loss = self.buffer("loss", (self.outer, self.inner))
        valid = self.buffer("valid", (self.outer, self.inner))
        label = bottom[1].get_data()
        KERNELS.softmax_loss_forward(self.outer, self.channels, self.inner, self.prob.get_data(), label,
                                     loss, valid, int(self.has_ignore), self.ignore_label,
                                     extents=(self.outer, self.inner))
        check_labels(self, valid, label, self.channels,
                     f"scores {list(bottom[0].shape)}, {self.channels} classes on axis {self.softmax.axis}")
        self.normalizer = loss_normalizer(self, self.normalization, self.outer, self.inner,
                                          valid if self.has_ignore else None)
        top[0].mutable_data()[...] = loss.sum() / self.normalizer[0]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1)")
        if not propagate_down[0]:
            return
        KERNELS.softmax_loss_backward(self.outer, self.channels, self.inner, self.prob.get_data(),
                                      bottom[1].get_data(), top[0].get_diff(), self.normalizer,
                                      bottom[0].mutable_diff(), int(self.has_ignore), self.ignore_label,
                                      extents=(self.outer, self.channels if self.inner == 1 else self.inner))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1
