"""Convolution layer: forward vs a direct numpy convolution, gradients, parameters, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe import threads
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.layers import convolution
from minicaffe.testing import check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]
FILLERS = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'


def conv_reference(x, w, b=None, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """Direct convolution: a loop over outputs and kernel taps of strided slices of the padded input."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    assert cg * group == c
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((n, m, oh, ow))
    outputs_per_group = m // group
    for o in range(m):
        g = o // outputs_per_group
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilation[0], j * dilation[1]
                patch = xp[:, g * cg:(g + 1) * cg,
                           r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                           c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j].astype(np.float64))
        if b is not None:
            out[:, o] += b[o]
    return out


def conv_text(num_output, extra="", fillers=True):
    filler = FILLERS if fillers else ""
    return f'type: "Convolution" convolution_param {{ num_output: {num_output} {extra} {filler} }}'


def setup_layer(text, x, dtype=np.float64, weights=None, bias=None):
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = [Blob(x.shape, dtype)]
    bottom[0].data[...] = x
    top = [Blob((), dtype)]
    layer.setup(bottom, top)
    if weights is not None:
        layer.blobs[0].data[...] = weights
    if bias is not None:
        layer.blobs[1].data[...] = bias
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


# -- forward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_checked_2x2_stride_2_sums_blocks(dtype):
    x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
    layer, _, top = setup_layer(conv_text(1, "kernel_size: 2 stride: 2", fillers=False), x, dtype,
                                weights=np.ones((1, 1, 2, 2)), bias=[1.0])
    # 2x2 block sums of 1..16 plus the bias 1.
    np.testing.assert_allclose(top[0].data, [[[[15, 23], [47, 55]]]])
    assert top[0].data.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_checked_pad_and_two_outputs(dtype):
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.zeros((2, 1, 3, 3))
    w[0] = 1.0  # 3x3 box sum with zero padding
    w[1, 0, 1, 2] = 2.0  # twice the right neighbour
    layer, _, top = setup_layer(conv_text(2, "kernel_size: 3 pad: 1 bias_term: false", fillers=False), x,
                                dtype, weights=w)
    np.testing.assert_allclose(top[0].data[0, 0], [[12, 21, 16], [27, 45, 33], [24, 39, 28]])
    np.testing.assert_allclose(top[0].data[0, 1], [[4, 6, 0], [10, 12, 0], [16, 18, 0]])
    assert len(layer.blobs) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_checked_dilation(dtype):
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    # 2x2 kernel dilated by 2 takes the corners of each 3x3 window.
    _, _, top = setup_layer(conv_text(1, "kernel_size: 2 dilation: 2 bias_term: false", fillers=False), x,
                            dtype, weights=[[[[1, 10], [100, 1000]]]])
    v = x[0, 0]
    expected = [[v[r, c] + 10 * v[r, c + 2] + 100 * v[r + 2, c] + 1000 * v[r + 2, c + 2] for c in range(3)]
                for r in range(3)]
    np.testing.assert_allclose(top[0].data[0, 0], expected)


