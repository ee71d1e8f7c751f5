"""A loss layer written in Python with numpy, in pycaffe's style (Caffe's examples/pycaffe/layers/pyloss.py
does the same): the Euclidean loss sum((a - b)^2) / (2 N) of the built-in EuclideanLoss layer.

net.prototxt uses it as
    layer { type: "Python" name: "loss" bottom: "pred" bottom: "target" top: "loss"
            python_param { module: "pyloss" layer: "EuclideanLossLayer" } loss_weight: 1 }
which imports this file by its module name: its folder must be on the Python path, e.g.
    PYTHONPATH=models/python_layer minicaffe train --solver models/python_layer/solver.prototxt
"""

import numpy as np

import minicaffe as caffe


class EuclideanLossLayer(caffe.Layer):
    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("needs two bottoms, the prediction and the target")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception(f"bottoms of {bottom[0].count} and {bottom[1].count} values: they must match")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)  # a - b, kept for backward
        top[0].reshape(1)  # the loss: one value

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        # As pycaffe's example, the top's diff (the loss weight) is taken to be 1.
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * self.diff / bottom[i].num
