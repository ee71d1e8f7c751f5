"""The fuzz suite of issue #9: hundreds of malformed inputs to the `minicaffe` command, each of which must end
in a correct result (exit 0) or a one-line error (exit 1): never a traceback, a crash, a hang or an
out-of-memory kill. The harness (runner process, memory limit, timeouts, verdicts) is tests/fuzzing.py.

Kinds: prototxt mutations (fields, types, graph shape, files that are not prototxt), numbers in a prototxt
(hypothesis), huge dimensions, truncated or bit-flipped caffemodels and solverstates, corrupt LMDBs, bad
IDX files for convert-mnist, and bad solver values (hypothesis). The inputs are the same on every run.
"""

from __future__ import annotations

import contextlib
import gzip
import io as text_io
import json
import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from fuzzing import (
    SPECIAL_FLOATS,
    SPECIAL_INTS,
    Case,
    Result,
    bit_flips,
    cause,
    flipped,
    format_number,
    hypothesis_examples,
    idx_file,
    numeric_sites,
    png_bomb,
    replace_line,
    run_cases,
    set_value,
    truncations,
    verdict,
)
from hypothesis import strategies as st

from minicaffe import cli, db
from minicaffe import io as mc_io
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
KINDS = ["prototxt", "numbers", "huge", "caffemodel", "solverstate", "lmdb", "idx", "solver"]

# A deploy net with the common layer types, for `summary` and `time`.
NET_DEPLOY = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 1 pad: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""

# A net that trains on DummyData; DATA_LAYER is replaced to make the LMDB version.
NET_TRAIN = """
name: "small_train"
DATA_LAYER
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""
DUMMY_DATA = """layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 1 dim: 8 dim: 8 } shape { dim: 4 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }"""
LMDB_DATA = """layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 MEAN_FILE }
  data_param { source: "SOURCE" batch_size: 4 backend: LMDB } }"""

SOLVER = """net: "NET"
test_iter: 1
test_interval: 2
base_lr: 0.01
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.1
stepsize: 2
display: 1
max_iter: 3
snapshot: 2
snapshot_prefix: "PREFIX"
random_seed: 1
solver_mode: CPU
type: "SGD"
"""
# The fields each update rule needs beside SGD's (Caffe refuses momentum for AdaGrad and RMSProp).
RULE_FIELDS = {"SGD": "momentum: 0.9\n", "Nesterov": "momentum: 0.9\n", "AdaGrad": "",
               "RMSProp": "rms_decay: 0.98\n", "AdaDelta": "momentum: 0.95\ndelta: 1e-6\n",
               "Adam": "momentum: 0.9\nmomentum2: 0.999\n"}


def swap(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; `old` must be there (else the case would test nothing new)."""
    assert old in text, f"{old!r} is not in the net"
    return text.replace(old, new)


def canonical(text: str, message=None) -> str:
    """The prototxt as protobuf prints it: one field per line, so lines can be mutated one by one."""
    from google.protobuf import text_format

    return text_format.MessageToString(mc_io.parse_text(text, message or caffe_pb2.NetParameter()))


def lenet_prelu_dummy() -> str:
    """models/lenet_prelu/train_test.prototxt with DummyData in place of its two Data layers."""
    net = mc_io.read_net_param(REPO / "models" / "lenet_prelu" / "train_test.prototxt")
    layers = [layer for layer in net.layer if layer.type != "Data"]
    del net.layer[:]
    text = swap(DUMMY_DATA, "dim: 4 dim: 1 dim: 8 dim: 8", "dim: 2 dim: 1 dim: 28 dim: 28")
    dummy = mc_io.parse_text(swap(text, "shape { dim: 4 }", "shape { dim: 2 }"), caffe_pb2.NetParameter())
    net.layer.extend([*dummy.layer, *layers])
    return canonical(str(net))


class Inputs:
    """Writes each case's input files into one folder and makes the cases."""

    def __init__(self, work: Path):
        self.work = work
        self.files = work / "inputs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.cases: list[Case] = []

    def file(self, name: str, data: bytes | str) -> str:
        path = self.files / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def add(self, kind: str, name: str, argv: list[str], **options) -> None:
        cwd = str(self.work / "cases" / f"{len(self.cases):04d}")
        self.cases.append(Case(kind, name, [str(a) for a in argv], cwd, **options))

    def special_files(self) -> dict[str, str]:
        """Paths that are no regular file, or none at all."""
        folder = self.files / "a_folder"
        folder.mkdir(exist_ok=True)
        fifo = self.files / "a_fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        loop = self.files / "a_loop"
        if not loop.is_symlink():
            loop.symlink_to(loop)
        return {"a folder": str(folder), "a FIFO": str(fifo), "/dev/zero": "/dev/zero",
                "/dev/urandom": "/dev/urandom", "a missing file": str(self.files / "missing"),
                "a symlink loop": str(loop), "an empty file": self.file("empty", b""),
                "binary garbage": self.file("garbage", bytes(range(256)) * 64)}