CASES = {
    "plain 3x3": ("kernel_size: 3", (2, 3, 6, 5), 4, {}),
    "pad stride": ("kernel_size: 3 pad: 1 stride: 2", (2, 3, 7, 6), 4, dict(stride=(2, 2), pad=(1, 1))),
    "rect kernel hw fields": ("kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 stride_h: 1 stride_w: 3",
                              (1, 2, 5, 7), 3, dict(pad=(2, 1), stride=(1, 3))),
    "per-axis repeated": ("kernel_size: 2 kernel_size: 4 pad: 0 pad: 2 stride: 2 stride: 1 "
                          "dilation: 1 dilation: 2",
                          (2, 2, 6, 6), 2, dict(pad=(0, 2), stride=(2, 1), dilation=(1, 2))),
    "group 2": ("kernel_size: 3 pad: 1 group: 2", (2, 4, 5, 5), 6, dict(pad=(1, 1), group=2)),
    "depthwise group": ("kernel_size: 3 group: 3", (1, 3, 4, 5), 3, dict(group=3)),
    "depthwise pad stride dilation": ("kernel_h: 3 kernel_w: 2 pad: 2 stride_h: 2 stride_w: 3 dilation: 2 "
                                      "group: 4", (2, 4, 7, 9), 4, dict(group=4, pad=(2, 2), stride=(2, 3),
                                                                        dilation=(2, 2))),
    "depthwise no bias": ("kernel_size: 2 group: 2 bias_term: false", (2, 2, 3, 4), 2, dict(group=2)),
    # stride 1, output the input's size: the depthwise_same kernels (no padded copy)
    "depthwise same": ("kernel_size: 3 pad: 1 group: 3", (2, 3, 6, 5), 3, dict(pad=(1, 1), group=3)),
    # planes of >= 512 values: border rows in blocks of their own, the rest in blocks of 4096 // width rows
    "depthwise same blocks rect dilation": ("kernel_h: 5 kernel_w: 3 pad_h: 4 pad_w: 2 dilation: 2 group: 2",
                                            (1, 2, 70, 64), 2, dict(pad=(4, 2), dilation=(2, 2), group=2)),
    "dilation 2": ("kernel_size: 3 dilation: 2 pad: 1", (2, 2, 7, 8), 3, dict(dilation=(2, 2), pad=(1, 1))),
    "1x1": ("kernel_size: 1", (2, 5, 3, 4), 3, {}),
    "1x1 group 2 dilation 2": ("kernel_size: 1 group: 2 dilation: 2", (3, 4, 3, 2), 6, dict(group=2)),
    "1x1 stride 2 (im2col)": ("kernel_size: 1 stride: 2", (2, 3, 5, 4), 2, dict(stride=(2, 2))),
    "no bias": ("kernel_size: 2 bias_term: false", (2, 3, 4, 4), 2, {}),
    "big pad": ("kernel_size: 2 pad: 3 stride: 3", (1, 1, 3, 3), 2, dict(pad=(3, 3), stride=(3, 3))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_direct_convolution(case, dtype):
    extra, shape, num_output, geometry = CASES[case]
    x = np.random.default_rng(3).normal(size=shape)
    layer, _, top = setup_layer(conv_text(num_output, extra), x, dtype)
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = conv_reference(x.astype(dtype), layer.blobs[0].data, bias, **geometry)
    assert top[0].shape == expected.shape
    tolerance = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(top[0].data, expected, rtol=tolerance, atol=tolerance)


def test_weight_and_bias_shapes_and_default_fillers():
    x = np.ones((2, 6, 5, 5))
    layer, _, top = setup_layer(conv_text(4, "kernel_h: 3 kernel_w: 1 group: 2", fillers=False), x)
    assert layer.blobs[0].shape == (4, 3, 3, 1)
    assert layer.blobs[1].shape == (4,)
    # Caffe's default filler is constant 0.
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()
    assert top[0].shape == (2, 4, 3, 5)


def test_axis_2_treats_leading_axes_as_batch():
    x = np.random.default_rng(4).normal(size=(2, 3, 2, 5, 4))
    layer, _, top = setup_layer(conv_text(3, "kernel_size: 2 axis: 2"), x)
    assert top[0].shape == (2, 3, 3, 4, 3)
    expected = conv_reference(x.reshape(6, 2, 5, 4), layer.blobs[0].data, layer.blobs[1].data)
    np.testing.assert_allclose(top[0].data.reshape(6, 3, 4, 3), expected, rtol=1e-11, atol=1e-11)


def test_several_bottoms_share_the_weights():
    rng = np.random.default_rng(5)
    x0, x1 = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 2, 4, 4))
    layer = layer_from_prototxt(conv_text(3, "kernel_size: 3"))
    bottom = [Blob(x0.shape, np.float64), Blob(x1.shape, np.float64)]
    bottom[0].data[...], bottom[1].data[...] = x0, x1
    top = [Blob((), np.float64), Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    for x, t in zip((x0, x1), top):
        np.testing.assert_allclose(t.data, conv_reference(x, layer.blobs[0].data, layer.blobs[1].data),
                                   rtol=1e-11, atol=1e-11)
    check_layer(layer_from_prototxt(conv_text(2, "kernel_size: 2")), [x0[:1], x1[:1]], num_top=2,
                stepsize=1e-3, threshold=1e-5)


def test_reshape_to_a_new_spatial_size():
    layer, bottom, top = setup_layer(conv_text(2, "kernel_size: 3 pad: 1"), np.ones((1, 2, 4, 4)))
    x = np.random.default_rng(6).normal(size=(3, 2, 6, 5))
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    expected = conv_reference(x, layer.blobs[0].data, layer.blobs[1].data, pad=(1, 1))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-11, atol=1e-11)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2), groups=st.integers(1, 2), channels_per_group=st.integers(1, 2),
       outputs_per_group=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7),
       kh=st.integers(1, 3), kw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2))
