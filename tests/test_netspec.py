"""NetSpec (pycaffe's net_spec): layers, params, naming and parameter routing."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe as caffe
from minicaffe import layers as L
from minicaffe import params as P
from minicaffe.net_spec import Function, NetSpecError, param_name_dict
from minicaffe.proto import caffe_pb2


def parse(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def test_brief_example_builds_the_expected_prototxt():
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[1, 3, 8, 8]), dict(dim=[1])], ntop=2)
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, weight_filler=dict(type="xavier"))
    n.relu = L.ReLU(n.conv, in_place=True)
    expected = parse("""
        layer { name: "data" type: "Input" top: "data" top: "label"
                input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
        layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
    """)
    assert n.to_proto() == expected


def test_param_routing_rules():
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[2, 1, 6, 6]), dict(dim=[2])], ntop=2)
    # `param` (ends in "param") goes to the LayerParameter; num_output/bias_term to convolution_param.
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3, bias_term=False,
                           param=[dict(lr_mult=1, decay_mult=1)], name="my_conv")
    n.pool = L.Pooling(n.conv, pool=P.Pooling.AVE, kernel_size=2, stride=2)
    n.pool2 = L.Pooling(n.conv, pool="MAX", kernel_size=2)  # enum by name
    n.prelu = L.PReLU(n.pool, channel_shared=True, filler=dict(type="constant", value=0.1))
    n.ip = L.InnerProduct(n.prelu, num_output=2, weight_filler=dict(type="gaussian", std=0.1),
                          transform_param=dict(scale=0.5))
    # loss_weight and include are not SoftmaxParameter/LossParameter fields: they go to the layer.
    n.loss = L.SoftmaxWithLoss(n.ip, n.label, loss_weight=2, include=dict(phase=caffe.TRAIN),
                               loss_param=dict(ignore_label=-1))
    net = n.to_proto()
    layers = {layer.name: layer for layer in net.layer}
    conv = layers["my_conv"]
    assert conv.top == ["conv"] and conv.bottom == ["data"]
    assert conv.convolution_param.num_output == 3 and conv.convolution_param.bias_term is False
    assert list(conv.convolution_param.kernel_size) == [3]  # repeated field from a scalar
    assert len(conv.param) == 1 and conv.param[0].lr_mult == 1
    assert layers["pool"].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert layers["pool2"].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    assert layers["prelu"].prelu_param.channel_shared is True
    assert layers["prelu"].prelu_param.filler.value == pytest.approx(0.1)
    assert layers["ip"].transform_param.scale == 0.5
    assert layers["ip"].inner_product_param.weight_filler.std == pytest.approx(0.1)
    loss = layers["loss"]
    assert list(loss.loss_weight) == [2.0]
    assert loss.include[0].phase == caffe.TRAIN
    assert loss.loss_param.ignore_label == -1
    assert loss.bottom == ["ip", "label"]


def test_automatic_names_and_free_function_to_proto():
    data = L.Input(shape=dict(dim=[1, 2]))
    top = L.ReLU(L.InnerProduct(data, num_output=3))
    net = caffe.to_proto(top)
    assert [layer.name for layer in net.layer] == ["Input1", "InnerProduct1", "ReLU1"]
    assert net.layer[2].bottom == ["InnerProduct1"] and net.layer[2].top == ["ReLU1"]
    assert top.to_proto() == net


def test_ntop_zero_and_tuples():
    n = caffe.NetSpec()
    n.a, n.b = L.Input(shape=dict(dim=[1, 2]), ntop=2)
    silence = L.Silence(n.a, n.b, ntop=0)
    assert isinstance(silence, Function)
    net = caffe.to_proto(n.a, n.b)
    assert [layer.type for layer in net.layer] == ["Input"]
    s = caffe.NetSpec()
    s.x = L.Input(shape=dict(dim=[1, 2]))
    assert "x" in s and s.keys() == ["x"] and s["x"] is s.x


def test_deconvolution_reads_convolution_param():
    assert param_name_dict()["Convolution"] == "convolution"
    assert param_name_dict()["InnerProduct"] == "inner_product"
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.up = L.Deconvolution(n.data, num_output=2, kernel_size=2, stride=2)
    assert n.to_proto().layer[1].convolution_param.num_output == 2


def test_errors():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.bad = L.InnerProduct(n.data, num_outputs=3)  # typo: no such field anywhere
    with pytest.raises(NetSpecError, match="num_outputs"):
        n.to_proto()
    with pytest.raises(TypeError, match="not a Top"):
        L.ReLU("data")
    with pytest.raises(TypeError, match="expected a layer's top"):
        n.x = 3
    with pytest.raises(AttributeError, match="no top named"):
        _ = n.missing
    m = caffe.NetSpec()
    m.data = L.Input(shape=dict(dim=[1, 2]))
    m.pool = L.Pooling(m.data, pool="MAXIMUM")
    with pytest.raises(NetSpecError, match="not one of"):
        m.to_proto()


def test_netspec_net_runs_and_matches_numpy():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ip = L.InnerProduct(n.data, num_output=4, weight_filler=dict(type="gaussian", std=0.5),
                          bias_filler=dict(type="constant", value=0.1))
    n.relu = L.ReLU(n.ip, in_place=True, negative_slope=0.5)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    x = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=np.float32)
    out = net.forward(data=x)["ip"]
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    y = x @ w.T + b
    np.testing.assert_allclose(out, np.where(y > 0, y, 0.5 * y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, 0.1)


def test_prototxt_round_trip(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 5, 5]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=1)
    path = tmp_path / "net.prototxt"
    path.write_text(n.to_prototxt())
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["conv"].shape == (1, 2, 5, 5)
    assert str(n.to_proto()) == n.to_prototxt()


def test_layer_type_list():
    types = caffe.layer_type_list()
    assert types == sorted(types) and {"Convolution", "PReLU", "Input", "Data"} <= set(types)
