"""Sizes are checked before anything is allocated (issue #9, item 1).

Every shape is counted with Python ints (an int64 product can wrap to a small or zero count), a layer
rejects geometry that does not fit before it creates its weights, an allocation larger than the free
memory is refused with an error naming the layer, the shape and the bytes, and a degenerate filler is
an error naming the layer and the filler. The examples of the issue are here as regression tests, in
process and through the CLI.

The tests that could allocate if the check regressed run under a memory limit (RLIMIT_AS: the
`memory_cap` fixture in process, a preexec_fn in a subprocess), so a regression fails with a
MemoryError instead of eating the machine's memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from minicaffe import backend
from minicaffe.blob import CHECK_MEMORY_FROM_BYTES, Blob, BlobSizeError
from minicaffe.filler import FillerError, fill_array
from minicaffe.io import parse_text
from minicaffe.layer import Layer, LayerError
from minicaffe.net import TEST, Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import layer_from_prototxt

resource = pytest.importorskip("resource")
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
CAP_BYTES = 1 << 30  # what a capped test may take on top of what the process maps already


def mapped_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def memory_cap():
    """This process's address space limited to what it maps now plus CAP_BYTES while the test runs (the
    soft limit only, restored afterwards)."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs Linux's /proc")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped_bytes() + CAP_BYTES
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def input_layer(*dims: int, name: str = "data") -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def conv(params: str) -> str:
    return input_layer(1, 1, 12, 12) + ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                                         f'convolution_param {{ num_output: 2 {params} }} }}\n')


def pool(params: str) -> str:
    return input_layer(1, 1, 12, 12) + ('layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
                                         f'pooling_param {{ {params} }} }}\n')


def filled_conv(filler: str, channels: int = 0) -> str:
    return input_layer(1, channels, 12, 12) + (
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        f'convolution_param {{ num_output: 2 kernel_size: 3 weight_filler {{ type: "{filler}" }} }} }}\n')