def test_forward_property_random_geometry(n, groups, channels_per_group, outputs_per_group, h, w, kh, kw,
                                          ph, pw, sh, sw, dh, dw):
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # no output fits; the error is tested separately
    extra = (f"kernel_h: {kh} kernel_w: {kw} pad_h: {ph} pad_w: {pw} stride_h: {sh} stride_w: {sw} "
             f"dilation: {dh} dilation: {dw} group: {groups}")
    x = np.random.default_rng(h * 7 + w).normal(size=(n, groups * channels_per_group, h, w))
    layer, _, top = setup_layer(conv_text(groups * outputs_per_group, extra), x)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    expected = conv_reference(x, w, b, (sh, sw), (ph, pw), (dh, dw), groups)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-11, atol=1e-11)


# -- backward ------------------------------------------------------------------------------------

GRADIENT_CASES = {
    "group 2 pad 1": ("kernel_size: 3 pad: 1 group: 2", (2, 4, 4, 4), 4),
    "stride 2": ("kernel_size: 3 stride: 2", (2, 2, 5, 6), 3),
    "dilation 2": ("kernel_size: 2 dilation: 2 pad: 1", (1, 2, 5, 5), 3),
    "1x1": ("kernel_size: 1", (2, 3, 3, 3), 2),
    "1x1 group 2": ("kernel_size: 1 group: 2", (2, 4, 2, 3), 4),
    "depthwise": ("kernel_size: 3 pad: 1 group: 3", (2, 3, 4, 5), 3),
    "depthwise same rect dilation": ("kernel_h: 3 kernel_w: 5 pad_h: 2 pad_w: 4 dilation: 2 group: 2",
                                     (2, 2, 5, 6), 2),
    "depthwise same border blocks": ("kernel_size: 3 pad: 1 group: 2", (1, 2, 23, 24), 2),
    "depthwise rect stride dilation": ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_w: 2 dilation: 2 "
                                       "group: 2", (2, 2, 5, 6), 2),
    "rect stride pad": ("kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_w: 2", (1, 2, 5, 4), 2),
}


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradients_of_bottom_weights_and_bias(case):
    extra, shape, num_output = GRADIENT_CASES[case]
    x = np.random.default_rng(7).normal(size=shape)
    layer = layer_from_prototxt(conv_text(num_output, extra))
    check_layer(layer, [x], stepsize=1e-3, threshold=1e-5)


def test_gradient_exhaustive_small():
    x = np.random.default_rng(8).normal(size=(1, 2, 4, 3))
    check_layer(layer_from_prototxt(conv_text(2, "kernel_size: 2 pad: 1 stride: 2")), [x], exhaustive=True,
                stepsize=1e-3, threshold=1e-5)


def backward_with(layer, bottom, top, dy, propagate_down=(True,)):
    top[0].diff[...] = dy
    layer.backward(top, list(propagate_down), bottom)


