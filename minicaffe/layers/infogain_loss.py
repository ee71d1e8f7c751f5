"""InfogainLoss: softmax over infogain_loss_param.axis (as BVLC Caffe does since 2017: the input are
scores, not probabilities), then -sum_c H[label, c] log(max(p_c, 1e-20)) per target, / normalizer.

H is a classes x classes matrix: a third bottom, or else read once from infogain_loss_param.source, a
binary BlobProto (.binaryproto). With H the identity this is SoftmaxWithLoss (but for the clamp, Caffe's
kLOG_THRESHOLD 1e-20). loss_param.ignore_label and loss_param.normalization (default VALID) as in
SoftmaxWithLoss; the legacy `normalize` is refused, as Caffe does. An optional second top shares the
probabilities. No gradient to the labels or to H.
"""

from __future__ import annotations

from ..blob import Blob, BlobSizeError
from ..io import FormatError, read_binary
from ..kernel import KernelFile
from ..layer import Layer, register
from ..proto import caffe_pb2
from .reduce import channel_sums, channel_sums_of
from .softmax_loss import check_labels, inner_softmax, loss_normalizer

KERNELS = KernelFile("loss.cu")


@register("InfogainLoss")
class InfogainLossLayer(Layer):
    min_num_bottom = 2
    max_num_bottom = 3
    min_num_top = 1
    max_num_top = 2
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        loss_param = self.param.loss_param
        if loss_param.HasField("normalize"):
            self.fail("loss_param.normalize is deprecated for InfogainLoss (as in Caffe): use "
                      "loss_param.normalization")
        self.normalization = loss_param.normalization
        self.has_ignore = loss_param.HasField("ignore_label")
        self.ignore_label = loss_param.ignore_label
        self._check_axis(bottom[0])
        self.softmax = inner_softmax(self, self.param.infogain_loss_param.axis)
        self.prob = Blob((), self.dtype)
        self.softmax.setup([bottom[0]], [self.prob])
        self.infogain = bottom[2] if len(bottom) > 2 else self._read_infogain()

    def _check_axis(self, scores: Blob) -> None:
        """The class axis must exist (checked here so that the error names this layer, not its Softmax)."""
        try:
            scores.canonical_axis(self.param.infogain_loss_param.axis)
        except ValueError as error:
            self.fail(f"infogain_loss_param.axis: {error}")

    def _read_infogain(self) -> Blob:
        param = self.param.infogain_loss_param
        if not param.HasField("source"):
            self.fail("needs the infogain matrix H: infogain_loss_param.source (a .binaryproto) or a third "
                      "bottom")
        blob = Blob((), self.dtype)
        try:
            blob.from_proto(read_binary(param.source, caffe_pb2.BlobProto()),
                            where=f"infogain_loss_param.source {param.source}")
        except FormatError as error:
            self.fail(f"infogain_loss_param.source: {error}")
        except (BlobSizeError, ValueError) as error:
            self.fail(str(error))
        return blob

    def reshape(self, bottom, top):
        for blob in top:
            if any(blob is b for b in bottom):
                self.fail("a top cannot be one of its bottoms (in place)")
        scores, label = bottom[0], bottom[1]
        if len(bottom) > 2:
            self.infogain = bottom[2]
        if label.num_axes == 0 or scores.shape[0] != label.shape[0]:
            self.fail(f"scores {list(scores.shape)} and labels {list(label.shape)} need the same first "
                      "dimension")
        self._check_axis(scores)
        self.softmax.reshape([scores], [self.prob])
        axis = self.softmax.axis
        self.outer, self.channels, self.inner = self.softmax.outer, self.softmax.channels, self.softmax.inner
        if label.count != self.outer * self.inner:
            self.fail(f"labels {list(label.shape)} have {label.count} values, but scores "
                      f"{list(scores.shape)} with infogain axis {axis} need {self.outer * self.inner} "
                      f"(one label in 0..{self.channels - 1} per element outside axis {axis})")
        if self.infogain.count != self.channels * self.channels:
            self.fail(f"the infogain matrix H {list(self.infogain.shape)} has {self.infogain.count} values, "
                      f"but {self.channels} classes (scores {list(scores.shape)}, axis {axis}) need "
                      f"{self.channels} x {self.channels}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape_like(scores)
            top[1].share_data(self.prob)

    def forward(self, bottom, top):
        self.softmax.run_forward([bottom[0]], [self.prob])
        valid = self.buffer("valid", (self.outer, self.inner))
        total = self.buffer("total", (1,))
        label = bottom[1].get_data()
        args = (self.channels, self.prob.get_data(), label, self.infogain.get_data(), valid,
                int(self.has_ignore), self.ignore_label)
        channel_sums(self, (self.outer, 1, self.inner), KERNELS.infogain_loss_forward, args, total,
                     accumulate=False)
        check_labels(self, valid, label, self.channels, f"scores {list(bottom[0].shape)}, {self.channels} "
                     f"classes on axis {self.softmax.axis}")
        self.normalizer = loss_normalizer(self, self.normalization, self.outer, self.inner,
                                          valid if self.has_ignore else None)
        top[0].mutable_data()[...] = total[0] / self.normalizer[0]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1)")
        if len(propagate_down) > 2 and propagate_down[2]:
            self.fail("cannot backpropagate to the infogain matrix (bottom 2)")
        if not propagate_down[0]:
            return
        c = self.channels
        row_sum = self.buffer("row_sum", (c,))
        channel_sums_of(self, (1, c, c), self.infogain.get_data(), row_sum, accumulate=False)
        KERNELS.infogain_loss_backward(self.outer, c, self.inner, self.prob.get_data(), bottom[1].get_data(),
                                       self.infogain.get_data(), row_sum, top[0].get_diff(), self.normalizer,
                                       bottom[0].mutable_diff(), int(self.has_ignore), self.ignore_label,
                                       extents=(self.outer, c if self.inner == 1 else self.inner))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0