# -- the cases ------------------------------------------------------------------------------------------

def prototxt_cases(inputs: FuzzInputs) -> None:
    """Fields deleted or repeated, layer types swapped, bottoms renamed, cycles, empty nets, non-prototxt."""
    deploy = canonical(NET_DEPLOY)
    lines = deploy.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != "}":
            path = inputs.file(f"del{index}.prototxt", replace_line(deploy, index, None))
            inputs.add("prototxt", f"line {index} `{line.strip()}` deleted", ["summary", "--model", path])
        if ":" in line:
            twice = replace_line(deploy, index, f"{line.strip()} {line.strip()}")
            path = inputs.file(f"dup{index}.prototxt", twice)
            inputs.add("prototxt", f"field `{line.strip()}` repeated",
                       ["time", "--model", path, "--iterations", 1])
    net = mc_io.parse_text(NET_DEPLOY, caffe_pb2.NetParameter())
    for index, layer in enumerate(net.layer):
        for new_type in ("InnerProduct", "Pooling", "SoftmaxWithLoss", "Concat", "Data", "NoSuchType", ""):
            changed = caffe_pb2.NetParameter()
            changed.CopyFrom(net)
            changed.layer[index].type = new_type
            path = inputs.file(f"type{index}_{new_type}.prototxt", str(changed))
            inputs.add("prototxt", f"layer {layer.name}: type {new_type!r}", ["time", "--model", path,
                                                                              "--iterations", 1])
        for how in ("deleted", "duplicated", "bottom renamed", "top removed"):
            changed = caffe_pb2.NetParameter()
            changed.CopyFrom(net)
            edit_layer(changed, index, how)
            path = inputs.file(f"{how.replace(' ', '_')}{index}.prototxt", str(changed))
            inputs.add("prototxt", f"layer {layer.name} {how}", ["summary", "--model", path])
    graph = {
        "cycle conv1 <- prob": swap(NET_DEPLOY, 'bottom: "data" top: "conv1"',
                                                  'bottom: "prob" top: "conv1"'),
        "a layer reading its own top": swap(NET_DEPLOY, 'bottom: "pool1" top: "norm1"',
                                                          'bottom: "norm1" top: "norm1"'),
        "two layers writing one top": swap(NET_DEPLOY, 'top: "ip1"\n', 'top: "pool1"\n'),
        "no layers at all": 'name: "empty"',
        "an empty file": "",
        "only a comment": "# nothing here\n",
        "a latin-1 byte in a comment (valid)": NET_DEPLOY + "# caf\xe9\n",
        "an unterminated brace": NET_DEPLOY + "layer { name: 'x'",
        "an unterminated string": swap(NET_DEPLOY, '"small"', '"small'),
        "an unknown field": swap(NET_DEPLOY, 'name: "small"', 'name: "small" color: "red"'),
        "an unknown enum value": swap(NET_DEPLOY, "pool: MAX", "pool: MEDIAN"),
        "a number for a string": swap(NET_DEPLOY, 'name: "small"', "name: 12"),
        "a string for a number": swap(NET_DEPLOY, "num_output: 10", 'num_output: "ten"'),
        "a message for a number": swap(NET_DEPLOY, "num_output: 10", "num_output { }"),
        "the input layer excluded": swap(NET_DEPLOY, 'top: "data" input',
                                                       'top: "data" exclude { phase: TEST } input'),
        "a 1 MB layer name": swap(NET_DEPLOY, 'name: "prob"', f'name: "{"p" * (1 << 20)}"'),
        "20000 layers": NET_DEPLOY + "".join(
            f'layer {{ name: "r{i}" type: "ReLU" bottom: "prob" top: "prob" }}\n' for i in range(20000)),
    }
    for name, text in graph.items():
        path = inputs.file(f"graph{len(inputs.cases)}.prototxt", text.encode("latin-1"))
        inputs.add("prototxt", name, ["summary", "--model", path])
        if name != "20000 layers":  # building it must be quick; running 20000 layers is legitimately not
            inputs.add("prototxt", name, ["time", "--model", path, "--iterations", 1])
    for name, path in inputs.special_files().items():
        # An empty file is an empty net: nothing to summarize, but no error either.
        inputs.add("prototxt", f"--model is {name}", ["summary", "--model", path],
                   expect="any" if name == "an empty file" else "error")
    lenet = inputs.file("lenet_prelu_dummy.prototxt", lenet_prelu_dummy())
    inputs.add("prototxt", "lenet_prelu on DummyData (valid)", ["time", "--model", lenet, "--iterations", 1])
    # mean_file pointing at what is no BlobProto
    for name, path in inputs.special_files().items():
        net = NET_TRAIN.replace("DATA_LAYER", LMDB_DATA).replace("SOURCE", inputs.lmdb).replace(
            "MEAN_FILE", f'mean_file: "{path}"')
        model = inputs.file(f"mean_{len(inputs.cases)}.prototxt", net)
        inputs.add("prototxt", f"mean_file is {name}", ["time", "--model", model, "--iterations", 1],
                   expect="error")