def test_backward_matches_adjoint_of_reference():
    """Bottom diff is the adjoint of the forward map: <conv(x), dy> == <x, conv^T(dy)> for random x."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 4, 6, 5))
    layer, bottom, top = setup_layer(conv_text(4, "kernel_size: 3 pad: 2 stride: 2 dilation: 2 group: 2"), x)
    dy = rng.normal(size=top[0].shape)
    backward_with(layer, bottom, top, dy)
    z = rng.normal(size=x.shape)
    lhs = np.sum(conv_reference(z, layer.blobs[0].data, None, (2, 2), (2, 2), (2, 2), 2) * dy)
    assert np.isclose(lhs, np.sum(z * bottom[0].diff), rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[1].diff, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_parameter_diffs_accumulate_and_bottom_diff_is_written():
    rng = np.random.default_rng(10)
    layer, bottom, top = setup_layer(conv_text(3, "kernel_size: 2"), rng.normal(size=(2, 2, 4, 4)))
    dy = rng.normal(size=top[0].shape)
    bottom[0].diff[...] = 123.0
    backward_with(layer, bottom, top, dy)
    first = [np.array(b.diff) for b in layer.blobs]
    first_dx = np.array(bottom[0].diff)
    assert np.abs(first[0]).sum() > 0 and np.abs(first_dx).max() < 100
    backward_with(layer, bottom, top, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first[0])
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * first[1])
    np.testing.assert_allclose(bottom[0].diff, first_dx)  # written, not accumulated


def test_propagate_down_flags_skip_work():
    rng = np.random.default_rng(11)
    layer, bottom, top = setup_layer(conv_text(3, "kernel_size: 2"), rng.normal(size=(1, 2, 3, 3)))
    bottom[0].diff[...] = 7.0
    layer.param_propagate_down = [False, True]
    backward_with(layer, bottom, top, rng.normal(size=top[0].shape), propagate_down=[False])
    assert np.all(bottom[0].diff == 7.0)
    assert not layer.blobs[0].diff.any()
    assert layer.blobs[1].diff.any()
    layer.param_propagate_down = [True, False]
    layer.blobs[1].diff[...] = 0
    backward_with(layer, bottom, top, rng.normal(size=top[0].shape), propagate_down=[True])
    assert layer.blobs[0].diff.any() and not layer.blobs[1].diff.any()
    assert not np.all(bottom[0].diff == 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_batch_equals_one_chunk(monkeypatch, dtype):
    """Splitting the batch to bound the column buffer must not change forward or backward."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(5, 2, 5, 5))
    dy = rng.normal(size=(5, 3, 3, 3))
    results = []
    for limit in (1 << 24, 2 * 18 * 9 + 1):  # everything at once; chunks of 2 images (2 + 2 + 1)
        monkeypatch.setattr(convolution, "COL_BUFFER_LIMIT", limit)
        layer, bottom, top = setup_layer(conv_text(3, "kernel_size: 3 pad: 1 stride: 2"), x, dtype)
        assert [count for _, count in layer._chunks()] == ([5] if limit > 1000 else [2, 2, 1])
        backward_with(layer, bottom, top, dy)
        results.append([np.array(top[0].data), np.array(bottom[0].diff)]
                       + [np.array(b.diff) for b in layer.blobs])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("extra", ["kernel_size: 3 pad: 1 group: 2", "kernel_size: 3 stride: 2 dilation: 2"])
def test_images_split_over_threads_equal_one_pass(monkeypatch, layer_type, extra):
    """On the CPU the batch is cut into one range of images per thread, each in cache-sized chunks with
    its own buffers and weight-gradient sums: forward, backward and the accumulated weight diff must
    equal one pass over the batch, and give the same bits on every run."""
    rng = np.random.default_rng(14)
    x = rng.normal(size=(7, 4, 6, 6)).astype(np.float32)

    def columns_per_image(layer):
        return layer.conv_in_channels * 9 * layer.out_size[0] * layer.out_size[1]

    text = conv_text(4, extra).replace("Convolution", layer_type)

    def run(parts, chunk_images):
        threads.configure(parts)
        layer, bottom, top = setup_layer(text, x, np.float32)
        monkeypatch.setattr(convolution, "COL_CACHE_LIMIT", columns_per_image(layer) * chunk_images)
        assert layer._parts() == parts and layer._chunk_images() == chunk_images
        layer.forward(bottom, top)
        layer.blobs[0].diff[...] = 0.5  # gradients add to the diff
        backward_with(layer, bottom, top, np.linspace(-1, 1, top[0].count).reshape(top[0].shape))
        return [np.array(a) for a in (top[0].data, bottom[0].diff, layer.blobs[0].diff, layer.blobs[1].diff)]

    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.setattr(convolution, "PARALLEL_MIN_FLOPS", 1.0)
    one_pass = run(1, 7)
    # The weight gradient summed per part, and (few positions per part) added straight into the diff.
    for min_positions in (0, 10**9):
        monkeypatch.setattr(convolution, "WEIGHT_PARTS_MIN_POSITIONS", min_positions)
        split = run(3, 2)  # images 0-1, 2-3, 4-6 (chunks 4-5 and 6)
        for a, b in zip(one_pass, split):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(split, run(3, 2)):
            np.testing.assert_array_equal(a, b)
    # The parts' column buffers together stay within COL_BUFFER_LIMIT: two chunks' worth, two parts.
    layer = setup_layer(text, x, np.float32)[0]
    monkeypatch.setattr(convolution, "COL_BUFFER_LIMIT", 2 * layer._chunk_images() * columns_per_image(layer))
    assert layer._parts() == 2