# name: (prototxt, what the one-line error must say)
HUGE = {
    "input_1000^4": (input_layer(1000, 1000, 1000, 1000),
                     ["layer 'data' (Input)", "[1000, 1000, 1000, 1000]", "4000000000000 bytes"]),
    "inner_product_num_output_1e9": (
        input_layer(1, 1, 12, 12) + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                                    'inner_product_param { num_output: 1000000000 } }',
        # 144e9 weights, 4 bytes each plus the filler's 8 (float64 on the host)
        ["layer 'ip' (InnerProduct)", "parameter blob 0 of shape [1000000000, 144]", "1728000000000 bytes"]),
    "conv_kernel_100000_on_12x12": (
        conv("kernel_size: 100000"),
        ["layer 'conv' (Convolution)", "kernel [100000, 100000]", "larger than the padded input",
         "bottom shape [1, 1, 12, 12]", "pad [0, 0]"]),
    "conv_kernel_4294967295_xavier": (
        conv('kernel_size: 4294967295 weight_filler { type: "xavier" }'),
        ["layer 'conv' (Convolution)", "kernel [4294967295, 4294967295]", "bottom shape [1, 1, 12, 12]"]),
    "conv_pad_4294967295": (
        conv("kernel_size: 3 pad: 4294967295"),
        ["layer 'conv' (Convolution)", "top (bottom shape [1, 1, 12, 12], kernel [3, 3], pad [4294967295, "
         "4294967295], stride [1, 1], dilation [1, 1]) of shape [1, 2, 8589934600, 8589934600] needs "
         "590295811458217280000 bytes"]),
    "pool_pad_4294967295": (pool("kernel_size: 3 pad: 4294967295"),
                            ["layer 'pool' (Pooling)", "pad must be less than kernel"]),
    "pool_kernel_and_pad_huge": (
        pool("kernel_size: 4294967295 pad: 4294967294"),  # Caffe divides in float32: 2^32 + 1 rows
        ["layer 'pool' (Pooling)", "[1, 1, 4294967297, 4294967297]", "bytes",
         "bottom shapes [[1, 1, 12, 12]]"]),
    "pool_kernel_4294967295": (pool("kernel_size: 4294967295"),
                               ["layer 'pool' (Pooling)", "kernel 4294967295x4294967295", "[1, 1, 12, 12]"]),
    "xavier_no_input_channels": (filled_conv("xavier"),
                                 ["layer 'conv' (Convolution)", "parameter blob 0", "xavier filler",
                                  "[2, 0, 3, 3]", "fan_in 0"]),
    "msra_no_input_channels": (filled_conv("msra"),
                               ["layer 'conv' (Convolution)", "msra filler", "[2, 0, 3, 3]", "fan_in 0"]),
    "dim_negative": (input_layer(1, -1, 12, 12), ["layer 'data' (Input)", "[1, -1, 12, 12]", "negative"]),
    # int64 products: np.prod gives 0 for these two dims, and a 'cannot reshape' error followed.
    "dims_wrapping_int64": (input_layer(4294967296, 4294967296, 1, 1),
                            ["layer 'data' (Input)", "[4294967296, 4294967296, 1, 1]",
                             "73786976294838206464 bytes"]),
    "dim_int64_max": (input_layer(1, 2 ** 63 - 1, 12, 12),
                      ["layer 'data' (Input)", "[1, 9223372036854775807, 12, 12]", "bytes"]),
    "dummy_data_huge": (
        'layer { name: "dummy" type: "DummyData" top: "x" dummy_data_param { '
        'shape { dim: 1000000 dim: 1000000 } data_filler { type: "gaussian" } } }',
        ["layer 'dummy' (DummyData)", "top 0 of shape [1000000, 1000000]", "12000000000000 bytes"]),
    # Under the 1 GiB cap each 600 MB input fits, their concatenation does not.
    "concat_of_inputs_that_fit": (
        input_layer(1, 150000000, name="a") + input_layer(1, 150000000, name="b") +
        'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }',
        ["layer 'cat' (Concat)", "[1, 300000000]", "1200000000 bytes", "bottom shapes [[1, 150000000], "]),
}


def build(text: str, **kwargs) -> Net:
    return Net(parse_text(text, caffe_pb2.NetParameter()), TEST, **kwargs)


@pytest.mark.parametrize("name", HUGE)
def test_huge_sizes_fail_before_allocation_naming_layer_shape_bytes(name, memory_cap, monkeypatch):
    text, expected = HUGE[name]
    created = []
    add_param_blob = Layer.add_param_blob
    monkeypatch.setattr(Layer, "add_param_blob",
                        lambda self, shape: created.append(list(shape)) or add_param_blob(self, shape))
    with pytest.raises(NetError) as info:
        build(text)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)
    # Nothing large was created (let alone filled) before the check: a few small weights at most.
    assert all(np.prod(shape, dtype=object) < 1000 for shape in created), created


@pytest.mark.parametrize("name", ["conv_kernel_100000_on_12x12", "conv_kernel_4294967295_xavier",
                                  "conv_pad_4294967295"])
def test_geometry_is_checked_before_the_weights_are_made(name, monkeypatch):
    """A kernel that does not fit, or a top too large: Convolution fails in layer_setup before
    setup_params runs (it used to allocate and fill the weights first)."""
    monkeypatch.setattr(Layer, "setup_params", lambda *args: pytest.fail("weights made before the check"))
    with pytest.raises(NetError, match="kernel"):
        build(HUGE[name][0])


# -- Blob ---------------------------------------------------------------------------------------------

def test_counts_are_exact_python_ints():
    blob = Blob((0, 2 ** 40, 2 ** 40))  # no values, so no memory: allowed
    assert blob.count == 0
    assert blob.count_range(1) == 2 ** 80  # an int64 product wraps to 0
    assert type(blob.count_range(1)) is int
    blob.reshape(3, 4)
    assert (blob.count, blob.data.shape) == (12, (3, 4))


