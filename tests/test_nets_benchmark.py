"""benchmarks/nets.py: its PyTorch translation computes what the minicaffe net computes (so the timing
comparison is of the same net), and the script runs and reports minicaffe's column without PyTorch.

PyTorch is an optional peer of the benchmark, never a dependency of minicaffe nor installed by the test
extra: the translation tests skip without it; the script test runs with --no-torch either way."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data
from google.protobuf import text_format

from minicaffe.layer import TEST
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
TORCH_REASON = ("PyTorch is an optional peer of benchmarks/nets.py (never a dependency of minicaffe, not in "
                "the test extra); without it there is no translation to check")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_nets", REPO / "benchmarks" / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for markdown_section
    return module


bench = _bench()

# Layers and settings LeNet does not have: grouped strided convolution, BatchNorm + in-place Scale (fused
# into one torch BatchNorm2d), LRN with k != 1, padded AVE pooling whose last window hangs over the edge
# (Caffe's ceil rounding and its divisor, which counts the padding), padded MAX pooling, Concat, Eltwise
# with coefficients, a Scale after something else than a BatchNorm, PReLU, Dropout (TEST), Flatten,
# InnerProduct, Softmax.
SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "bn_scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "lrn" type: "LRN" bottom: "conv" top: "lrn"
        lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "ave" type: "Pooling" bottom: "lrn" top: "ave"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max" type: "Pooling" bottom: "lrn" top: "max"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "ave" bottom: "max" top: "cat" }
layer { name: "sum" type: "Eltwise" bottom: "cat" bottom: "cat" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "scale" type: "Scale" bottom: "sum" top: "sum" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "sum" top: "sum" }
layer { name: "drop" type: "Dropout" bottom: "sum" top: "sum" }
layer { name: "flat" type: "Flatten" bottom: "sum" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
force_backward: true
"""


def _deploy_inputs(net: Net) -> tuple[dict, dict]:
    rng = np.random.default_rng(3)
    inputs = {name: rng.standard_normal(net.blobs[name].shape, dtype=np.float32) for name in net.inputs}
    top_diffs = {name: rng.standard_normal(net.blobs[name].shape, dtype=np.float32) for name in net.outputs}
    return inputs, top_diffs


def test_translation_of_the_lenet_training_net_matches_and_a_changed_weight_is_caught():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    net = bench.lenet_solver().net
    assert [net.blobs[name].shape for name in net.inputs] == [(64, 1, 28, 28), (64,)]
    model = bench.translate(net, torch)
    rng = np.random.default_rng(0)
    inputs = {"data": rng.random((64, 1, 28, 28), dtype=np.float32),
              "label": rng.integers(0, 10, 64).astype(np.float32)}
    check = bench.compare(net, model, inputs, {}, input_grads=False)
    assert check["same"] and check["blob_rel"] < 1e-5 and check["grad_rel"] < 1e-5, check
    # every learnable parameter of the net has its torch counterpart (the optimizer steps all of them)
    assert {id(p.blob) for p in net.learnable_params} == {id(blob) for blob, _ in model.blob_params}

    with torch.no_grad():
        model.blob_params[0][1][0, 0, 0, 0] += 0.1  # conv1's weight: torch no longer runs the same net
    check = bench.compare(net, model, inputs, {}, input_grads=False)
    assert not check["same"] and check["blob_rel"] > 1e-3


def test_translation_of_layers_and_settings_beyond_lenet_matches():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    net = Net(text_format.Parse(SMALL_NET, caffe_pb2.NetParameter()), TEST)
    rng = np.random.default_rng(0)
    bench.randomize_weights(net, rng)
    bench.calibrate_batch_norm(net, rng)
    assert net.blobs["ave"].shape == (2, 4, 4, 4)  # ceil rounding: floor would give 3x3
    model = bench.translate(net, torch)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in model.modules.modules()) == 1
    inputs, top_diffs = _deploy_inputs(net)
    check = bench.compare(net, model, inputs, top_diffs, input_grads=True)
    assert check["same"] and check["blob_rel"] < 1e-5 and check["grad_rel"] < 1e-4, check


def test_translation_of_a_zoo_net_matches():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    name = bench.QUICK_ZOO_NET  # Split, Concat, Dropout, global pooling; the benchmark checks the others
    net = bench.zoo_net(shared_data("models/zoo", f"{name}-deploy.prototxt") / f"{name}-deploy.prototxt")
    model = bench.translate(net, torch)
    inputs, top_diffs = _deploy_inputs(net)
    check = bench.compare(net, model, inputs, top_diffs, input_grads=True)
    assert check["same"] and check["blob_rel"] < 1e-4, check


def test_script_without_torch_prints_minicaffes_column():
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENBLAS")}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nets.py"), "--quick", "--no-write",
                             "--no-torch"], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch: not used (--no-torch)" in out
    row = re.search(r"^LeNet-PReLU +SGD step \(fwd\+bwd\+update\), batch 64 +(\d+\.\d) +- ", out, re.M)
    assert row and float(row.group(1)) > 0, out
    assert "threads:" in out


def test_script_writes_its_section_only(tmp_path, capsys):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nSomeone else's section.\n")
    arguments = ["--quick", "--no-torch", "--nets", "lenet", "--output", str(target)]
    assert bench.main(arguments) == 0
    text = target.read_text()
    assert "Someone else's section." in text and text.count(bench.BEGIN) == 1
    assert re.search(r"^\| LeNet-PReLU \| SGD step .* \| \d+\.\d \| - \|", text, re.M), text
    assert "`python benchmarks/nets.py --quick --nets lenet`" in text
    bench.main(arguments)  # replaces, never appends
    assert target.read_text().count(bench.BEGIN) == 1
    assert bench.main(["--quick", "--no-torch", "--nets", "nosuchnet", "--no-write"]) == 1
    assert "unknown net(s) nosuchnet" in capsys.readouterr().err


def test_script_says_when_torch_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert bench.main(["--quick", "--nets", "lenet", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "torch: not used (PyTorch is not installed)" in out
    assert re.search(r"^LeNet-PReLU +SGD step .* batch 64 +\d+\.\d +- ", out, re.M), out


def test_pytorch_peer_runs_in_its_own_process_at_its_own_defaults(monkeypatch):
    pytest.importorskip("torch", reason=TORCH_REASON)
    from minicaffe import threads, timing

    monkeypatch.setattr(threads, "USER_WAIT_POLICY", None)  # as when the user set none: minicaffe's goes
    assert "OMP_WAIT_POLICY" not in timing.peer_environment()
    monkeypatch.setattr(threads, "USER_WAIT_POLICY", "active")  # the user's own setting is kept
    assert "OMP_WAIT_POLICY" in timing.peer_environment()
    peer = bench.Peer("lenet")
    try:
        seconds = peer()
        assert 0 < seconds < 60
    finally:
        peer.close()
    assert peer.process.returncode == 0
