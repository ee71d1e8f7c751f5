"""The public deploy nets of ../shared/models/zoo (skipped without them): each loads, runs forward and
backward with seeded random weights, round-trips through a .caffemodel bit for bit, and `minicaffe
summary` reports its output shape and the parameter count its paper / reference implementation has."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from minicaffe import TEST
from minicaffe.cli import main
from minicaffe.net import Net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nets as bench  # noqa: E402  (benchmarks/nets.py: seeded weights for deploy nets)

# name: (output blob, its shape at batch 1, trainable parameters (None: no published figure to check))
ZOO = {
    "AlexNet": ("prob", (1, 1000), 60_965_224),
    "SqueezeNet-v1.1": ("prob", (1, 1000, 1, 1), 1_235_496),
    "MobileNet-v1": ("prob", (1, 1000, 1, 1), 4_231_976),
    # torchvision's 25,557,032 plus the 64 biases of conv1, which the Caffe release has
    "ResNet-50": ("prob", (1, 1000), 25_557_096),
    "SphereFace-20": ("fc5", (1, 512), None),
}


def deploy(name: str) -> Path:
    return shared_data("models/zoo", f"{name}-deploy.prototxt") / f"{name}-deploy.prototxt"


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_backward_and_caffemodel_round_trip(name, tmp_path):
    output, shape, _ = ZOO[name]
    net = bench.zoo_net(deploy(name), batch=1, seed=3)
    rng = np.random.default_rng(4)
    data = rng.standard_normal(net.blobs["data"].shape).astype(np.float32)
    out = np.array(net.forward(data=data)[output])
    assert out.shape == shape and np.isfinite(out).all()
    if output == "prob":
        np.testing.assert_allclose(out.reshape(-1).sum(), 1.0, rtol=1e-4)
    diffs = net.backward(**{output: rng.standard_normal(shape).astype(np.float32)})
    assert np.isfinite(diffs["data"]).all() and np.abs(diffs["data"]).max() > 0
    for layer in net.layers:
        if layer.blobs and layer.type != "BatchNorm":  # BatchNorm's statistics have no gradient
            gradients = np.abs(np.array(layer.blobs[0].diff))
            assert np.isfinite(gradients).all() and gradients.max() > 0, layer.name

    model = tmp_path / f"{name}.caffemodel"
    net.save(model)
    loaded = Net(str(deploy(name)), weights=str(model), phase=TEST)
    for layer_name, blobs in net.params.items():
        for mine, theirs in zip(blobs, loaded.params[layer_name]):
            assert np.array_equal(mine.data, theirs.data), layer_name
    loaded.blobs["data"].reshape(net.blobs["data"].shape)
    loaded.reshape()
    again = np.array(loaded.forward(data=data)[output])
    assert np.array_equal(again, out)


@pytest.mark.parametrize("name", list(ZOO))
def test_summary_reports_shapes_and_parameters(name, capsys):
    output, shape, trainable = ZOO[name]
    assert main(["summary", "--model", str(deploy(name))]) == 0
    text = capsys.readouterr().out
    batch = Net(str(deploy(name)), TEST).blobs["data"].shape[0]
    dims = "x".join(str(d) for d in (batch,) + shape[1:])
    assert re.search(rf"^{output} \(\w+\) +{output} {dims} ", text, re.M), text[-2000:]
    counted = int(re.search(r"^Trainable params: ([\d,]+)$", text, re.M).group(1).replace(",", ""))
    if trainable is not None:
        assert counted == trainable
