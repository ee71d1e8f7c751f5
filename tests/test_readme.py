"""The README's examples work as written."""

import re
from pathlib import Path

import numpy as np

import minicaffe
from minicaffe import io
from minicaffe.proto import caffe_pb2

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_readme_prototxt_example_runs():
    (text,) = code_blocks("protobuf")
    assert len(text.strip().splitlines()) <= 12 and "PReLU" in text
    net = minicaffe.Net(io.parse_text(text, caffe_pb2.NetParameter(), "README.md"), minicaffe.TEST)
    out = net.forward(data=np.random.default_rng(0).normal(size=(1, 3, 12, 12)))
    assert out["prob"].shape == (1, 2)
    np.testing.assert_allclose(out["prob"].sum(), 1.0, rtol=1e-6)
    assert (net.params["prelu1"][0].data == np.float32(0.25)).all()


def test_readme_has_exactly_the_two_setup_commands():
    setup = README[README.index("## Set up"):README.index("## A net with PReLU")]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ["pip install . && minicaffe train --solver quickstart",
                        'pip install ".[test]" && python -m pytest']
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_nvcc_snippet_matches_the_nvcc_test():
    """The README's by-hand command builds what tests/test_kernels_nvcc.py builds."""
    from test_kernels_nvcc import ARCHS, REALS

    (snippet,) = [block for block in code_blocks("sh") if "nvcc" in block]
    loops = dict(re.findall(r"for (\w+) in ([^;]+);", snippet))
    assert loops == {"cu": "kernels/*.cu", "arch": " ".join(ARCHS), "real": " ".join(REALS)}
    assert "nvcc -c -arch=$arch -std=c++14 -I kernels -x cu -DMC_REAL=$real \"$cu\"" in snippet


def test_readme_names_the_shared_data_variable():
    section = README[README.index("## The full test suite"):]
    assert "MINICAFFE_SHARED" in section
    assert all(folder in section for folder in ("data/mnist", "models/mtcnn", "models/zoo"))


def test_readme_writing_a_layer_example_runs():
    """The README's custom layer (registration, parameter blob, buffer, keeps) passes its own gradient
    check, and runs in a net in place as it does with a separate top."""
    section = README[README.index("## Writing a layer"):]
    section = section[:section.index("\n## ")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {"__name__": "readme_writing_a_layer"}
    try:
        exec(compile(code, "README.md: Writing a layer", "exec"), namespace)  # runs the gradient check
        assert minicaffe.LAYERS["LearnedSwish"] is namespace["LearnedSwishLayer"]
        x = np.random.default_rng(1).normal(size=(2, 3, 4))
        dy = np.random.default_rng(2).normal(size=x.shape)
        results = []
        for top in ("y", "x"):  # a separate top, then in place
            net = minicaffe.Net(io.parse_text(
                'force_backward: true\n'
                'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n'
                f'layer {{ name: "swish" type: "LearnedSwish" bottom: "x" top: "{top}" }}\n',
                caffe_pb2.NetParameter(), "<net>"), minicaffe.TRAIN)
            y = np.array(net.forward(x=x)[top])
            dx = np.array(net.backward(**{top: dy})["x"])
            results.append((y, dx, np.array(net.params["swish"][0].diff)))
        s = 1 / (1 + np.exp(-x))
        np.testing.assert_allclose(results[0][0], x * s, rtol=1e-5)
        for got, want in zip(results[1], results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    finally:
        minicaffe.LAYERS.pop("LearnedSwish", None)
