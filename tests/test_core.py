"""Core engine: kernel loader, Blob, fillers, Net construction rules, GradientChecker, packaging."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.filler import FillerError, fill_array
from minicaffe.kernel import KernelError, KernelFile, parse_signatures
from minicaffe.layer import Layer, register
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, GradientCheckError, check_layer, layer_from_prototxt

REPO = Path(__file__).resolve().parents[1]


def net_from_text(text: str, phase=minicaffe.TEST, **kwargs) -> Net:
    return Net(io.parse_text(text, caffe_pb2.NetParameter()), phase, **kwargs)


# -- kernel loader --------------------------------------------------------------------------------

def test_parse_signatures_reads_kinds():
    source = """
    KERNEL void k1(const int n, const real* __restrict__ x, real* y, const real a, unsigned seed,
                   int* mask) {}
    KERNEL void k2(int n) {}
    """
    assert parse_signatures(source) == {
        "k1": ["int", "real*", "real*", "real", "uint", "int*"],
        "k2": ["int"],
    }


def test_parse_signatures_rejects_unknown_type():
    with pytest.raises(KernelError, match="unsupported parameter type"):
        parse_signatures("KERNEL void bad(const float* x) {}")


def test_kernel_checks_dtype_and_contiguity():
    relu = KernelFile("relu.cu")
    x = np.ones(8, np.float32)
    with pytest.raises(KernelError, match="all float32 or all float64"):
        relu.relu_forward(8, x, np.ones(8, np.float64), 0.0, extents=8)
    with pytest.raises(KernelError, match="C-contiguous"):
        relu.relu_forward(4, x[::2], np.ones(4, np.float32), 0.0, extents=4)
    with pytest.raises(KernelError, match="takes 4 arguments"):
        relu.launch("relu_forward", 8, 8, x)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([np.float32, np.float64, np.uint8, np.int32]),
       size=st.integers(0, 40), start=st.integers(0, 5))
def test_data_address_is_the_first_element(dtype, size, start):
    # kernel.data_address reads numpy's data pointer from the array object; it must be the address
    # __array_interface__ gives, for whole arrays, views at an offset and empty arrays alike.
    from minicaffe.kernel import _DATA_OFFSET, data_address
    base = np.zeros(size + start, dtype)
    for array in (base, base[start:], base.reshape(1, -1)[0, start:], base.view(np.uint8)):
        assert data_address(array) == array.__array_interface__["data"][0]
    assert sys.implementation.name != "cpython" or _DATA_OFFSET is not None  # the fast read is in use


def test_kernel_reads_data_at_an_offset_view():
    # A view's data starts inside its base: the launch must pass the view's start, not the base's.
    relu = KernelFile("relu.cu")
    x = np.array([-1, -2, 3, -4, 5, 6], np.float32)
    y = np.full(6, 9.0, np.float32)
    relu.relu_forward(3, x[2:5], y[1:4], 0.0, extents=3)
    np.testing.assert_array_equal(y, [9, 3, 0, 5, 9, 9])


def test_kernel_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICAFFE_CACHE_DIR", str(tmp_path))
    first = KernelFile("relu.cu").build_cpu("float")
    stamp = first.stat().st_mtime_ns
    second = KernelFile("relu.cu").build_cpu("float")
    assert first == second and second.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


def test_missing_compiler_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICAFFE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(KernelError, match="C\\+\\+ compiler"):
        KernelFile("relu.cu").build_cpu("double")


@pytest.mark.parametrize("source", sorted(p.name for p in (REPO / "kernels").glob("*.cu")))
def test_cpu_build_vectorizes_inner_loops(source):
    """Each kernel file's CPU build must vectorize at least one INNER_LOOP (gcc -fopt-info-vec says so).

    Per-element integer division, std::fmax/fmin or branches on possibly-trapping math keep GCC from
    vectorizing; a kernel file where nothing vectorizes has lost the plane/inner design."""
    from minicaffe.kernel import CPU_FLAGS, host_compiler, kernel_dir

    compiler = host_compiler()
    if "clang" in subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("vectorization report is read from GCC's -fopt-info-vec")
    result = subprocess.run(
        [compiler, *CPU_FLAGS, "-DMC_REAL=float", "-fopt-info-vec-optimized", "-I",
         str(kernel_dir()), "-x", "c++", str(kernel_dir() / source), "-o", "/dev/null"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "loop vectorized" in result.stderr, f"no loop of {source} vectorizes on the CPU"


# -- Blob -----------------------------------------------------------------------------------------

def test_blob_shapes_and_legacy_accessors():
    blob = Blob((2, 3, 4, 5))
    assert blob.count == 120 and blob.num_axes == 4
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 4, 5)
    assert blob.canonical_axis(-1) == 3
    assert blob.count_range(1) == 60
    blob.reshape(6, 20)
    assert blob.shape == (6, 20) and blob.height == 1
    with pytest.raises(ValueError, match="negative"):
        blob.reshape(-1, 2)


def test_blob_data_is_writable_and_shared():
    a, b = Blob((2, 3)), Blob((3, 2))
    a.data[...] = np.arange(6).reshape(2, 3)
    b.share_data(a)
    assert b.data.tolist() == [[0, 1], [2, 3], [4, 5]]
    b.data[0, 0] = 7
    assert a.data[0, 0] == 7
    with pytest.raises(ValueError, match="count"):
        Blob((5,)).share_data(a)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=4), double=st.booleans())
def test_blob_proto_round_trip(shape, double):
    dtype = np.float64 if double else np.float32
    blob = Blob(shape, dtype)
    blob.data[...] = np.random.default_rng(0).normal(size=shape)
    proto = blob.to_proto(write_diff=True)
    other = Blob((), dtype)
    other.from_proto(caffe_pb2.BlobProto.FromString(proto.SerializeToString()))
    assert other.shape == tuple(shape)
    np.testing.assert_array_equal(other.data, blob.data)


def test_blob_from_legacy_4d_proto():
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, data=[1, 2, 3, 4, 5, 6])
    blob = Blob((2, 3))
    blob.from_proto(proto, reshape=False)
    assert blob.data.tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match=r"file has \[1, 1, 2, 3\] but the net expects \[3, 2\]"):
        Blob((3, 2)).from_proto(proto, reshape=False)


# -- fillers --------------------------------------------------------------------------------------

def filler(**kwargs) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(**kwargs)


def test_fillers_follow_caffe():
    rng = np.random.default_rng(0)
    assert (fill_array((3,), filler(type="constant", value=2.5), rng) == 2.5).all()
    u = fill_array((1000,), filler(type="uniform", min=-2, max=3), rng)
    assert u.min() >= -2 and u.max() <= 3 and abs(u.mean() - 0.5) < 0.2
    g = fill_array((100, 100), filler(type="gaussian", mean=1, std=2), rng)
    assert abs(g.mean() - 1) < 0.1 and abs(g.std() - 2) < 0.1
    # xavier: uniform(+-sqrt(3/fan_in)), fan_in = count / num = 4*5*5.
    x = fill_array((50, 4, 5, 5), filler(type="xavier"), rng)
    assert np.abs(x).max() <= np.sqrt(3 / 100) and np.abs(x).max() > 0.9 * np.sqrt(3 / 100)
    m = fill_array((50, 4, 5, 5), filler(type="msra", variance_norm=caffe_pb2.FillerParameter.FAN_OUT), rng)
    assert abs(m.std() - np.sqrt(2 / (50 * 25))) < 0.01  # fan_out = count / channels
    ball = fill_array((4, 6), filler(type="positive_unitball"), rng)
    np.testing.assert_allclose(ball.sum(axis=1), 1.0)
    sparse = fill_array((10, 1000), filler(type="gaussian", sparse=2), rng)
    assert abs((sparse != 0).mean() - 0.2) < 0.02  # keep probability sparse / num_outputs


def test_bilinear_filler_hand_checked():
    weights = fill_array((1, 1, 4, 4), filler(type="bilinear"), np.random.default_rng(0))
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(weights[0, 0], np.outer(ramp, ramp))


def test_unknown_filler():
    with pytest.raises(FillerError, match="unknown filler type 'nope'"):
        fill_array((2,), filler(type="nope"), np.random.default_rng(0))


# -- GradientChecker on a user's own layer -------------------------------------------------------

@register("TestSquare")
class SquareLayer(Layer):
    """y = x^2 with a deliberately switchable wrong gradient (to prove the checker can fail)."""

    exact_num_bottom = exact_num_top = 1
    wrong = False

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        top[0].mutable_data()[...] = bottom[0].get_data() ** 2

    def backward(self, top, propagate_down, bottom):
        factor = 2.1 if self.wrong else 2.0
        bottom[0].mutable_diff()[...] = factor * bottom[0].get_data() * top[0].get_diff()


def test_gradient_checker_accepts_right_and_rejects_wrong_gradient():
    x = np.random.default_rng(1).normal(size=(2, 3))
    layer = layer_from_prototxt('type: "TestSquare"')
    check_layer(layer, [x], exhaustive=True)
    layer.wrong = True
    with pytest.raises(GradientCheckError, match="bottom 0 element"):
        check_layer(layer, [x])


def test_gradient_checker_eltwise_mode_on_relu():
    layer = layer_from_prototxt('type: "ReLU" relu_param { negative_slope: -0.3 }')
    x = np.random.default_rng(2).normal(size=(3, 4))
    bottom = [Blob(x.shape, np.float64)]
    bottom[0].data[...] = x
    GradientChecker(kink=0, kink_range=0.02).check_gradient_eltwise(layer, bottom, [Blob((), np.float64)])


# -- ReLU (the exemplar layer) --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_forward_hand_checked(dtype):
    net = net_from_text("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 } } }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "y" relu_param { negative_slope: 0.5 } }
    """, dtype=dtype)
    out = net.forward(x=np.array([[-2.0, -0.5, 0.0, 3.0]]))
    assert out["y"].dtype == dtype
    np.testing.assert_array_equal(out["y"], [[-1.0, -0.25, 0.0, 3.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("text, dx", [
    ('type: "ReLU"', [0.0, 0.0, 0.0, 4.0]),
    ('type: "ReLU" relu_param { negative_slope: 0.25 }', [1.0, 1.0, 1.0, 4.0]),
])
def test_relu_backward_at_zero_takes_the_negative_side(text, dx, in_place, dtype):
    """Caffe: dx = dy * ((x > 0) + negative_slope * (x <= 0)), so x == 0 (and -0) gets the slope."""
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = Blob((4,), dtype)
    bottom.data[...] = [-2.0, -0.0, 0.0, 3.0]
    top = bottom if in_place else Blob((), dtype)
    layer.setup([bottom], [top])
    layer.run_forward([bottom], [top])
    top.diff[...] = 4.0
    layer.run_backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, dx)


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.4])
def test_relu_in_place_equals_not_in_place(slope):
    x = np.random.default_rng(3).normal(size=(2, 3, 5))
    dy = np.random.default_rng(4).normal(size=x.shape)
    results = []
    for in_place in (False, True):
        layer = layer_from_prototxt(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}')
        bottom = Blob(x.shape, np.float64)
        bottom.data[...] = x
        top = bottom if in_place else Blob((), np.float64)
        layer.setup([bottom], [top])
        layer.run_forward([bottom], [top])
        y = np.array(top.data)
        top.diff[...] = dy
        layer.run_backward([top], [True], [bottom])
        results.append((y, np.array(bottom.diff)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    slope32 = float(np.float32(slope))  # the proto field is a float
    np.testing.assert_array_equal(results[0][1], np.where(x > 0, dy, slope32 * dy))


# -- Net construction -----------------------------------------------------------------------------

PHASED = """
name: "phased"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "staged" type: "ReLU" bottom: "x" top: "c" include { stage: "deploy" } }
layer { name: "not_level2" type: "ReLU" bottom: "x" top: "d" exclude { min_level: 2 } }
"""


def test_net_filters_layers_by_state():
    def names(net):
        return [n for n in net._layer_names if not n.endswith("_split")]

    assert names(net_from_text(PHASED, minicaffe.TRAIN)) == ["in", "train_only", "not_level2"]
    assert names(net_from_text(PHASED, minicaffe.TEST)) == ["in", "test_only", "not_level2"]
    staged = net_from_text(PHASED, minicaffe.TEST, stages=["deploy"], level=2)
    assert names(staged) == ["in", "test_only", "staged"]


def test_net_inserts_split_and_sums_gradients():
    net = net_from_text("""
        force_backward: true
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
        layer { name: "r1" type: "ReLU" bottom: "x" top: "y1" }
        layer { name: "r2" type: "ReLU" bottom: "x" top: "y2" relu_param { negative_slope: 0.5 } }
    """, dtype=np.float64)
    assert "x_in_0_split" in net._layer_names
    assert net.bottom_names[net._layer_names.index("r2")] == ["x_in_0_split_1"]
    net.forward(x=np.array([[-1.0, 2.0, -3.0]]))
    diffs = net.backward(y1=np.ones((1, 3)), y2=np.full((1, 3), 2.0))
    # d/dx = relu'(x) * 1 + leaky'(x) * 2
    np.testing.assert_allclose(diffs["x"], [[0 + 0.5 * 2, 1 + 2, 0 + 0.5 * 2]])


def test_net_in_place_consumer_of_split_blob():
    """x feeds a layer and is then overwritten in place: Caffe refuses this net; we run it."""
    net = net_from_text("""
        force_backward: true
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
        layer { name: "copy" type: "ReLU" bottom: "x" top: "y" }
        layer { name: "inplace" type: "ReLU" bottom: "x" top: "x" relu_param { negative_slope: 0.1 } }
        layer { name: "after" type: "ReLU" bottom: "x" top: "z" }
    """, dtype=np.float64)
    out = net.forward(x=np.array([[-1.0, 4.0]]))
    np.testing.assert_allclose(out["y"], [[0.0, 4.0]])
    np.testing.assert_allclose(out["z"], [[0.0, 4.0]])
    np.testing.assert_allclose(net.blobs["x"].data, [[-0.1, 4.0]])


@pytest.mark.parametrize("text, message", [
    ('layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }', "unknown bottom blob 'nope'"),
    ('layer { name: "r" type: "NoSuchLayer" }', "unknown type 'NoSuchLayer'"),
    ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
     'layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
     'layer { name: "b" type: "ReLU" bottom: "x" top: "y" }', "'y' is produced by two layers"),
    ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
     'layer { name: "r" type: "ReLU" bottom: "x" bottom: "x" top: "y" }', "takes 1 bottom"),
])
def test_net_errors_name_the_layer(text, message):
    with pytest.raises(NetError, match=message):
        net_from_text(text)


