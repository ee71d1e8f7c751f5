"""minicaffe registers every layer type of BVLC Caffe's layer factory (the REGISTER_LAYER_CLASS and
REGISTER_LAYER_CREATOR names in BVLC/caffe's src/caffe/layers, master), so any prototxt Caffe runs
names types that exist here."""

from __future__ import annotations

import minicaffe

BVLC_LAYER_TYPES = (
    "AbsVal Accuracy ArgMax BNLL BatchNorm BatchReindex Bias Clip Concat ContrastiveLoss Convolution Crop "
    "Data Deconvolution Dropout DummyData ELU Eltwise Embed EuclideanLoss Exp Filter Flatten HDF5Data "
    "HDF5Output HingeLoss Im2col ImageData InfogainLoss InnerProduct Input LRN LSTM LSTMUnit Log MVN "
    "MemoryData MultinomialLogisticLoss PReLU Parameter Pooling Power Python RNN ReLU Reduction Reshape "
    "SPP Scale Sigmoid SigmoidCrossEntropyLoss Silence Slice Softmax SoftmaxWithLoss Split Swish TanH "
    "Threshold Tile WindowData"
).split()


def test_every_bvlc_layer_type_is_registered():
    assert len(BVLC_LAYER_TYPES) == 61
    missing = [name for name in BVLC_LAYER_TYPES if name not in minicaffe.LAYERS]
    assert not missing, f"BVLC layer types minicaffe lacks: {missing}"


def test_layer_type_list_lists_them():
    assert set(BVLC_LAYER_TYPES) <= set(minicaffe.layer_type_list())
