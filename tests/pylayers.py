"""Python layers (``type: "Python"``) for the tests, written as pycaffe users write them: numpy on
``bottom[i].data`` / ``.diff``, learned blobs from ``self.blobs.add_blob``. tests/ is on the Python path
under pytest, so a prototxt names this module as ``python_param { module: "pylayers" layer: "..." }``."""

import numpy as np

import minicaffe as caffe


class ChannelScale(caffe.Layer):
    """y = a[c] * x, one learned a per channel (axis 1); param_str is a's start value (default 1)."""

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise Exception("one bottom, one top")
        if not self.blobs:  # not loaded from a .caffemodel or given in the prototxt
            self.blobs.add_blob(bottom[0].channels)
            self.blobs[0].data[...] = float(self.param_str or 1)

    def reshape(self, bottom, top):
        if bottom[0].channels != self.blobs[0].count:
            raise Exception(f"{bottom[0].channels} channels, a has {self.blobs[0].count}")
        top[0].reshape(*bottom[0].shape)

    def scale(self, x):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        top[0].data[...] = self.scale(bottom[0].data) * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        x, dy = bottom[0].data, top[0].diff
        per_channel = (0,) + tuple(range(2, x.ndim))
        self.blobs[0].diff[...] += (dy * x).sum(axis=per_channel)  # add: shared weights, iter_size
        if propagate_down[0]:
            bottom[0].diff[...] = self.scale(x) * dy


class Recorder(caffe.Layer):
    """Copies its bottom to its top and records what pycaffe gives a layer before setup."""

    def setup(self, bottom, top):
        self.seen = {"param_str": self.param_str, "phase": self.phase, "num": bottom[0].num,
                     "channels": bottom[0].channels, "count": bottom[0].count}
        self.forwards = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.forwards += 1
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff

    def times_run(self):
        return self.forwards


class NoBackward(caffe.Layer):
    """A pass-through without backward (as pycaffe data layers often are)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data


class NoForward(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(1)


class FailsIn(caffe.Layer):
    """Raises in the method that param_str names."""

    def setup(self, bottom, top):
        self.check("setup")

    def reshape(self, bottom, top):
        self.check("reshape")
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.check("forward")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.check("backward")
        bottom[0].diff[...] = top[0].diff

    def check(self, method):
        if self.param_str == method:
            raise RuntimeError(f"planned failure in {method}")


class NotALayer:
    def setup(self, bottom, top):
        pass


NOT_A_CLASS = 3


def reference_scale(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """ChannelScale's forward written plainly, for the tests."""
    return x * a.reshape((1, -1) + (1,) * (x.ndim - 2))