def test_prototxt_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  typo_field: 3\n}\n')
    with pytest.raises(io.FormatError, match=r"bad.prototxt:4:\d+: .*typo_field"):
        Net(str(path), minicaffe.TEST)


def test_legacy_net_input_becomes_input_layer():
    net = net_from_text("""
        input: "data" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
        layer { name: "r" type: "ReLU" bottom: "data" top: "data" }
    """)
    assert net.inputs == ["data"] and net.blobs["data"].shape == (2, 3, 4, 5)
    assert net.outputs == ["data"]


def test_v1_layers_are_upgraded():
    net = io.parse_text("""
        name: "old"
        input: "x" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 1
        layers { name: "r" type: RELU bottom: "x" top: "y" relu_param { negative_slope: 0.5 } }
    """, caffe_pb2.NetParameter())
    upgraded = Net(net, minicaffe.TEST)
    assert upgraded.layers[1].type == "ReLU"
    np.testing.assert_allclose(upgraded.forward(x=np.array([-2.0, 2.0]).reshape(1, 2, 1, 1))["y"].ravel(),
                               [-1.0, 2.0])


def test_pycaffe_constructor_forms(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }')
    assert Net(str(path), minicaffe.TEST).phase == minicaffe.TEST
    assert Net(str(path), phase=minicaffe.TRAIN).phase == minicaffe.TRAIN
    with pytest.raises(TypeError, match="phase"):
        Net(str(path))


# -- packaging: the kernel sources ship in the wheel ---------------------------------------------

@pytest.mark.slow
def test_wheel_ships_kernels_and_runs_from_it(tmp_path):
    """A non-editable install must carry kernels/*.cu; run a kernel from the unpacked wheel."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("minicaffe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("minicaffe/kernels/")}
    assert {p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".h")} <= shipped
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import numpy as np, minicaffe.kernel as k; import minicaffe;"
            "print(k.kernel_dir());"
            "x = np.array([-1., 2.], np.float32); y = np.empty_like(x);"
            "k.KernelFile('relu.cu').relu_forward(2, x, y, 0.5, extents=2); print(y.tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin",
                                               "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert str(site) in result.stdout and "[-0.5, 2.0]" in result.stdout