@pytest.mark.parametrize("shape, message", [
    ((2, -1), r"blob shape \[2, -1\] has a negative dimension"),
    ((2, 2.5), "not an integer"),
    ((2 ** 64, 0), "above 2\\^63 - 1"),
])
def test_bad_dims_are_clear_errors(shape, message):
    with pytest.raises(BlobSizeError, match=message):
        Blob(shape)


def test_wrapping_dims_in_a_blobproto(memory_cap):
    """A caffemodel's BlobShape dims are int64: a product that wraps is refused, naming the bytes."""
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([2 ** 32, 2 ** 32])
    with pytest.raises(BlobSizeError, match=r"^layer 'ip' blob 0: blob of shape \[4294967296, 4294967296\] "
                                            r"needs 73786976294838206464 bytes"):
        Blob().from_proto(proto, where="layer 'ip' blob 0")
    proto.shape.dim[:] = [3, -2]
    with pytest.raises(BlobSizeError, match=r"^blob: blob shape \[3, -2\] has a negative dimension"):
        Blob().from_proto(proto)


def test_wrapping_dims_of_blobs_given_in_the_prototxt(memory_cap):
    text = input_layer(1, 3) + ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                                'inner_product_param { num_output: 2 } '
                                'blobs { shape { dim: 4294967296 dim: 4294967296 } } }')
    with pytest.raises(ValueError, match=r"layer 'ip' blob 0: blob of shape \[4294967296, 4294967296\] needs "
                                         r"73786976294838206464 bytes"):
        build(text)


