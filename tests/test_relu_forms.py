"""The rectifier forms of benchmarks/relu_forms.py (the nets it times) compute the same function: every
ReLU form gives ReLU's output and input gradient, and every PReLU form gives PReLU's output, input
gradient and slope gradient (each form's parameters mapped to the per-channel slopes a_c), in place
and not. float64, small shapes; x is kept away from 0, where the forms' gradients may differ (the kink)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("relu_forms", REPO / "benchmarks" / "relu_forms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


bench = _bench()
SHAPES = [(2, 3, 4, 5), (6, 4)]  # an image blob (N, C, H, W) and a matrix (N, C), as benchmarked


def inputs(shape):
    rng = np.random.default_rng(3)
    x = rng.uniform(0.05, 2.0, shape) * rng.choice([-1.0, 1.0], shape)  # |x| >= 0.05: no kink
    return x, rng.standard_normal(shape)


def run(form, shape, in_place, slopes=None):
    """(y, dx, d loss / d a per channel or None) of the form's net for loss = sum(y * dy)."""
    net = bench.build(form, shape, in_place, slopes, dtype=np.float64)
    x, dy = inputs(shape)
    net.blobs["x"].data[...] = x
    out = bench.output_name(net)
    net.clear_param_diffs()
    net.forward_range(0, len(net.layers) - 1)
    y = net.blobs[out].data.copy()
    net.blobs[out].diff[...] = dy
    net.backward_range(len(net.layers) - 1, 0)
    dx = net.blobs["x"].diff.copy()
    slope_grad = None
    if form.to_slope_grad is not None:
        slope_grad = np.asarray(form.to_slope_grad(net.layer_dict[form.slope_layer].blobs[0].diff.copy()))
    return y, dx, slope_grad


def forms(group):
    return [form for form in bench.FORMS if form.group == group]


def test_every_form_is_in_a_checked_group():
    groups = {form.group for form in bench.FORMS}
    assert groups == {bench.ReLU_GROUP, bench.PReLU_GROUP}
    assert len(forms(bench.ReLU_GROUP)) == 4 and len(forms(bench.PReLU_GROUP)) == 7


@pytest.mark.parametrize("shape", SHAPES, ids=["blob", "matrix"])
@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
def test_relu_forms_agree(shape, in_place):
    x, dy = inputs(shape)
    want_y, want_dx = np.maximum(x, 0), dy * (x > 0)
    for form in forms(bench.ReLU_GROUP):
        y, dx, _ = run(form, shape, in_place)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12, err_msg=form.name)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12, err_msg=form.name)


def prelu_reference(x, dy, a):
    a = a.reshape((1, -1) + (1,) * (x.ndim - 2))
    y = np.maximum(x, 0) + a * np.minimum(x, 0)
    dx = dy * np.where(x > 0, 1.0, a)
    da = (dy * np.minimum(x, 0)).sum(axis=tuple(i for i in range(x.ndim) if i != 1))
    return y, dx, da


@pytest.mark.parametrize("shape", SHAPES, ids=["blob", "matrix"])
@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
def test_prelu_forms_agree_per_channel(shape, in_place):
    """Distinct slopes per channel: the forms with one slope per channel (or more)."""
    x, dy = inputs(shape)
    a = np.linspace(-0.3, 0.6, shape[1])  # a negative one too
    want_y, want_dx, want_da = prelu_reference(x, dy, a)
    checked = 0
    for form in forms(bench.PReLU_GROUP):
        if form.to_slope_grad is None or "channel_shared" in form.name:
            continue
        y, dx, da = run(form, shape, in_place, a)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12, err_msg=form.name)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12, err_msg=form.name)
        np.testing.assert_allclose(da, want_da, rtol=1e-10, atol=1e-12, err_msg=form.name)
        checked += 1
    assert checked == 5  # PReLU, max(x, a x), Lasagne's, PR #1940's composition, two ReLUs


@pytest.mark.parametrize("shape", SHAPES, ids=["blob", "matrix"])
@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
def test_prelu_forms_agree_at_one_slope(shape, in_place):
    """All slopes 0.25: every PReLU form, channel_shared (its gradient is the per-channel ones' sum) and
    the leaky ReLU with that fixed slope (no slope gradient) included."""
    x, dy = inputs(shape)
    a = np.full(shape[1], bench.SLOPE)
    want_y, want_dx, want_da = prelu_reference(x, dy, a)
    for form in forms(bench.PReLU_GROUP):
        y, dx, da = run(form, shape, in_place, a)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12, err_msg=form.name)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12, err_msg=form.name)
        if "channel_shared" in form.name:
            np.testing.assert_allclose(da, want_da.sum(), rtol=1e-10, err_msg=form.name)
        elif da is not None:
            np.testing.assert_allclose(da, want_da, rtol=1e-10, atol=1e-12, err_msg=form.name)


def test_benchmark_quick_writes_its_section(tmp_path, capsys):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    assert bench.main(["--quick", "--output", str(output)]) == 0
    text = output.read_text()
    assert "kept" in text and "## Rectifier forms (benchmarks/relu_forms.py)" in text
    assert "`python benchmarks/relu_forms.py --quick`" in text
    for form in bench.FORMS:
        escaped = form.name.replace("|", "\\|")  # a "|" in a table cell ends the cell
        assert text.count(f"| {escaped} |") == 2  # the blob and the matrix
    # ReLU in place keeps its one-byte mask and holds only x; not in place it holds x and y.
    relu_row = next(line for line in text.splitlines() if line.startswith("| ReLU |"))
    cells = [c.strip() for c in relu_row.strip("|").split("|")]
    assert cells[3:8] == ["8", "0", "4", "1", "0"]


@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
def test_planned_kept_bytes_are_what_forward_keeps(in_place):
    """The benchmark's "kept" column (summary's planned bytes, from shapes) is what a forward keeps."""
    shape = SHAPES[0]
    for form in bench.FORMS:
        net = bench.build(form, shape, in_place)
        net.blobs["x"].data[...] = inputs(shape)[0]
        net.forward_range(0, len(net.layers) - 1)
        kept = sum(layer.kept_bytes() for layer in net.layers)
        assert kept == bench.memory(form, shape, in_place)["kept"] * np.prod(shape), form.name