def edit_layer(net: caffe_pb2.NetParameter, index: int, how: str) -> None:
    layer = net.layer[index]
    if how == "deleted":
        del net.layer[index]
    elif how == "duplicated":
        net.layer.add().CopyFrom(layer)
    elif how == "bottom renamed":
        layer.bottom[:1] = ["nowhere"]
    elif how == "top removed":
        layer.ClearField("top")


def numbers_cases(inputs: Inputs) -> None:
    """Numbers in a prototxt set to edge values: 0, -1, 2^31, 2^32-1, 2^63, 1e30, nan, and what hypothesis
    draws."""
    nets = [("small", canonical(NET_DEPLOY), ["summary"]),
            ("small_train", canonical(NET_TRAIN.replace("DATA_LAYER", DUMMY_DATA)),
             ["time", "--iterations", 1]),
            ("lenet_prelu", lenet_prelu_dummy(), ["summary", "--phase", "TRAIN"])]
    # Every number of the small net with every edge value,
    name, text, command = nets[0]
    for index in numeric_sites(text):
        for number in dict.fromkeys(SPECIAL_INTS + SPECIAL_FLOATS):
            path = inputs.file(f"number{len(inputs.cases)}.prototxt", set_value(text, index, number))
            inputs.add("numbers", f"{name} line {index}: `{text.splitlines()[index].strip()}` -> {number}",
                       [command[0], "--model", path, *command[1:]])
    # and what hypothesis draws for the numbers of all three.
    sites = [(net, index) for net, (_, text, _) in enumerate(nets) for index in numeric_sites(text)]
    # Integers small or far too big, not in between: a 2 GB layer is no malformed input, only a slow one.
    value = st.one_of(st.sampled_from(SPECIAL_INTS + SPECIAL_FLOATS),
                      st.integers(-10, 100).map(str), st.integers(2**30, 2**65).map(str),
                      st.integers(-(2**65), -(2**30)).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(format_number))
    for site, number in hypothesis_examples(st.tuples(st.sampled_from(sites), value), 160):
        net, index = site
        name, text, command = nets[net]
        line = text.splitlines()[index].strip()
        path = inputs.file(f"number{len(inputs.cases)}.prototxt", set_value(text, index, number))
        model_args = [command[0], "--model", path, *command[1:]]
        inputs.add("numbers", f"{name} line {index}: `{line}` -> {number}", model_args)


def huge_cases(inputs: Inputs) -> None:
    """Sizes beyond memory or beyond 32 and 64 bits (the issue's examples among them)."""
    def input_shape(*dims) -> str:
        return swap(NET_DEPLOY, "dim: 2 dim: 1 dim: 12 dim: 12", " ".join(f"dim: {d}" for d in dims))

    # (net, what `time` must do: "error" where it cannot run in memory or is invalid for Caffe too).
    nets = {
        "Input 1000^4": (input_shape(1000, 1000, 1000, 1000), "error"),
        "Input 2^31 x 1": (input_shape(2**31, 1, 1, 1), "error"),
        "Input 2^32 (wraps to 0)": (input_shape(2**32, 1, 12, 12), "error"),
        "Input 2^62 x 4 (int64 wraps)": (input_shape(2**62, 4, 12, 12), "error"),
        "Input dim -1": (input_shape(-1, 1, 12, 12), "error"),
        "Input dim 0": (input_shape(0, 1, 12, 12), "any"),
        "Input 0 channels (xavier fan-in 0)": (input_shape(2, 0, 12, 12), "error"),
        "InnerProduct num_output 1e9": (swap(NET_DEPLOY, "output: 10", "output: 1000000000"), "error"),
        "Convolution num_output 2^31": (swap(NET_DEPLOY, "output: 4", "output: 2147483648"), "error"),
        "kernel_size 100000 on 12x12": (swap(NET_DEPLOY, "kernel_size: 3", "kernel_size: 100000"), "error"),
        "kernel_size 4294967295": (swap(NET_DEPLOY, "kernel_size: 3", "kernel_size: 4294967295"), "error"),
        "pad 4294967295": (swap(NET_DEPLOY, "pad: 1", "pad: 4294967295"), "error"),
        "pad 100000": (swap(NET_DEPLOY, "pad: 1", "pad: 100000"), "error"),
        "stride 0": (swap(NET_DEPLOY, "stride: 1", "stride: 0"), "error"),
        "pooling kernel 0": (swap(NET_DEPLOY, "kernel_size: 2", "kernel_size: 0"), "error"),
        "pooling stride 4294967295": (swap(NET_DEPLOY, "stride: 2", "stride: 4294967295"), "any"),
        "LRN local_size 2^31-1": (swap(NET_DEPLOY, "local_size: 3", "local_size: 2147483647"), "any"),
        "Input 65536 x 65536 images": (input_shape(1, 1, 65536, 65536), "error"),
        "Input 46341 x 46341 (2^31 + elements)": (input_shape(1, 1, 46341, 46341), "error"),
        "DummyData 2^40 elements": (NET_TRAIN.replace("DATA_LAYER", swap(DUMMY_DATA,
            "dim: 4 dim: 1 dim: 8 dim: 8", "dim: 1048576 dim: 1 dim: 1024 dim: 1024")), "error"),
    }
    for name, (text, expect) in nets.items():
        path = inputs.file(f"huge{len(inputs.cases)}.prototxt", text)
        inputs.add("huge", name, ["summary", "--model", path])
        inputs.add("huge", name, ["time", "--model", path, "--iterations", 1], expect=expect)