def test_memory_check_threshold_and_message(monkeypatch):
    free = 100 << 20
    reads = []
    monkeypatch.setattr(backend, "host_free_memory", lambda: reads.append(1) or free)
    with pytest.raises(BlobSizeError) as info:
        Blob((32 << 20,))  # 128 MiB of float32
    assert str(info.value) == ("blob of shape [33554432] needs 134217728 bytes (128.0 MiB), more than the "
                               "104857600 bytes (100.0 MiB) of host memory available")
    blob = Blob((16 << 20,))  # 64 MiB: checked, fits
    assert reads == [1, 1]
    blob.reshape(4 << 20, 4)  # same count: no new memory, nothing to check
    assert reads == [1, 1]
    free = 1 << 20
    small = Blob((CHECK_MEMORY_FROM_BYTES // 4 - 1,))  # below the threshold: not checked (no syscall)
    assert reads == [1, 1] and small.count == CHECK_MEMORY_FROM_BYTES // 4 - 1


def test_gpu_mode_checks_the_gpu_memory(monkeypatch):
    monkeypatch.setattr(backend, "on_gpu", lambda: True)
    monkeypatch.setattr(backend, "device_free_memory", lambda: 100 << 20)
    monkeypatch.setattr(backend, "host_free_memory", lambda: 1 << 40)
    with pytest.raises(BlobSizeError, match=r"134217728 bytes \(128.0 MiB\), more than the 104857600 bytes "
                                            r"\(100.0 MiB\) of GPU memory available"):
        Blob((32 << 20,))


def test_free_memory_is_the_hosts_in_cpu_mode(monkeypatch):
    if os.path.exists("/proc/meminfo"):
        assert backend.host_free_memory() > 0
    monkeypatch.setattr(backend, "host_free_memory", lambda: 12345)
    monkeypatch.setattr(backend, "device_free_memory", lambda: pytest.fail("CPU mode asked the GPU"))
    assert backend.free_memory() == 12345


@pytest.mark.parametrize("layout", ["v2", "v1", "v2 without a limit"])
def test_cgroup_limit_counts_as_free_memory(layout, tmp_path):
    """A container's MemAvailable is the host's; its cgroup's limit less the usage (less the file cache
    that can be dropped) is what it may still take."""
    if layout == "v1":
        folder = tmp_path / "memory"
        files = {"memory.limit_in_bytes": "1000000", "memory.usage_in_bytes": "600000",
                 "memory.stat": "cache 7\ntotal_inactive_file 100000"}
    else:
        folder = tmp_path
        files = {"memory.max": "max" if "without" in layout else "1000000", "memory.current": "600000",
                 "memory.stat": "anon 5\ninactive_file 100000"}
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")
    expected = None if "without" in layout else 1000000 - (600000 - 100000)
    assert backend._cgroup_headroom(str(tmp_path)) == expected


@linux_only
def test_rlimit_as_counts_as_free_memory(memory_cap):
    assert backend.host_free_memory() <= CAP_BYTES


def test_allocation_failure_is_an_error_naming_the_layer(memory_cap, monkeypatch):
    """When the free memory is unknown the reshape passes; the allocation itself then fails (here on the
    address space limit) with an error naming the layer, not a MemoryError."""
    monkeypatch.setattr(backend, "host_free_memory", lambda: None)
    blob = Blob((1 << 29,))  # 2 GiB of float32
    with pytest.raises(BlobSizeError, match=r"out of host memory: cannot allocate 536870912 float32 values, "
                                            r"2147483648 bytes \(2.0 GiB\)"):
        blob.data  # noqa: B018 -- the first use allocates
    net = build(input_layer(1, 1 << 29) + 'layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }')
    with pytest.raises(NetError, match=r"layer 'relu' \(ReLU\): out of host memory.*2147483648 bytes"):
        net.forward()


def test_scratch_buffers_are_checked(monkeypatch):
    """The im2col buffer of one 64x64x64 image with a 9x9 kernel is 85 MiB; with less free it is refused
    at forward, naming the layer and the buffer."""
    net = build(input_layer(1, 64, 64, 64) + 'layer { name: "conv" type: "Convolution" bottom: "data" '
                'top: "conv" convolution_param { num_output: 2 kernel_size: 9 pad: 4 } }')
    monkeypatch.setattr(backend, "host_free_memory", lambda: 70 << 20)
    with pytest.raises(NetError, match=r"layer 'conv' \(Convolution\): buffer 'columns' of shape "
                                       r"\[21233664\] needs 84934656 bytes"):
        net.forward()
    monkeypatch.setattr(backend, "host_free_memory", lambda: 1 << 30)
    net.forward()


# -- fillers ------------------------------------------------------------------------------------------

def filler(**kwargs) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(**kwargs)


@pytest.mark.parametrize("shape, param, message", [
    ((2, 0, 3, 3), filler(type="xavier"), r"xavier filler cannot fill a blob with no values .*fan_in 0"),
    ((0, 3), filler(type="msra"), r"msra filler .*fan_in 0, fan_out 0"),
    ((0, 4), filler(type="positive_unitball"), "positive_unitball filler cannot fill"),
    ((3,), filler(type="uniform", min=1, max=0),
     r"uniform filler needs finite min <= max, got min 1.0, max 0.0"),
    ((3,), filler(type="uniform", min=0, max=float("inf")), "uniform filler needs finite min <= max"),
    ((3,), filler(type="gaussian", std=-1), r"gaussian filler needs .* std > 0, got mean 0.0, std -1.0"),
    ((3,), filler(type="gaussian", std=0), "std > 0"),  # Caffe: CHECK_GT(sigma, 0)
    ((3,), filler(type="gaussian", std=float("nan")), "std > 0"),
    ((3,), filler(type="gaussian", sparse=-2), "sparse must be -1"),
    ((1, 1, 3, 4), filler(type="bilinear"), "square kernels"),
    ((3,), filler(type="nope"), "unknown filler type 'nope'"),
])
def test_degenerate_fillers_are_clear_errors(shape, param, message):
    with pytest.raises(FillerError, match=message):
        fill_array(shape, param, np.random.default_rng(0))


@pytest.mark.parametrize("param", [filler(type="constant", value=1), filler(type="uniform"),
                                   filler(type="gaussian", sparse=3), filler(type="bilinear")])
def test_empty_blobs_fill_quietly(param):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = fill_array((0, 2, 3, 3), param, np.random.default_rng(0))
    assert values.shape == (0, 2, 3, 3)


def test_filler_error_names_the_layer_and_the_filler():
    layer = layer_from_prototxt('name: "ip" type: "InnerProduct" inner_product_param { num_output: 2 '
                                'weight_filler { type: "gaussian" std: -1 } }')
    with pytest.raises(LayerError, match=r"layer 'ip' \(InnerProduct\): parameter blob 0: gaussian filler "
                                         r"needs .* std -1.0"):
        layer.setup([Blob((1, 3))], [Blob()])


# -- LRN: a huge local_size ---------------------------------------------------------------------------

LRN_SCRIPT = """
import numpy as np
from minicaffe.testing import layer_from_prototxt
from minicaffe.blob import Blob
x = np.arange(1, 2 * 3 * 4 * 5 + 1, dtype=np.float64).reshape(2, 3, 4, 5) / 100
for region, window_sum in (("ACROSS_CHANNELS", lambda s: s.sum(axis=1, keepdims=True)),
                           ("WITHIN_CHANNEL", lambda s: s.sum(axis=(2, 3), keepdims=True))):
    size = 4294967295
    alpha = float(size) if region == "ACROSS_CHANNELS" else float(size) ** 2  # mult = alpha / size(^2) = 1
    layer = layer_from_prototxt(f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: 0.75 '
                                f'k: 1 norm_region: {region} }}')
    bottom, top = [Blob(x.shape, np.float64)], [Blob((), np.float64)]
    bottom[0].data[...] = x
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    expected = x * (1 + layer.mult * window_sum(x * x)) ** -0.75
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-6)
    print(region, "ok")
"""


def test_lrn_with_a_huge_local_size_finishes():
    """local_size 4294967295 (odd, so valid): the window covers every channel (or pixel). The kernels
    loop over the window with ints; the layer clips it to the axis, else the loop never ends."""
    result = subprocess.run([sys.executable, "-c", LRN_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ACROSS_CHANNELS", "ok", "WITHIN_CHANNEL", "ok"]


# -- through the CLI, under a memory limit -------------------------------------------------------------

CLI_LIMIT_BYTES = 2 << 30


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CLI_LIMIT_BYTES, CLI_LIMIT_BYTES))


def one_line_error(code: int, err: str) -> bool:
    return code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@linux_only
@pytest.mark.parametrize("command, name", [
    ("time", "input_1000^4"),
    ("summary", "inner_product_num_output_1e9"),
    ("time", "conv_kernel_100000_on_12x12"),
    ("time", "xavier_no_input_channels"),
    ("summary", "dims_wrapping_int64"),
])
def test_cli_one_line_error_under_a_memory_limit(command, name, tmp_path):
    text, expected = HUGE[name]
    model = tmp_path / "net.prototxt"
    model.write_text(textwrap.dedent(text))
    args = [command, "--model", str(model)] + (["--iterations", "1"] if command == "time" else [])
    result = subprocess.run([sys.executable, "-m", "minicaffe.cli", *args], capture_output=True, text=True,
                            timeout=300, preexec_fn=limit_memory)
    assert one_line_error(result.returncode, result.stderr), result.stderr
    assert result.stderr.startswith(f"minicaffe {command}: error: ")
    for part in expected:
        assert part in result.stderr, (part, result.stderr)


def test_huge_blob_given_in_the_prototxt_is_a_net_error():
    """A parameter blob written into the prototxt itself (LayerParameter.blobs) too large for memory: a
    NetError naming the net and the layer, as for every other bad layer definition."""
    from minicaffe import io
    from minicaffe.net import Net, NetError
    from minicaffe.proto import caffe_pb2

    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "p" type: "PReLU" bottom: "x" top: "y" blobs { shape { dim: 100000000000 } } }')
    with pytest.raises(NetError, match=r"layer 'p' blob 0: blob of shape \[100000000000\] needs"):
        Net(io.parse_text(text, caffe_pb2.NetParameter(), "<t>"), 1)
