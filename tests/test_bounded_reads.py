"""Bounded reads and the other input checks of issue #9 that concern files and nets (items 2, 4, 7):
every file is read through minicaffe.files.open_file (a regular file within protobuf's 2 GB, named
in every error), text prototxt is read as bytes, encoded images have a pixel cap, IDX headers and
training logs are checked with the file (and line) named, net building is linear in the number of
layers, and weights that match no layer are reported."""

from __future__ import annotations

import gzip
import io as pyio
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import numpy as np
import pytest
from fuzzing import png_bomb

import minicaffe
from minicaffe import datasets, io, log
from minicaffe.caffe_io import load_image
from minicaffe.cli import main
from minicaffe.data_transformer import DataTransformer
from minicaffe.files import PROTOBUF_LIMIT, excerpt, open_file, read_file
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
INPUT = 'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }\n'
NET = 'name: "small"\n' + INPUT + (
    'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n')


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of `minicaffe ARGV`, checking that a failure is one line, no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 1 and "Traceback" not in err, err
        assert err.strip().count("\n") == 0 or all(line.startswith(("I", "W")) for line in
                                                   err.strip().splitlines()[:-1]), err
    return code, err


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def finishes(function, seconds: float = 20.0):
    """The result (or raised error) of function(), failing the test if it blocks."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- the one reader: regular files within the limit ---------------------------------------------------

@pytest.mark.parametrize("special, kind", [("/dev/zero", "character device"),
                                           ("/dev/urandom", "character device")])
def test_devices_are_refused_before_reading(special, kind):
    if not os.path.exists(special):
        pytest.skip(f"no {special}")
    for read in (lambda: read_file(special), lambda: io.read_net_param(special),
                 lambda: io.read_binary(special, caffe_pb2.NetParameter())):
        with pytest.raises(io.FormatError, match=f"^{special}: cannot read: it is a {kind}, not a regular"):
            finishes(read)


def test_a_fifo_is_refused_without_blocking(fifo):
    # Opening a FIFO for reading waits for a writer; none comes, so a plain open() would hang here.
    with pytest.raises(io.FormatError, match=f"{fifo}: cannot read: it is a FIFO, not a regular file"):
        finishes(lambda: read_file(fifo))


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(io.FormatError, match=f"{tmp_path}: cannot read: it is a folder, not a regular file"):
        io.read_binary(tmp_path, caffe_pb2.NetParameter())


def test_missing_file_names_the_file_and_errno(tmp_path):
    with pytest.raises(io.FormatError, match=r"missing\.caffemodel: cannot read \(No such file or direc"):
        io.read_binary(tmp_path / "missing.caffemodel", caffe_pb2.NetParameter())


def test_file_names_are_escaped_in_errors(tmp_path):
    with pytest.raises(io.FormatError, match=r"a\\x00b: cannot read \(a file name cannot hold a NUL byte\)$"):
        read_file(str(tmp_path / "a\0b"))
    with pytest.raises(io.FormatError) as error:
        read_file(tmp_path / "\x1b[2Jname")
    assert "\x1b" not in str(error.value) and "\\x1b[2Jname: cannot read (No such file" in str(error.value)


def test_size_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    assert read_file(path, limit=11) == b"x" * 11
    with pytest.raises(io.FormatError, match=r"f: cannot read: 11 bytes, more than the limit of 10 bytes"):
        read_file(path, limit=10)
    with open_file(path, limit=None) as f:
        assert f.read() == b"x" * 11


def test_files_over_protobufs_2gb_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.caffemodel"
    with open(big, "wb") as f:
        f.truncate(PROTOBUF_LIMIT + 1)  # sparse: no disk space, no memory
    assert PROTOBUF_LIMIT == 2**31 - 1
    with pytest.raises(io.FormatError, match=r"big\.caffemodel: cannot read: 2147483648 bytes, more than"):
        io.read_binary(big, caffe_pb2.NetParameter())


# -- text prototxt: bytes as Caffe reads them; errors name the place, not the content --------------

def test_non_utf8_byte_in_a_comment_is_fine(tmp_path):
    path = tmp_path / "latin1.prototxt"
    path.write_bytes(b'name: "small" # caf\xe9 (latin-1)\n' + INPUT.encode())
    param = io.read_net_param(path)
    assert param.name == "small" and [layer.name for layer in param.layer] == ["data"]
    assert Net(str(path), minicaffe.TEST).blobs["x"].shape == (1, 3)


def test_non_utf8_byte_in_a_string_value_names_the_line(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_bytes(INPUT.encode() + b'name: "caf\xe9"\n')
    with pytest.raises(io.FormatError, match=r"bad\.prototxt:2:7: a string value holds bytes that are not"):
        io.read_net_param(path)


def test_binary_file_as_prototxt(tmp_path):
    path = tmp_path / "model.prototxt"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00garbage")
    with pytest.raises(io.FormatError, match=r"model\.prototxt: not a text prototxt \(it holds NUL bytes"):
        io.read_net_param(path)


def test_parse_errors_do_not_echo_the_file(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    with pytest.raises(io.FormatError) as error:
        io.read_net_param(passwd)
    message = str(error.value)
    assert message.startswith(f"{passwd}:1:1: ") and "root:x:0:0" not in message and "daemon" not in message

    secret = "s3cret-" * 40
    quoted = tmp_path / "quoted.prototxt"
    quoted.write_text(f'"{secret}\x1b[2J"\n')
    with pytest.raises(io.FormatError) as error:
        io.read_net_param(quoted)
    message = str(error.value)
    assert message.startswith(f"{quoted}:1:1: ")
    assert secret not in message and "\x1b" not in message and len(message) < len(str(quoted)) + 250


def test_excerpt_escapes_and_cuts():
    assert excerpt("abc") == "abc"
    assert excerpt("a\x1b[31mb\n") == "a\\x1b[31mb\\n"
    assert excerpt("x" * 50) == "x" * 32 + "..."
    assert excerpt("caf\udce9") == "caf\\udce9"


def test_model_from_dev_zero_and_a_folder_via_cli(capsys, tmp_path):
    code, err = cli(capsys, "summary", "--model", "/dev/zero")
    assert code == 1 and "/dev/zero: cannot read: it is a character device" in err
    code, err = cli(capsys, "summary", "--model", tmp_path)
    assert code == 1 and "it is a folder, not a regular file" in err


def test_weights_folder_is_not_reported_as_not_found(capsys, tmp_path):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    for command in (["params", "--model", model], ["test", "--model", model, "--iterations", "1"]):
        code, err = cli(capsys, *command, "--weights", tmp_path)
        assert code == 1 and f"{tmp_path}: cannot read: it is a folder" in err and "not found" not in err


def test_solver_folder_is_not_reported_as_not_found(capsys, tmp_path):
    code, err = cli(capsys, "train", "--solver", tmp_path)
    assert code == 1 and f"{tmp_path}: cannot read: it is a folder" in err and "not found" not in err


def test_params_weights_fifo_does_not_block(fifo):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "minicaffe.cli", "params", "--weights", str(fifo)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and f"{fifo}: cannot read: it is a FIFO" in done.stderr, done.stderr


# -- other readers: mean_file, HDF5 lists, images ---------------------------------------------------

def test_mean_file_from_a_device_is_refused():
    param = caffe_pb2.TransformationParameter(mean_file="/dev/urandom")
    with pytest.raises(io.FormatError, match="/dev/urandom: cannot read: it is a character device"):
        finishes(lambda: DataTransformer(param, minicaffe.TRAIN))


def test_hdf5_source_list_and_files_must_be_regular(tmp_path, fifo):
    layer = ('layer {{ name: "h" type: "HDF5Data" top: "data" '
             'hdf5_data_param {{ source: "{}" batch_size: 1 }} }}')
    with pytest.raises(NetError, match=f"cannot read source list: {fifo}: cannot read: it is a FIFO"):
        finishes(lambda: Net(caffe_pb2.NetParameter(layer=[_layer(layer.format(fifo))]), minicaffe.TRAIN))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n")
    with pytest.raises(NetError, match=f"cannot read HDF5 file {fifo}.*it is a FIFO"):
        finishes(lambda: Net(caffe_pb2.NetParameter(layer=[_layer(layer.format(listing))]), minicaffe.TRAIN))


def test_hdf5_dataset_over_the_blob_limit_is_refused_before_loading(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "big.h5", "w") as f:
        # Declared, never written: chunked storage takes no space until written.
        f.create_dataset("data", shape=(2**31, 1), dtype="u1", chunks=(1024, 1))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'big.h5'}\n")
    text = (f'layer {{ name: "h" type: "HDF5Data" top: "data" '
            f'hdf5_data_param {{ source: "{listing}" batch_size: 1 }} }}')
    with pytest.raises(NetError, match=r"dataset 'data' in .*big\.h5 has shape \[2147483648, 1\]: more than "
                                       r"2147483647 values"):
        Net(caffe_pb2.NetParameter(layer=[_layer(text)]), minicaffe.TRAIN)


def _layer(text: str) -> caffe_pb2.LayerParameter:
    return io.parse_text(text, caffe_pb2.NetParameter()).layer[0]


def test_load_image_reads_through_the_bounded_reader(fifo):
    with pytest.raises(io.FormatError, match="it is a FIFO"):
        finishes(lambda: load_image(str(fifo)))


def test_decompression_bomb_in_encoded_datums(tmp_path):
    """16 encoded PNG Datums of 12000x12000 (144M pixels each, ~140 KB encoded): refused before any is
    decoded, with the database and the key named."""
    bomb = png_bomb(12000, 12000)
    assert len(bomb) < 1_000_000
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(16):
            txn.put(b"%08d" % i, caffe_pb2.Datum(data=bomb, encoded=True, label=i).SerializeToString())
    env.close()
    param = caffe_pb2.NetParameter()
    source = tmp_path / "db"
    param.layer.append(_layer(f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
                              f'data_param {{ source: "{source}" batch_size: 16 backend: LMDB }} }}'))
    with pytest.raises(NetError, match=r"db record 00000000: the encoded image is 12000x12000 pixels, more "
                                       r"than Pillow's limit of \d+ \(Image.MAX_IMAGE_PIXELS\)"):
        Net(param, minicaffe.TRAIN)


def test_pixel_cap_follows_pillows_setting(monkeypatch):
    from PIL import Image

    from minicaffe.db import DBError, decode_image

    image = png_bomb(40, 30)
    assert decode_image(image).shape == (1, 30, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1199)
    with pytest.raises(DBError, match="key 7: the encoded image is 40x30 pixels, more than .* of 1199"):
        decode_image(image, where="key 7")


# -- IDX files --------------------------------------------------------------------------------------

def idx(dims: list[int], data: bytes = b"", ndim: int | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims) if ndim is None else ndim])
    return header + b"".join(struct.pack(">I", d) for d in dims) + data


@pytest.mark.parametrize("content, message", [
    # 2^32-1 cubed wraps to a small number in int64 arithmetic; Python ints do not wrap.
    (idx([2**32 - 1] * 3, b"\0" * 8), r"IDX header says \[4294967295, 4294967295, 4294967295\] "
                                      r"\(79228162458924105385300197375 bytes\) but the file holds 8"),
    (idx([2**16] * 4), r"IDX header says \[65536, 65536, 65536, 65536\] \(18446744073709551616 bytes\)"),
    (idx([0, 28, 28]), r"IDX header says \[0, 28, 28\]: a dimension of 0, no data"),
    (idx([]), "IDX header gives no dimensions"),
    (idx([3, 2], ndim=3), r"IDX header cut short \(3 dimensions need 16 bytes, the file has 12\)"),
    (b"\0\0\x08", r"too short for an IDX file \(3 bytes\)"),
])
def test_bad_idx_headers_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(io.FormatError, match=f"{path}: {message}"):
        datasets.read_idx(path)


def test_idx_gzip_bomb_is_capped(tmp_path, monkeypatch):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx([2000], bytes(2000))))
    assert datasets.read_idx(path).shape == (2000,)
    monkeypatch.setattr(datasets, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(io.FormatError, match=r"labels\.gz: more than 1000 bytes once decompressed"):
        datasets.read_idx(path)


def test_idx_from_a_device(capsys, tmp_path):
    code, err = cli(capsys, "convert-mnist", "/dev/zero", "/dev/zero", tmp_path / "db")
    assert code == 1 and "/dev/zero: cannot read: it is a character device" in err


# -- parse-log and empty nets -----------------------------------------------------------------------

def test_parse_log_names_file_and_line_of_a_bad_number(capsys, tmp_path):
    log_path = tmp_path / "train.log"
    log_path.write_text(
        "I1122 16:47:04.123456 1 solver.cpp:218] Iteration 100 (1 iter/s), loss = 0.3\n"
        "I1122 16:47:04.123500 1 solver.cpp:237]     Train net output #0: loss = 0.3 (* 1 = 0.3 loss)\n"
        "I1122 16:47:05.123456 1 solver.cpp:218] Iteration 200 (1 iter/s), loss = 0.3\n"
        "I1122 16:47:05.123500 1 solver.cpp:237]     Train net output #0: loss = e.e- (* 1 = 0.3 loss)\n")
    code, err = cli(capsys, "parse-log", log_path, tmp_path / "out")
    assert code == 1 and f"{log_path}:4: train net output 'loss' has the value 'e.e-', not a number" in err


def test_parse_log_of_a_fifo(capsys, fifo):
    code, err = finishes(lambda: cli(capsys, "parse-log", fifo))
    assert code == 1 and "it is a FIFO" in err


def test_time_on_an_empty_net_says_so(capsys, tmp_path):
    empty = tmp_path / "empty.prototxt"
    empty.write_text("# nothing here\n")
    code, err = cli(capsys, "time", "--model", empty, "--iterations", "1")
    assert code == 1 and f"{empty}: the net has no layers" in err and "max()" not in err
    only_test = tmp_path / "test_only.prototxt"
    only_test.write_text(INPUT.replace("} }\n", "} include { phase: TEST } }\n"))
    code, err = cli(capsys, "time", "--model", only_test, "--iterations", "1")
    assert code == 1 and "none of the net's 1 layers is included in phase TRAIN" in err


# -- net building is linear --------------------------------------------------------------------------

def chain(layers: int) -> caffe_pb2.NetParameter:
    """An Input and `layers` in-place ReLU / Power layers on it."""
    param = caffe_pb2.NetParameter(name="chain")
    data = param.layer.add(name="data", type="Input", top=["x"])
    data.input_param.shape.add().dim.extend([1, 4])
    for i in range(layers):
        param.layer.add(name=f"act{i}", type="ReLU" if i % 2 else "Power", bottom=["x"], top=["x"])
    return param


def test_a_net_of_20k_layers_builds():
    """Quadratic name lookups made this take minutes (100k: hours); benchmarks/net_build.py times it."""
    net = Net(chain(20_000), minicaffe.TEST)
    assert len(net.layers) == 20_001 and net._layer_names[-1] == "act19999"
    assert net.top_names["act12345"] == ["x"] and "act19999" in net.bottom_names
    assert net.bottom_names.keys()[:2] == ["data", "act0"]
    out = net.forward(start="act19990", x=np.array([[-1.0, 0.0, 2.0, 3.0]]))["x"]
    np.testing.assert_array_equal(out, [[0.0, 0.0, 2.0, 3.0]])


def test_duplicate_layer_names_are_still_refused():
    param = chain(3)
    param.layer[3].name = "act1"
    with pytest.raises(NetError, match="layer 'act1' \\(Power\\): duplicate layer name"):
        Net(param, minicaffe.TEST)


def test_unknown_layer_name_in_forward():
    with pytest.raises(NetError, match="net 'chain' has no layer 'nope'"):
        Net(chain(2), minicaffe.TEST).forward(start="nope")


# -- weights that match nothing -----------------------------------------------------------------------

def small_net(tmp_path) -> Net:
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    return Net(str(model), minicaffe.TEST)


def capture_log(function) -> str:
    stream = pyio.StringIO()
    log.set_stream(stream)
    try:
        function()
    finally:
        log.set_stream(None)
    return stream.getvalue()


def test_ignored_source_layers_are_logged_as_caffe_does(tmp_path):
    net = small_net(tmp_path)
    net.params["ip"][0].data[...] = 0.5
    trained = net.to_proto()
    trained.layer.add(name="loss", type="SoftmaxWithLoss")
    trained.layer.add(name="accuracy", type="Accuracy")
    other = small_net(tmp_path)
    text = capture_log(lambda: other.copy_from_proto(trained, "m.caffemodel"))
    ignored = [line.split("] ", 1)[1] for line in text.splitlines()]
    assert ignored == ["Ignoring source layer loss", "Ignoring source layer accuracy"]
    assert all(line.startswith("I") for line in text.splitlines())
    np.testing.assert_array_equal(other.params["ip"][0].data, 0.5)


def test_weights_matching_no_layer_are_an_error(tmp_path):
    net = small_net(tmp_path)
    other = caffe_pb2.NetParameter()
    for name in ("conv1", "conv2", "fc6", "fc7", "fc8", "prob"):
        layer = other.layer.add(name=name, type="InnerProduct")
        layer.blobs.add().data.append(1.0)
    path = tmp_path / "other.caffemodel"
    io.write_binary(path, other)
    with pytest.raises(NetError, match=rf"{path}: none of its 6 layers \('conv1', 'conv2', 'fc6', 'fc7', "
                                       r"'fc8', \.\.\.\) is a layer of net 'small'"):
        capture_log(lambda: net.copy_from(path))
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(NetError, match=r"none of its 0 layers \(none\)"):
        net.copy_from(empty)


def test_weights_matching_no_layer_via_cli(capsys, tmp_path):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    other = caffe_pb2.NetParameter(layer=[caffe_pb2.LayerParameter(name="conv1", type="Convolution")])
    weights = tmp_path / "other.caffemodel"
    io.write_binary(weights, other)
    for command in (["test", "--iterations", "1"], ["params"], ["time", "--iterations", "1"]):
        code, err = cli(capsys, *command, "--model", model, "--weights", weights)
        assert code == 1, command
        assert f"{weights}: none of its 1 layers ('conv1') is a layer of net 'small'" in err.splitlines()[-1]


def test_matching_weights_still_load_with_the_cli(capsys, tmp_path):
    net = small_net(tmp_path)
    weights = tmp_path / "small.caffemodel"
    net.save(weights)
    code, err = cli(capsys, "params", "--model", tmp_path / "net.prototxt", "--weights", weights)
    assert code == 0, err


# -- shapes in files are checked with Python ints ----------------------------------------------------

def test_int64_dims_that_wrap_in_a_caffemodel(capsys, tmp_path):
    model = caffe_pb2.NetParameter()
    blob = model.layer.add(name="ip", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([2**32, 2**32])  # the product wraps to 0 in int64
    weights = tmp_path / "wrap.caffemodel"
    io.write_binary(weights, model)
    code, err = cli(capsys, "params", "--weights", weights)
    assert code == 1 and "layer 'ip' blob 0 has 0 values for shape [4294967296, 4294967296]" in err
    blob.shape.ClearField("dim")
    blob.shape.dim.extend([-1, -2])
    blob.data.extend([1.0, 2.0])
    io.write_binary(weights, model)
    code, err = cli(capsys, "params", "--weights", weights)
    assert code == 1 and "layer 'ip' blob 0 has 2 values for shape [-1, -2]" in err


def test_mean_file_dims_that_wrap(tmp_path):
    mean = caffe_pb2.BlobProto()
    mean.shape.dim.extend([1, 2**32, 2**32, 1])
    path = tmp_path / "mean.binaryproto"
    io.write_binary(path, mean)
    with pytest.raises(io.FormatError, match=r"mean\.binaryproto: a mean file holds one \(1, C, H, W\) "
                                             r"image, got shape \[4294967296, 4294967296, 1\] with 0 values"):
        DataTransformer(caffe_pb2.TransformationParameter(mean_file=str(path)), minicaffe.TRAIN)