def caffemodel_cases(inputs: FuzzInputs) -> None:
    model = Path(inputs.model).read_bytes()
    net = inputs.net_train
    variants = [(f"cut to {n} of {len(model)} bytes", model[:n]) for n in truncations(model)]
    variants += [(f"bit {bit} of byte {offset} flipped", flipped(model, offset, bit))
                 for offset, bit in bit_flips(model, 30, seed=9)]
    variants += [("16 bytes of garbage appended", model + bytes(range(240, 256))),
                 ("a 2 GB length prefix", b"\x0a\xff\xff\xff\xff\x07" + model),
                 ("a text prototxt", canonical(NET_DEPLOY).encode())]
    for name, data in variants:
        path = inputs.file(f"model{len(inputs.cases)}.caffemodel", data)
        inputs.add("caffemodel", f"params: {name}", ["params", "--weights", path])
        inputs.add("caffemodel", f"test: {name}",
                   ["test", "--model", net, "--weights", path, "--iterations", 1])
    for name, path in inputs.special_files().items():
        inputs.add("caffemodel", f"params: --weights is {name}", ["params", "--weights", path],
                   expect="any" if name == "an empty file" else "error")
        inputs.add("caffemodel", f"test: --weights is {name}", ["test", "--model", net, "--weights", path],
                   expect="error")
    other = inputs.file("other.caffemodel", caffe_pb2.NetParameter(
        layer=[caffe_pb2.LayerParameter(name="nothing_here", type="InnerProduct")]).SerializeToString())
    inputs.add("caffemodel", "weights whose layer names match nothing",
               ["test", "--model", net, "--weights", other, "--iterations", 1], expect="error")
    inputs.add("caffemodel", "train --weights cut in half",
               ["train", "--solver", inputs.case_solver(), "--weights",
                inputs.file("half.caffemodel", model[: len(model) // 2])])


def solverstate_cases(inputs: FuzzInputs) -> None:
    state_bytes = Path(inputs.state).read_bytes()
    variants = [(f"cut to {n} of {len(state_bytes)} bytes", state_bytes[:n])
                for n in truncations(state_bytes)]
    variants += [(f"bit {bit} of byte {offset} flipped", flipped(state_bytes, offset, bit))
                 for offset, bit in bit_flips(state_bytes, 20, seed=11)]
    state = caffe_pb2.SolverState.FromString(state_bytes)
    for field_name, value in (("iter", -1), ("iter", 2**31 - 1), ("current_step", -5),
                              ("learned_net", "/nonexistent.caffemodel"), ("learned_net", "/dev/zero"),
                              ("learned_net", "")):
        changed = caffe_pb2.SolverState()
        changed.CopyFrom(state)
        setattr(changed, field_name, value)
        variants.append((f"{field_name} = {value!r}", changed.SerializeToString()))
    changed = caffe_pb2.SolverState()
    changed.CopyFrom(state)
    del changed.history[1:]
    variants.append(("history of one blob", changed.SerializeToString()))
    for name, data in variants:
        path = inputs.file(f"state{len(inputs.cases)}.solverstate", data)
        inputs.add("solverstate", f"resume: {name}",
                   ["train", "--solver", inputs.case_solver(), "--snapshot", path])
    for name in ("a FIFO", "a folder", "/dev/zero"):
        inputs.add("solverstate", f"resume: --snapshot is {name}",
                   ["train", "--solver", inputs.case_solver(), "--snapshot", inputs.special_files()[name]],
                   expect="error")


def lmdb_cases(inputs: FuzzInputs) -> None:
    """A small LMDB of Datum, truncated, bit-flipped, missing parts, or holding what is no Datum."""
    data_file = Path(inputs.lmdb) / "data.mdb"
    original = data_file.read_bytes()
    size = len(original)
    pages = sorted({0, 100, 4096, 8192, size - 4096, size // 2, size - 1} - {size})
    variants: list[tuple[str, dict[str, bytes | None]]] = [
        (f"data.mdb cut to {n} of {len(original)} bytes", {"data.mdb": original[:n]}) for n in pages]
    variants += [(f"data.mdb bit {bit} of byte {offset} flipped",
                  {"data.mdb": flipped(original, offset, bit)})
                 for offset, bit in bit_flips(original[:8192], 12, seed=5)  # the two meta pages
                 + bit_flips(original, 12, seed=6)[6:]]
    variants += [("no data.mdb", {"data.mdb": None}), ("no lock.mdb", {"lock.mdb": None}),
                 ("data.mdb of zeros", {"data.mdb": bytes(len(original))})]
    for name, files in variants:
        folder = inputs.files / f"lmdb{len(inputs.cases)}"
        shutil_copytree(inputs.lmdb, folder)
        for file_name, data in files.items():
            (folder / file_name).unlink()
            if data is not None:
                (folder / file_name).write_bytes(data)
        inputs.add("lmdb", f"time: {name}", ["time", "--model", inputs.lmdb_net(folder), "--iterations", 1])
        if "cut" in name or "no " in name:
            inputs.add("lmdb", f"train: {name}", ["train", "--solver", inputs.lmdb_solver(folder)])
    rng = np.random.default_rng(3)
    gray = [rng.integers(0, 256, (1, 8, 8), dtype=np.uint8) for _ in range(4)]
    bomb = png_bomb(12000, 12000)
    records = {
        "values that are no Datum": [(b"%08d" % i, bytes(rng.integers(0, 256, 40, dtype=np.uint8)))
                                     for i in range(4)],
        "Datums of different shapes": [(b"%08d" % i, db.array_to_datum(np.zeros((1, 8 + i, 8), np.uint8), 1)
                                        .SerializeToString()) for i in range(4)],
        "a Datum of 2^31 channels and no data": [(b"0", caffe_pb2.Datum(channels=2**31 - 1, height=1, width=1)
                                                  .SerializeToString())],
        "a Datum whose data is short": [(b"0", caffe_pb2.Datum(channels=1, height=8, width=8, data=b"x" * 10)
                                         .SerializeToString())],
        "an encoded Datum of garbage": [(b"0", caffe_pb2.Datum(encoded=True, data=b"\x89PNG garbage")
                                         .SerializeToString())],
        "16 encoded PNGs of 12000x12000 (decompression bomb)": [
            (b"%08d" % i, caffe_pb2.Datum(encoded=True, data=bomb, label=1).SerializeToString())
            for i in range(16)],
        "an empty database": [],
        "labels of 2^31-1": [(b"%08d" % i, db.array_to_datum(gray[i], 2**31 - 1).SerializeToString())
                             for i in range(4)],
    }
    for name, rows in records.items():
        folder = inputs.files / f"lmdb{len(inputs.cases)}"
        db.write_lmdb(folder, rows)
        inputs.add("lmdb", f"time: {name}", ["time", "--model", inputs.lmdb_net(folder), "--iterations", 1])
    inputs.add("lmdb", "train: labels of 2^31-1", ["train", "--solver", inputs.lmdb_solver(folder)])
    for name, path in inputs.special_files().items():
        inputs.add("lmdb", f"source is {name}",
                   ["time", "--model", inputs.lmdb_net(Path(path)), "--iterations", 1],
                   expect="error")


def shutil_copytree(source: str, target: Path) -> None:
    import shutil

    shutil.copytree(source, target)


def idx_cases(inputs: FuzzInputs) -> None:
    """IDX files for convert-mnist: wrong magic, types, dimensions, sizes, truncated or bad gzip."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, 10 * 28 * 28, dtype=np.uint8).tobytes()
    labels = bytes(rng.integers(0, 10, 10, dtype=np.uint8))
    good_images, good_labels = idx_file(0x08, [10, 28, 28], pixels), idx_file(0x08, [10], labels)
    images = {
        "magic 1 2 8 3": b"\x01\x02" + good_images[2:],
        "type 0x0B (int16)": idx_file(0x0B, [10, 28, 28], pixels * 2),
        "type 0x0D (float32)": idx_file(0x0D, [10, 28, 28], pixels * 4),
        "type 0x07 (none)": idx_file(0x07, [10, 28, 28], pixels),
        "0 dimensions": idx_file(0x08, [], pixels),
        "1 dimension": idx_file(0x08, [10], pixels[:10]),
        "4 dimensions": idx_file(0x08, [10, 1, 28, 28], pixels),
        "255 dimensions": bytes([0, 0, 8, 255]) + pixels,
        "dims 2^32-1 x 28 x 28": idx_file(0x08, [2**32 - 1, 28, 28], pixels),
        "dims that wrap to 0 (65536 x 65536 x 1)": idx_file(0x08, [65536, 65536, 1], pixels),
        "dims 10 x 65535 x 65535": idx_file(0x08, [10, 65535, 65535], pixels),
        "data cut short": good_images[:-100],
        "header cut short": good_images[:9],
        "3 bytes": good_images[:3],
        "an empty file": b"",
        "a gzip of garbage": b"\x1f\x8b\x08\x00" + bytes(range(200)),
        "a truncated gzip": gzip.compress(good_images)[:200],
        "a gzip bomb claiming 10 x 60000 x 60000": gzip.compress(idx_file(0x08, [10, 60000, 60000], pixels)),
        "more images than labels": idx_file(0x08, [11, 28, 28], pixels + pixels[: 28 * 28]),
    }
    label_files = {
        "labels with 2 dimensions": idx_file(0x08, [10, 1], labels),
        "labels cut short": good_labels[:-3],
        "labels of type 0x0C": idx_file(0x0C, [10], labels * 4),
        "labels with dim 2^32-1": idx_file(0x08, [2**32 - 1], labels),
        "labels empty": b"",
    }
    good_images_path = inputs.file("good-images-idx3-ubyte", good_images)
    good_labels_path = inputs.file("good-labels-idx1-ubyte", good_labels)
    suffix = 0
    for name, data in images.items():
        suffix += 1
        gz = ".gz" if data.startswith(b"\x1f\x8b") else ""
        path = inputs.file(f"images{suffix}{gz}", data)
        inputs.add("idx", f"images: {name}", ["convert-mnist", path, good_labels_path, inputs.out_db()],
                   expect="error")
    for name, data in label_files.items():
        suffix += 1
        path = inputs.file(f"labels{suffix}", data)
        inputs.add("idx", name, ["convert-mnist", good_images_path, path, inputs.out_db()], expect="error")
    for name, path in inputs.special_files().items():
        inputs.add("idx", f"images file is {name}",
                   ["convert-mnist", path, good_labels_path, inputs.out_db()],
                   expect="error")
    path = inputs.file("images_0_rows", idx_file(0x08, [10, 0, 28], b""))
    inputs.add("idx", "images of 0 rows", ["convert-mnist", path, good_labels_path, inputs.out_db()])
    for start, count in ((-1, None), (11, None), (0, -1), (0, 2**40), (2**62, 1)):
        argv = ["convert-mnist", good_images_path, good_labels_path, inputs.out_db(), "--start", start]
        inputs.add("idx", f"--start {start} --count {count}", argv + (["--count", count] if count else []))
    user_folder = inputs.files / "user_folder"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("precious")
    inputs.add("idx", "--overwrite on an ordinary folder of the user's files",
               ["convert-mnist", good_images_path, good_labels_path, user_folder, "--overwrite"],
               expect="error", must_exist=[str(user_folder / "thesis.tex")])


def add_solver_case(inputs: FuzzInputs, base: str, rule_name: str, policy_name: str, field_name: str,
                    value: str) -> None:
    """`train` with the solver `base` under an update rule and a learning rate policy, one field set."""
    text = re.sub(r'type: ".*"', f'type: "{rule_name}"', base) + RULE_FIELDS.get(rule_name, "")
    text = re.sub(r'lr_policy: ".*"', f'lr_policy: "{policy_name}"', text)
    text = re.sub(rf"^{field_name}: .*$", "", text, flags=re.M) + f"{field_name}: {value}\n"
    if policy_name == "multistep":
        text += "stepvalue: 1\nstepvalue: 2\n"
    inputs.add("solver", f"{rule_name} {policy_name} {field_name}: {value}",
               ["train", "--solver", inputs.solver_file(text)])


def solver_cases(inputs: FuzzInputs) -> None:
    """Solver fields set to 0, negative, huge, nan, with each update rule and learning-rate policy."""
    base = canonical(SOLVER.replace("NET", inputs.net_train), caffe_pb2.SolverParameter())
    floats = ["base_lr", "gamma", "power", "momentum", "weight_decay", "clip_gradients", "delta", "momentum2",
              "rms_decay"]
    # max_iter, iter_size and test_iter are left small: 2^31 iterations would be a run, not a hang.
    ints = ["test_interval", "display", "average_loss", "stepsize", "snapshot", "device_id", "random_seed"]
    float_values = [*SPECIAL_FLOATS, "1.0", "1e10", "-10000"]
    # Every field with every edge value, under an update rule and policy that use it.
    user = {"momentum": "SGD", "delta": "AdaDelta", "momentum2": "Adam", "rms_decay": "RMSProp"}
    policy_of = {"gamma": "inv", "power": "inv", "stepsize": "step"}
    examples = [(user.get(name, "SGD"), policy_of.get(name, "fixed"), (name, value))
                for names, values in ((floats, float_values), (ints, SPECIAL_INTS)) for name in names
                for value in values]
    # And what hypothesis draws from all combinations.
    field_value = st.one_of(
        st.tuples(st.sampled_from(floats), st.sampled_from(float_values)),
        st.tuples(st.sampled_from(ints), st.sampled_from(SPECIAL_INTS)),
        st.tuples(st.sampled_from(["max_iter", "iter_size", "test_iter"]),
                  st.sampled_from(["0", "-1", "nan"])))
    rule = st.sampled_from(list(RULE_FIELDS))
    policy = st.sampled_from(["fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"])
    examples += hypothesis_examples(st.tuples(rule, policy, field_value), 110)
    for rule_name, policy_name, (field_name, value) in examples:
        add_solver_case(inputs, base, rule_name, policy_name, field_name, value)
    # The examples, with iterations enough for a learning rate to overflow; and what no update rule
    # can run.
    for rule_name, policy_name, (field_name, value) in [
            ("Adam", "fixed", ("momentum", "1.0")), ("SGD", "exp", ("gamma", "1e10")),
            ("SGD", "sigmoid", ("gamma", "-10000")), ("SGD", "step", ("max_iter", "-1")),
            ("AdaDelta", "fixed", ("delta", "0")), ("RMSProp", "fixed", ("rms_decay", "1.0")),
            ("NoSuchRule", "fixed", ("base_lr", "0.01")), ("SGD", "no_such_policy", ("base_lr", "0.01")),
            ("", "fixed", ("base_lr", "0.01")), ("SGD", "", ("base_lr", "0.01"))]:
        longer = re.sub(r"^max_iter: .*$", "max_iter: 40", base, flags=re.M)
        add_solver_case(inputs, longer, rule_name, policy_name, field_name, value)
    no_net = re.sub(r"^net: .*$", "", base, flags=re.M)
    inputs.add("solver", "no net", ["train", "--solver", inputs.solver_file(no_net)], expect="error")
    missing_net = base.replace(inputs.net_train, str(inputs.files / "missing.prototxt"))
    inputs.add("solver", "a missing net file", ["train", "--solver", inputs.solver_file(missing_net)],
               expect="error")
    empty_net = base.replace(inputs.net_train, inputs.file("emptynet.prototxt", 'name: "empty"'))
    inputs.add("solver", "an empty net", ["train", "--solver", inputs.solver_file(empty_net)], expect="error")
    no_loss = base.replace(inputs.net_train, inputs.file("noloss.prototxt", NET_DEPLOY))
    inputs.add("solver", "a net with no loss", ["train", "--solver", inputs.solver_file(no_loss)],
               expect="error")
    for name, path in inputs.special_files().items():
        inputs.add("solver", f"--solver is {name}", ["train", "--solver", path], expect="error")


# -- running --------------------------------------------------------------------------------------------

class FuzzInputs(Inputs):
    """Inputs plus the real files the mutations start from: a trained caffemodel and solverstate, an LMDB."""

    def __init__(self, work: Path):
        super().__init__(work)
        self.solvers = self.outputs = 0
        self.net_train = self.file("train.prototxt", NET_TRAIN.replace("DATA_LAYER", DUMMY_DATA))
        self.solver = self.solver_file(SOLVER.replace("NET", self.net_train), "base")
        # Training and timing the nets here also compiles their kernels (on a cold cache), which would
        # otherwise count against the first cases' timeouts.
        deploy = self.file("deploy.prototxt", NET_DEPLOY)
        with contextlib.redirect_stderr(text_io.StringIO()) as log, contextlib.redirect_stdout(log):
            code = cli.main(["train", "--solver", self.solver])
            code = code or cli.main(["time", "--model", deploy, "--iterations", "1"])
        assert code == 0, log.getvalue()
        self.model = str(work / "base_iter_3.caffemodel")
        self.state = str(work / "base_iter_2.solverstate")  # resumed, it trains one iteration
        rng = np.random.default_rng(2)
        self.lmdb = str(self.files / "digits_lmdb")
        db.write_datum_lmdb(self.lmdb, [rng.integers(0, 256, (1, 8, 8), dtype=np.uint8) for _ in range(32)],
                            [int(label) for label in rng.integers(0, 10, 32)])

    def solver_file(self, text: str, prefix: str | None = None) -> str:
        """A solver file whose snapshots go to the folder of the next case (or to `prefix` in work)."""
        self.solvers += 1
        case_folder = self.work / "cases" / f"{len(self.cases):04d}"
        prefix = str(self.work / prefix) if prefix else str(case_folder / "snap")
        text = re.sub(r'snapshot_prefix: ".*"', "", text) + f'\nsnapshot_prefix: "{prefix}"\n'
        return self.file(f"solver{self.solvers}.prototxt", text)

    def case_solver(self) -> str:
        """The base solver, snapshotting into the next case's folder: no two runs share a prefix."""
        return self.solver_file(SOLVER.replace("NET", self.net_train))

    def lmdb_net(self, folder: Path) -> str:
        text = NET_TRAIN.replace("DATA_LAYER", LMDB_DATA).replace("MEAN_FILE", "")
        text = text.replace("SOURCE", str(folder))
        return self.file(f"lmdbnet{len(self.cases)}.prototxt", text)

    def lmdb_solver(self, folder: Path) -> str:
        return self.solver_file(SOLVER.replace("NET", self.lmdb_net(folder)))

    def out_db(self) -> str:
        self.outputs += 1
        return str(self.work / "out" / f"db{self.outputs}")


GENERATORS = {"prototxt": prototxt_cases, "numbers": numbers_cases, "huge": huge_cases,
              "caffemodel": caffemodel_cases, "solverstate": solverstate_cases, "lmdb": lmdb_cases,
              "idx": idx_cases, "solver": solver_cases}


def make_cases(work: Path) -> list[Case]:
    inputs = FuzzInputs(work)
    for kind in KINDS:
        GENERATORS[kind](inputs)
    return inputs.cases


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> list[tuple[Case, Result]]:
    work = tmp_path_factory.mktemp("fuzz")
    cases = make_cases(work)
    results = run_cases(cases, work / "run")
    # Every case and how it ended, for a look beyond the assertion messages.
    (work / "results.json").write_text(json.dumps(
        [{**asdict(case), **asdict(result), "verdict": verdict(case, result)}
         for case, result in zip(cases, results)], indent=1))
    return list(zip(cases, results))


def failure_report(failures: list[tuple[Case, str, Result]]) -> str:
    counts = Counter(cause(problem) for _, problem, _ in failures)
    lines = [f"{len(failures)} cases failed: " + ", ".join(f"{n} {c}" for c, n in counts.most_common())
             + " (all cases and results: results.json in the fuzz folder under pytest's basetemp)"]
    for case, problem, result in failures:
        tail = " | ".join((result.stderr or result.runner_log).strip().splitlines()[-3:])[-300:]
        lines.append(f"- [{case.kind}] {case.name} (minicaffe {case.argv[0]}): {problem}\n    stderr: {tail}")
    return "\n".join(lines)


def test_fuzz_inputs_are_many_and_deterministic(fuzz_run, tmp_path):
    counts = Counter(case.kind for case, _ in fuzz_run)
    assert sum(counts.values()) >= 300, counts
    assert all(counts[kind] >= 15 for kind in KINDS), counts
    # The generated (hypothesis) part comes out the same on a second generation.
    again = Inputs(tmp_path)
    numbers_cases(again)
    numbers = [case.name for case, _ in fuzz_run if case.kind == "numbers"]
    assert [case.name for case in again.cases] == numbers


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz(fuzz_run, kind):
    failures = []
    for case, result in fuzz_run:
        if case.kind == kind:
            problem = verdict(case, result)
            if problem:
                failures.append((case, problem, result))
    if failures:
        pytest.fail(failure_report(failures), pytrace=False)


def test_harness_names_each_outcome(tmp_path):
    """The harness itself: every way a case can end is told apart, and after a case that kills or wedges
    the runner, the cases after it still run."""
    keep = tmp_path / "keep"
    keep.mkdir()
    expected = [("ok", None), ("error", None), ("two-lines", "unclear"),
                ("raise", "traceback ZeroDivisionError"), ("memory", "traceback MemoryError"),
                ("segv", "crash SIGSEGV"), ("ok", None), ("sleep", "hang"),
                ("stuck", "hang"), ("ok", None), ("remove", "data lost")]
    cases = [Case("probe", action, [action, str(keep)], str(tmp_path / str(i)), timeout=1, entry="probe",
                  must_exist=[str(keep)]) for i, (action, _) in enumerate(expected)]
    cases.append(Case("probe", "refused", ["ok"], str(tmp_path / "r"), expect="error", entry="probe"))
    results = run_cases(cases, tmp_path / "run", slack=2)
    causes = [(case.name, cause(problem) if (problem := verdict(case, result)) else None)
              for case, result in zip(cases, results)]
    assert causes == [*expected, ("refused", "accepted")]
    # Where it hung and where it crashed is told too.
    assert "timed out in fuzzing.py" in results[7].stderr and "probe" in results[7].stderr
    assert "_on_alarm" not in results[7].stderr
    assert "Fatal Python error: Segmentation fault" in results[5].runner_log
    assert "error: bad input" in results[1].stderr and results[2].code == 1