def test_im2col_col2im_are_adjoint_for_both_layouts():
    rng = np.random.default_rng(13)
    geometry = convolution.ConvGeometry((2, 3), (1, 2), (2, 1), (1, 2))
    x = rng.normal(size=(2, 3, 5, 6))
    out = geometry.output_size(5, 6)
    rows, positions = 3 * 6, out[0] * out[1]
    for images_outer in (False, True):
        col = np.empty(rows * 2 * positions)
        convolution.im2col(x, col, geometry, out, images_outer=images_outer)
        dcol = rng.normal(size=col.shape)
        dx = np.full(x.shape, 99.0)
        convolution.col2im(dcol, dx, geometry, out, images_outer=images_outer)
        assert np.isclose(np.dot(col, dcol), np.sum(x * dx), rtol=1e-12)
    # Layout check: the batched layout is (rows, num, positions); row 0 is tap (c=0, ki=0, kj=0).
    col = np.empty(rows * 2 * positions)
    convolution.im2col(x, col, geometry, out)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2)))
    np.testing.assert_array_equal(col.reshape(rows, 2, *out)[0], padded[:, 0, 0:2 * out[0] - 1:2, 0:out[1]])


# -- errors --------------------------------------------------------------------------------------

def make_error(text, shape):
    with pytest.raises(LayerError) as info:
        setup_layer(text, np.ones(shape))
    return str(info.value)


@pytest.mark.parametrize("extra, shape, message", [
    ("kernel_size: 5", (1, 1, 4, 6), "larger than the padded input"),
    ("kernel_size: 3 dilation: 3", (1, 1, 6, 6), "larger than the padded input"),
    ("kernel_size: 3 group: 2", (1, 3, 5, 5), r"channels \(3.*multiple of group \(2\)"),
    ("kernel_size: 3 group: 0", (1, 2, 5, 5), "group must be positive"),
    ("kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 1, 5, 5), "either kernel_size or kernel_h/kernel_w"),
    ("kernel_size: 3 stride: 1 stride_h: 2 stride_w: 2", (1, 1, 5, 5), "either stride or stride_h"),
    ("kernel_size: 3 pad: 1 pad_h: 1", (1, 1, 5, 5), "either pad or pad_h"),
    ("kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 1, 5, 5), "kernel_size has 3 values"),
    ("kernel_h: 3", (1, 1, 5, 5), "kernel dimensions must be nonzero"),
    ("kernel_size: 3 stride: 0", (1, 1, 5, 5), "stride must be nonzero"),
    ("pad: 1", (1, 1, 5, 5), "kernel_size .* is required"),
    ("kernel_size: 3", (1, 1, 5), "only 2 spatial axes .* has 1"),
    ("kernel_size: 3", (1, 1, 5, 5, 5), "only 2 spatial axes .* has 3"),
    ("kernel_size: 3 axis: 4", (1, 1, 5, 5), "axis 4 out of range"),
])
def test_bad_parameters_raise(extra, shape, message):
    assert re.search(message, make_error(conv_text(4, extra), shape))


def test_bad_num_output_group_and_missing_num_output():
    with pytest.raises(LayerError, match=r"num_output \(3\) must be a multiple of group \(2\)"):
        setup_layer(conv_text(3, "kernel_size: 1 group: 2"), np.ones((1, 4, 2, 2)))
    with pytest.raises(LayerError, match="num_output must be given"):
        setup_layer('type: "Convolution" convolution_param { kernel_size: 1 }', np.ones((1, 4, 2, 2)))


def test_error_names_layer_and_changed_channels():
    layer, bottom, top = setup_layer(conv_text(2, "kernel_size: 1"), np.ones((1, 3, 2, 2)))
    bottom[0].reshape(1, 4, 2, 2)
    with pytest.raises(LayerError, match=r"'convolution'.*channels changed from 3 to 4"):
        layer.reshape(bottom, top)
    bottom[0].reshape(1, 3, 2)
    with pytest.raises(LayerError, match="number of axes may not change"):
        layer.reshape(bottom, top)


def test_in_place_is_refused():
    layer = layer_from_prototxt(conv_text(2, "kernel_size: 1"))
    blob = Blob((1, 2, 2, 2), np.float64)
    with pytest.raises(LayerError, match="in place"):
        layer.setup([blob], [blob])


def test_loaded_weights_of_wrong_shape_are_rejected():
    layer = layer_from_prototxt(conv_text(2, "kernel_size: 3"))
    layer.blobs = [Blob((2, 1, 2, 2), np.float64), Blob((2,), np.float64)]
    message = r"parameter blob 0 has shape \[2, 1, 2, 2\], expected \[2, 1, 3, 3\]"
    with pytest.raises(LayerError, match=message):
        layer.setup([Blob((1, 1, 4, 4), np.float64)], [Blob((), np.float64)])


# -- Winograd F(4x4, 3x3) ---------------------------------------------------------------------------

@pytest.fixture
def winograd_always(monkeypatch):
    """The Winograd kernels for every 3x3 stride-1 convolution, however small (WINOGRAD_CHOICE)."""
    monkeypatch.setattr(convolution, "WINOGRAD_CHOICE", "always")


def test_winograd_transforms_give_the_3_tap_correlation():
    """The 1-d F(4, 3) identity the kernels are built on, with the matrices written out by hand from
    Lavin & Gray: y = A^T [(G g) * (B^T d)] is y[i] = sum_j g[j] d[i + j] for any d (6) and g (3)."""
    bt = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float)
    g_matrix = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
    at = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], float)
    rng = np.random.default_rng(30)
    d, g = rng.normal(size=6), rng.normal(size=3)
    np.testing.assert_allclose(at @ ((g_matrix @ g) * (bt @ d)), np.correlate(d, g, "valid"), rtol=1e-12)


def test_winograd_hand_checked_ones(winograd_always):
    """All-ones 3x3 filter, pad 1, on a 5x6 ramp: each output is the sum of its 3x3 neighbourhood (9
    inner values, 6 on an edge, 4 in a corner), across two 4x4 tiles with a cut edge."""
    x = np.arange(30, dtype=np.float64).reshape(1, 1, 5, 6)
    layer, _, top = setup_layer(conv_text(1, "kernel_size: 3 pad: 1", fillers=False), x,
                                weights=np.ones((1, 1, 3, 3)), bias=[0.5])
    assert layer._is_winograd()
    padded = np.pad(x[0, 0], 1)
    expected = [[padded[i:i + 3, j:j + 3].sum() + 0.5 for j in range(6)] for i in range(5)]
    assert expected[0][0] == 0 + 1 + 6 + 7 + 0.5
    np.testing.assert_allclose(top[0].data[0, 0], expected, rtol=1e-13)


WINOGRAD_CASES = {
    "pad 1, tiles cut by both edges": ("kernel_size: 3 pad: 1", (2, 3, 9, 7), 4),
    "pad 0": ("kernel_size: 3", (1, 5, 6, 10), 2),
    "pad 2, no bias": ("kernel_size: 3 pad: 2 bias_term: false", (3, 2, 5, 5), 3),
    "pad_h 0, pad_w 2": ("kernel_size: 3 pad_h: 0 pad_w: 2", (2, 2, 8, 3), 3),
    "one output row": ("kernel_size: 3", (1, 2, 3, 9), 2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_forward_and_backward_match_the_direct_convolution(winograd_always, monkeypatch, case,
                                                                    dtype):
    """Forward against the float64 direct loop; both gradients against the im2col path on the same
    layer (WINOGRAD_CHOICE never), which the other tests check against the reference."""
    extra, shape, num_output = WINOGRAD_CASES[case]
    rng = np.random.default_rng(31)
    x = rng.normal(size=shape)
    layer, bottom, top = setup_layer(conv_text(num_output, extra), x, dtype)
    assert layer._is_winograd()
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    pad = layer.geometry.pad
    expected = conv_reference(x.astype(dtype), layer.blobs[0].data, bias, pad=pad)
    # fp32: the transforms round a few times per product (constants up to 8 and 1/24) where the direct
    # sum rounds once per product; measured errors are within 4e-6 of the largest output
    tolerance = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top[0].data, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    dy = rng.normal(size=top[0].shape)
    grads = []
    for winograd in (True, False):
        monkeypatch.setattr(convolution, "WINOGRAD_CHOICE", "always" if winograd else "never")
        assert layer._is_winograd() == winograd
        for blob in layer.blobs:
            blob.diff[...] = 0
        backward_with(layer, bottom, top, dy)
        grads.append([np.array(bottom[0].diff)] + [np.array(b.diff) for b in layer.blobs])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * np.abs(b).max())


@pytest.mark.parametrize("case", ["pad 1, tiles cut by both edges", "pad 2, no bias", "pad_h 0, pad_w 2"])
def test_winograd_gradients_of_bottom_weights_and_bias(winograd_always, case):
    extra, shape, num_output = WINOGRAD_CASES[case]
    x = np.random.default_rng(32).normal(size=shape)
    layer = layer_from_prototxt(conv_text(num_output, extra))
    check_layer(layer, [x], stepsize=1e-3, threshold=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_in_chunks_equals_one_chunk(winograd_always, monkeypatch, dtype):
    """Images taken through the Winograd buffers a few at a time (the weight gradient summed over the
    chunks in order) give what one pass gives."""
    rng = np.random.default_rng(33)
    x, dy = rng.normal(size=(5, 3, 6, 7)), rng.normal(size=(5, 4, 6, 7))
    results = []
    for limit in (1 << 20, 36 * 4 * 4 * 2):  # all 5 images at once; chunks of 2 (4 tiles per image)
        monkeypatch.setattr(convolution, "WINOGRAD_BUFFER_LIMIT", limit)
        layer, bottom, top = setup_layer(conv_text(4, "kernel_size: 3 pad: 1"), x, dtype)
        chunks = layer._chunks(size=layer._winograd_images_per_chunk(4))
        assert [count for _, count in chunks] == ([5] if limit > 1 << 16 else [2, 2, 1])
        backward_with(layer, bottom, top, dy)
        results.append([np.array(top[0].data), np.array(bottom[0].diff)]
                       + [np.array(b.diff) for b in layer.blobs])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_winograd_is_chosen_where_it_was_measured_faster():
    """The measured rule (convolution.py): the kernel benchmark's 8x32x32x32 3x3 -> 32, ResNet-50's
    64- and 128-channel 3x3 layers and 256-channel 14x14 ones in a batch take Winograd; other geometries,
    fewer than 32 channels, 13x13 (1.51x the outputs computed), 7x7 (4 tiles per image), filter matrices
    more than twice the batch's tile matrices (SqueezeNet's 14x14 layers at batch 1) and engine CAFFE
    take im2col."""
    def chosen(extra, shape, num_output=32):
        layer, _, _ = setup_layer(conv_text(num_output, extra), np.zeros(shape), np.float32)
        return layer._is_winograd()

    assert chosen("kernel_size: 3 pad: 1", (8, 32, 32, 32))
    assert chosen("kernel_size: 3 pad: 1", (1, 64, 56, 56), 64)
    assert chosen("kernel_size: 3 pad: 1", (1, 128, 28, 28), 128)
    assert chosen("kernel_size: 3 pad: 1", (32, 256, 14, 14), 256)  # 16 tiles per image, 1.31x
    assert not chosen("kernel_size: 3 pad: 1", (1, 256, 14, 12), 256)  # filters 10.7x the tiles
    assert not chosen("kernel_size: 3 pad: 1", (1, 64, 14, 14), 256)  # 3.2x (SqueezeNet's fire8/9)
    assert not chosen("kernel_size: 3 pad: 1", (1, 48, 14, 14), 192)  # 2.4x (fire6/7)
    assert not chosen("kernel_size: 3 pad: 1", (1, 64, 13, 13), 256)  # 1.51x
    assert not chosen("kernel_size: 3 pad: 1", (4, 512, 7, 7), 512)  # 4 tiles per image
    assert not chosen("kernel_size: 3 pad: 1", (8, 16, 32, 32))  # 16 input channels
    assert not chosen("kernel_size: 3 pad: 1", (8, 32, 32, 32), 16)  # 16 output channels
    assert not chosen("kernel_size: 3 pad: 1 engine: CAFFE", (8, 32, 32, 32))
    assert not chosen("kernel_size: 3 pad: 1 stride: 2", (8, 32, 32, 32))
    assert not chosen("kernel_size: 3 pad: 1 dilation: 2", (8, 32, 32, 32))
    assert not chosen("kernel_size: 3 pad: 1 group: 2", (8, 32, 32, 32))
    assert not chosen("kernel_size: 3 pad: 3", (8, 32, 32, 32))
    assert not chosen("kernel_size: 5 pad: 2", (8, 32, 32, 32))


def test_engine_caffe_gives_the_im2col_results(winograd_always, monkeypatch):
    """engine: CAFFE asks for Caffe's own im2col + GEMM: the same bits as the im2col path."""
    x = np.random.default_rng(34).normal(size=(2, 3, 6, 6)).astype(np.float32)
    caffe, _, caffe_top = setup_layer(conv_text(2, "kernel_size: 3 pad: 1 engine: CAFFE"), x, np.float32)
    weights, bias = caffe.blobs[0].data, caffe.blobs[1].data
    default, _, default_top = setup_layer(conv_text(2, "kernel_size: 3 pad: 1"), x, np.float32, weights, bias)
    assert default._is_winograd() and not caffe._is_winograd()
    assert not np.array_equal(default_top[0].data, caffe_top[0].data)  # Winograd rounds otherwise
    monkeypatch.setattr(convolution, "WINOGRAD_CHOICE", "never")
    _, _, im2col_top = setup_layer(conv_text(2, "kernel_size: 3 pad: 1"), x, np.float32, weights, bias)
    np.testing.assert_array_equal(caffe_top[0].data, im2col_top[0].data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_backward_with_two_bottoms_and_twice(winograd_always, monkeypatch, dtype):
    """Forward keeps the last pair's transformed input for the weight gradient: with two bottom/top pairs
    (and a second backward after the first) every pair's gradient still comes from its own input."""
    rng = np.random.default_rng(35)
    xs = [rng.normal(size=(2, 3, 5, 6)) for _ in range(2)]
    dys = [rng.normal(size=(2, 4, 5, 6)) for _ in range(2)]
    results = []
    for choice in ("always", "never"):  # Winograd, then im2col
        monkeypatch.setattr(convolution, "WINOGRAD_CHOICE", choice)
        layer = layer_from_prototxt(conv_text(4, "kernel_size: 3 pad: 1"), dtype=dtype)
        bottom = [Blob(x.shape, dtype) for x in xs]
        top = [Blob((), dtype), Blob((), dtype)]
        for blob, x in zip(bottom, xs):
            blob.data[...] = x
        layer.setup(bottom, top)
        layer.blobs[0].data[...] = rng.normal(size=layer.blobs[0].shape) if not results else results[0][0]
        assert layer._is_winograd() == (choice == "always")
        layer.forward(bottom, top)
        for blob, dy in zip(top, dys):
            blob.diff[...] = dy
        layer.backward(top, [True, True], bottom)
        once = np.array(layer.blobs[0].diff)
        layer.backward(top, [True, True], bottom)
        np.testing.assert_allclose(layer.blobs[0].diff, 2 * once, rtol=1e-5 if dtype == np.float32 else 1e-12)
        results.append([np.array(layer.blobs[0].data), once] + [np.array(b.diff) for b in bottom])
    tolerance = 2e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * np.abs(b).max())


def test_winograd_buffers_are_reused_by_both_directions(winograd_always):
    """Forward and backward with 3 input and 5 output channels (so the two directions' transforms differ
    in size) keep every scratch buffer once made: no pass makes one anew (#8: no per-step allocations)."""
    rng = np.random.default_rng(38)
    layer, bottom, top = setup_layer(conv_text(5, "kernel_size: 3 pad: 1"), rng.normal(size=(2, 3, 9, 7)))
    dy = rng.normal(size=top[0].shape)
    backward_with(layer, bottom, top, dy)
    def memory():
        return {name: id(array.base if array.base is not None else array)
                for name, array in layer.buffers.items()}

    made = memory()
    assert {"winograd_inputs", "winograd_diff_inputs", "winograd_products", "winograd_padded"} <= set(made)
    for _ in range(2):
        layer.forward(bottom, top)
        backward_with(layer, bottom, top, dy)
    assert memory() == made
