"""Deconvolution, Crop, Im2col, SPP and the FCN-style net of models/fcn.

References are plain numpy written here (loops over taps, slices, windows) and hand-checked values.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.layers import convolution
from minicaffe.solver import Solver
from minicaffe.testing import check_layer, layer_from_prototxt
from tests.conftest import backward_layer, run_layer

REPO = Path(__file__).resolve().parents[1]
DTYPES = [np.float32, np.float64]
FILLERS = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'


def tolerance(dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


# -- Deconvolution ---------------------------------------------------------------------------------

def deconv_reference(x, w, b=None, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """Transposed convolution by scattering: input pixel (h, w) of channel c adds x * W[c, o, i, j] at
    output (h * stride - pad + i * dilation, w * stride - pad + j * dilation), for o in c's group."""
    n, c, h, wd = x.shape
    cin, og, kh, kw = w.shape
    assert cin == c and c % group == 0
    m = og * group
    full_h = stride[0] * (h - 1) + dilation[0] * (kh - 1) + 1
    full_w = stride[1] * (wd - 1) + dilation[1] * (kw - 1) + 1
    out = np.zeros((n, m, full_h, full_w))
    inputs_per_group = c // group
    for ci in range(c):
        g = ci // inputs_per_group
        for o in range(og):
            for i in range(kh):
                for j in range(kw):
                    r0, c0 = i * dilation[0], j * dilation[1]
                    out[:, g * og + o, r0:r0 + stride[0] * (h - 1) + 1:stride[0],
                        c0:c0 + stride[1] * (wd - 1) + 1:stride[1]] += x[:, ci] * w[ci, o, i, j]
    out = out[:, :, pad[0]:full_h - pad[0], pad[1]:full_w - pad[1]]
    if b is not None:
        out += np.asarray(b).reshape(1, m, 1, 1)
    return out


def deconv_text(num_output, extra="", fillers=True):
    return (f'type: "Deconvolution" convolution_param {{ num_output: {num_output} {extra} '
            f'{FILLERS if fillers else ""} }}')


def with_weights(text, x, weights, bias=None, dtype=np.float64):
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom, top = [Blob(x.shape, dtype)], [Blob((), dtype)]
    bottom[0].data[...] = x
    layer.setup(bottom, top)
    layer.blobs[0].data[...] = weights
    if bias is not None:
        layer.blobs[1].data[...] = bias
    layer.run_forward(bottom, top)
    return layer, bottom, top


@pytest.mark.parametrize("dtype", DTYPES)
def test_deconvolution_hand_checked(dtype):
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # stride 2, 2x2 ones: every pixel becomes a 2x2 block (plus the bias 0.5)
    _, _, top = with_weights(deconv_text(1, "kernel_size: 2 stride: 2", fillers=False), x,
                             np.ones((1, 1, 2, 2)), [0.5], dtype)
    np.testing.assert_array_equal(top[0].data[0, 0], [[1.5, 1.5, 2.5, 2.5], [1.5, 1.5, 2.5, 2.5],
                                                      [3.5, 3.5, 4.5, 4.5], [3.5, 3.5, 4.5, 4.5]])
    assert top[0].data.dtype == dtype
    # stride 1: the overlapping 2x2 blocks add up
    _, _, top = with_weights(deconv_text(1, "kernel_size: 2 bias_term: false", fillers=False), x,
                             np.ones((1, 1, 2, 2)), dtype=dtype)
    np.testing.assert_array_equal(top[0].data[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])
    # pad takes rows and columns off the output; weights (C_in, C_out, kh, kw): two outputs
    _, _, top = with_weights(deconv_text(2, "kernel_size: 2 pad: 1 bias_term: false", fillers=False), x,
                             np.stack([np.ones((2, 2)), [[0, 0], [0, 2]]])[None], dtype=dtype)
    np.testing.assert_array_equal(top[0].data[0], [[[10]], [[2]]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_deconvolution_with_group_channels_upsamples(dtype):
    """FCN's x2 upsampling: kernel 4, stride 2, pad 1, group = channels, bilinear filler. The filler's
    1-d ramp is [0.25, 0.75, 0.75, 0.25]; a row [1, 2, 3] becomes [0.75, 1.25, 1.75, 2.25, 2.75, 2.25]
    (linear interpolation at the half pixels inside, the zero padding weighing in at the ends), a
    constant column of ones [0.75, 1, 1, 1, 1, 0.75]. The channels do not mix."""
    text = ('type: "Deconvolution" convolution_param { num_output: 2 group: 2 kernel_size: 4 stride: 2 '
            'pad: 1 bias_term: false weight_filler { type: "bilinear" } }')
    x = np.stack([np.tile([1.0, 2.0, 3.0], (3, 1)), np.full((3, 3), 10.0)])[None]
    layer, _, top = run_layer(text, x, dtype=dtype)
    assert layer.blobs[0].shape == (2, 1, 4, 4)
    ramp = [0.25, 0.75, 0.75, 0.25]
    np.testing.assert_allclose(layer.blobs[0].data[1, 0], np.outer(ramp, ramp))
    rows = np.array([0.75, 1, 1, 1, 1, 0.75])
    expected = [np.outer(rows, [0.75, 1.25, 1.75, 2.25, 2.75, 2.25]), 10 * np.outer(rows, rows)]
    assert top[0].shape == (1, 2, 6, 6)
    np.testing.assert_allclose(top[0].data[0], expected, rtol=1e-6)


DECONV_CASES = {
    "plain 3x3": ("kernel_size: 3", (2, 3, 4, 5), 4, {}),
    "stride pad": ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 4, 3), 2, dict(stride=(2, 2), pad=(1, 1))),
    "rect hw fields": ("kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 1 pad_w: 0", (1, 2, 3, 4), 3,
                       dict(stride=(3, 1), pad=(1, 0))),
    "dilation": ("kernel_size: 2 dilation: 2 stride: 2", (2, 2, 3, 3), 3,
                 dict(stride=(2, 2), dilation=(2, 2))),
    "group 2": ("kernel_size: 3 group: 2 stride: 2", (2, 4, 3, 3), 6, dict(stride=(2, 2), group=2)),
    "depthwise": ("kernel_size: 4 stride: 2 pad: 1 group: 3", (2, 3, 3, 4), 3,
                  dict(stride=(2, 2), pad=(1, 1), group=3)),
    "depthwise dilation": ("kernel_h: 3 kernel_w: 2 stride: 2 dilation: 2 group: 2", (1, 2, 3, 3), 2,
                           dict(stride=(2, 2), dilation=(2, 2), group=2)),
    "depthwise same": ("kernel_size: 3 pad: 1 group: 3", (2, 3, 4, 5), 3, dict(pad=(1, 1), group=3)),
    "1x1": ("kernel_size: 1", (2, 4, 3, 3), 2, {}),
    "1x1 group 2": ("kernel_size: 1 group: 2", (2, 4, 2, 3), 6, dict(group=2)),
    "no bias": ("kernel_size: 2 stride: 2 bias_term: false", (2, 2, 3, 3), 3, dict(stride=(2, 2))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECONV_CASES)
def test_deconvolution_forward_matches_reference(case, dtype):
    extra, shape, num_output, geometry = DECONV_CASES[case]
    x = np.random.default_rng(1).normal(size=shape)
    layer, _, top = run_layer(deconv_text(num_output, extra), x, dtype=dtype)
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = deconv_reference(x.astype(dtype), layer.blobs[0].data, bias, **geometry)
    assert top[0].shape == expected.shape
    assert layer.blobs[0].shape == (shape[1], num_output // geometry.get("group", 1), *layer.geometry.kernel)
    np.testing.assert_allclose(top[0].data, expected, **tolerance(dtype))


def test_deconvolution_is_the_transpose_of_convolution():
    """<deconv(x), z> == <x, conv(z)> with the same weight blob and geometry."""
    rng = np.random.default_rng(2)
    geometry = "kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2 group: 2 bias_term: false"
    x = rng.normal(size=(2, 4, 4, 3))
    deconv, _, top = run_layer(deconv_text(6, geometry), x)
    z = rng.normal(size=top[0].shape)
    conv_text = f'type: "Convolution" convolution_param {{ num_output: 4 {geometry} }}'
    conv, conv_bottom, conv_top = run_layer(conv_text, z)
    assert conv.blobs[0].shape == deconv.blobs[0].shape
    conv.blobs[0].data[...] = deconv.blobs[0].data
    conv.run_forward(conv_bottom, conv_top)
    assert conv_top[0].shape == x.shape
    assert np.isclose(np.sum(top[0].data * z), np.sum(x * conv_top[0].data), rtol=1e-11)


@pytest.mark.parametrize("case", ["stride pad", "group 2", "depthwise", "depthwise dilation",
                                  "depthwise same", "1x1 group 2", "no bias", "rect hw fields"])
def test_deconvolution_gradients(case):
    extra, shape, num_output, _ = DECONV_CASES[case]
    x = np.random.default_rng(3).normal(size=shape)
    check_layer(layer_from_prototxt(deconv_text(num_output, extra)), [x], stepsize=1e-3, threshold=1e-5)


@pytest.mark.parametrize("extra, pad", [("kernel_size: 3", 0), ("kernel_size: 3 pad: 1", 1),
                                        ("kernel_size: 3 pad: 2 bias_term: false", 2)])
def test_deconvolution_through_winograd_matches_reference_and_gradients(monkeypatch, extra, pad):
    """A 3x3 stride-1 Deconvolution runs the Winograd kernels (WINOGRAD_CHOICE always) with the sides
    swapped: its forward is the convolution's input gradient (pad 2 - pad), its weight gradient the
    same."""
    monkeypatch.setattr(convolution, "WINOGRAD_CHOICE", "always")
    x = np.random.default_rng(4).normal(size=(2, 3, 5, 6))
    layer, _, top = run_layer(deconv_text(4, extra), x)
    assert layer._is_winograd()
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = deconv_reference(x, layer.blobs[0].data, bias, pad=(pad, pad))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-11, atol=1e-11)
    check_layer(layer_from_prototxt(deconv_text(4, extra)), [x], stepsize=1e-3, threshold=1e-5)


def test_deconvolution_axis_2_treats_leading_axes_as_batch():
    x = np.random.default_rng(14).normal(size=(2, 3, 2, 3, 2))
    layer, _, top = run_layer(deconv_text(4, "kernel_size: 2 stride: 2 axis: 2"), x)
    assert top[0].shape == (2, 3, 4, 6, 4)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    expected = deconv_reference(x.reshape(6, 2, 3, 2), w, b, stride=(2, 2))
    np.testing.assert_allclose(top[0].data.reshape(6, 4, 6, 4), expected, rtol=1e-11, atol=1e-11)


def test_deconvolution_two_bottoms_share_the_weights_and_gradients_add():
    rng = np.random.default_rng(4)
    x0, x1 = rng.normal(size=(1, 2, 3, 3)), rng.normal(size=(1, 2, 3, 3))
    layer, bottom, top = run_layer(deconv_text(3, "kernel_size: 2 stride: 2"), x0, x1, num_top=2)
    for x, t in zip((x0, x1), top):
        np.testing.assert_allclose(t.data, deconv_reference(x, layer.blobs[0].data, layer.blobs[1].data,
                                                            stride=(2, 2)), rtol=1e-11)
    check_layer(layer_from_prototxt(deconv_text(2, "kernel_size: 3 stride: 2")), [x0, x1], num_top=2,
                stepsize=1e-3, threshold=1e-5)


@pytest.mark.parametrize("extra, shape, message", [
    ("kernel_size: 1 pad: 1", (1, 1, 1, 1), r"output would be empty \(\[-1, -1\]\)"),
    ("kernel_size: 3 group: 2", (1, 3, 2, 2), r"channels \(3.*multiple of group \(2\)"),
    ("pad: 1", (1, 1, 2, 2), "kernel_size .* is required"),
    ("kernel_size: 2", (1, 1, 2), "only 2 spatial axes"),
])
def test_deconvolution_bad_parameters(extra, shape, message):
    with pytest.raises(LayerError) as info:
        run_layer(deconv_text(4, extra), np.ones(shape))
    assert "(Deconvolution)" in str(info.value) and re.search(message, str(info.value))
    with pytest.raises(LayerError, match=r"num_output \(3\) must be a multiple of group \(2\)"):
        run_layer(deconv_text(3, "kernel_size: 2 group: 2"), np.ones((1, 2, 2, 2)))


def test_deconvolution_refuses_in_place():
    with pytest.raises(LayerError, match="in place"):
        run_layer(deconv_text(2, "kernel_size: 1"), np.ones((1, 2, 2, 2)), in_place=True)


# -- Crop --------------------------------------------------------------------------------------------

CROP_CASES = {  # crop_param, bottom 0 shape, bottom 1 shape, the window as slices
    "default axis 2 no offset": ("", (2, 3, 5, 6), (1, 1, 3, 4), np.s_[:, :, 0:3, 0:4]),
    "one offset for all": ("offset: 1", (2, 3, 5, 6), (1, 1, 3, 4), np.s_[:, :, 1:4, 1:5]),
    "offset per axis": ("offset: 2 offset: 1", (2, 3, 5, 6), (9, 9, 3, 4), np.s_[:, :, 2:5, 1:5]),
    "axis 1": ("axis: 1 offset: 1 offset: 0 offset: 2", (2, 3, 5, 6), (7, 2, 4, 3), np.s_[:, 1:3, 0:4, 2:5]),
    "axis 0": ("axis: 0 offset: 1", (3, 3, 4, 4), (2, 1, 2, 3), np.s_[1:3, 1:2, 1:3, 1:4]),
    "axis -1": ("axis: -1 offset: 3", (2, 3, 5, 6), (1, 1, 1, 2), np.s_[:, :, :, 3:5]),
    "3 axes": ("axis: 1 offset: 1", (2, 4, 6), (2, 2, 3), np.s_[:, 1:3, 1:4]),
    "5 axes": ("offset: 1 offset: 0 offset: 2", (2, 2, 3, 4, 5), (1, 1, 2, 3, 2), np.s_[:, :, 1:3, 0:3, 2:4]),
    "1 axis": ("axis: 0 offset: 2", (7,), (3,), np.s_[2:5]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CROP_CASES)
def test_crop_forward_and_backward_take_the_window(case, dtype):
    param, shape, reference, window = CROP_CASES[case]
    x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    layer, bottom, top = run_layer(f'type: "Crop" crop_param {{ {param} }}', x, np.zeros(reference),
                                   dtype=dtype)
    np.testing.assert_array_equal(top[0].data, x[window])
    dy = np.random.default_rng(5).normal(size=top[0].shape)
    dx, dref = backward_layer(layer, bottom, top, [dy])
    expected = np.zeros(shape, dtype)
    expected[window] = dy.astype(dtype)
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dref, 0)  # bottom 1 gives only the shape


def test_crop_hand_checked():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    _, _, top = run_layer('type: "Crop" crop_param { offset: 1 offset: 2 }', x, np.zeros((1, 1, 2, 2)))
    np.testing.assert_array_equal(top[0].data[0, 0], [[6, 7], [10, 11]])


def test_crop_gradients():
    rng = np.random.default_rng(6)
    check_layer(layer_from_prototxt('type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }'),
                [rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(1, 2, 2, 3))])


def test_crop_follows_a_reshaped_bottom():
    layer, bottom, top = run_layer('type: "Crop" crop_param { offset: 1 }', np.ones((1, 1, 4, 4)),
                                   np.ones((1, 1, 2, 2)))
    x = np.arange(2 * 2 * 6 * 5.0).reshape(2, 2, 6, 5)
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    bottom[1].reshape((1, 1, 3, 3))
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, x[:, :, 1:4, 1:4])


@pytest.mark.parametrize("param, shapes, message", [
    ("offset: 2", [(1, 1, 4, 4), (1, 1, 3, 2)], r"does not fit on axis 2: offset 2 \+ size 3 > 4"),
    ("", [(1, 1, 4, 4), (1, 1, 5, 2)], r"does not fit on axis 2: offset 0 \+ size 5 > 4"),
    ("offset: 1 offset: 1 offset: 1", [(1, 1, 4, 4), (1, 1, 2, 2)],
     r"3 offsets given for the 2 cropped axes"),
    ("", [(1, 1, 4, 4), (1, 4, 4)], "same number of axes"),
    ("axis: 4", [(1, 1, 4, 4), (1, 1, 2, 2)], "axis 4 out of range"),
])
def test_crop_bad_parameters(param, shapes, message):
    with pytest.raises(LayerError) as info:
        run_layer(f'type: "Crop" crop_param {{ {param} }}', *[np.ones(s) for s in shapes])
    assert "(Crop)" in str(info.value) and re.search(message, str(info.value))


def test_crop_refuses_in_place():
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "Crop"', np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), in_place=True)


# -- Im2col ------------------------------------------------------------------------------------------

def im2col_reference(x, kernel, pad=(0, 0), stride=(1, 1), dilation=(1, 1)):
    """(N, C * kh * kw, OH, OW): channel (c, i, j) is tap (i, j) of channel c, by slicing the padded input."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = [xp[:, :, i * dilation[0]:i * dilation[0] + stride[0] * (oh - 1) + 1:stride[0],
               j * dilation[1]:j * dilation[1] + stride[1] * (ow - 1) + 1:stride[1]]
            for i in range(kernel[0]) for j in range(kernel[1])]
    return np.stack(taps, axis=2).reshape(n, c * kernel[0] * kernel[1], oh, ow)


def test_im2col_hand_checked():
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    _, _, top = run_layer('type: "Im2col" convolution_param { kernel_size: 2 }', x)
    assert top[0].shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(top[0].data[0].reshape(4, 4), [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7],
                                                                 [4, 5, 7, 8]])


IM2COL_CASES = {
    "pad stride": ("kernel_size: 3 pad: 1 stride: 2", (2, 2, 5, 6),
                   dict(kernel=(3, 3), pad=(1, 1), stride=(2, 2))),
    "rect dilation": ("kernel_h: 2 kernel_w: 3 pad_h: 0 pad_w: 2 dilation: 2", (1, 3, 5, 4),
                      dict(kernel=(2, 3), pad=(0, 2), dilation=(2, 2))),
    "1x1": ("kernel_size: 1", (2, 3, 2, 3), dict(kernel=(1, 1))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", IM2COL_CASES)
def test_im2col_matches_reference_and_backward_is_its_adjoint(case, dtype):
    param, shape, geometry = IM2COL_CASES[case]
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape).astype(dtype)
    layer, bottom, top = run_layer(f'type: "Im2col" convolution_param {{ {param} }}', x, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, im2col_reference(x, **geometry))
    dy = rng.normal(size=top[0].shape)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    z = rng.normal(size=shape)
    assert np.isclose(np.sum(im2col_reference(z, **geometry) * dy), np.sum(z * dx), rtol=1e-4)


def test_im2col_gradients_and_batch_axes():
    rng = np.random.default_rng(8)
    check_layer(layer_from_prototxt('type: "Im2col" convolution_param { kernel_size: 2 pad: 1 stride: 2 }'),
                [rng.normal(size=(2, 2, 4, 3))])
    x = rng.normal(size=(2, 3, 2, 4, 4))  # axis 2: the two leading axes are batch axes
    _, _, top = run_layer('type: "Im2col" convolution_param { kernel_size: 3 axis: 2 }', x)
    assert top[0].shape == (2, 3, 18, 2, 2)
    np.testing.assert_array_equal(top[0].data.reshape(6, 18, 2, 2),
                                  im2col_reference(x.reshape(6, 2, 4, 4), (3, 3)))


@pytest.mark.parametrize("param, shape, message", [
    ("kernel_size: 4", (1, 1, 3, 3), "larger than the padded input"),
    ("pad: 1", (1, 1, 3, 3), "kernel_size .* is required"),
    ("kernel_size: 2 stride: 0", (1, 1, 3, 3), "stride must be nonzero"),
    ("kernel_size: 2", (1, 1, 3), "only 2 spatial axes"),
])
def test_im2col_bad_parameters(param, shape, message):
    with pytest.raises(LayerError) as info:
        run_layer(f'type: "Im2col" convolution_param {{ {param} }}', np.ones(shape))
    assert "(Im2col)" in str(info.value) and re.search(message, str(info.value))
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "Im2col" convolution_param { kernel_size: 1 }', np.ones((1, 1, 2, 2)), in_place=True)


# -- SPP -----------------------------------------------------------------------------------------------

def spp_reference(x, levels, average=False):
    """Per level, 2^i x 2^i windows of size k = ceil(H / bins) at stride k from -pad, pad =
    (k * bins - H + 1) // 2, clipped to the image; max, or Caffe's average (the sum over the clipped
    window divided by the window's size clipped at H + pad only); levels flattened and joined."""
    n, c, h, w = x.shape
    parts = []
    for level in range(levels):
        bins = 2 ** level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        out = np.empty((n, c, bins, bins))
        for i in range(bins):
            for j in range(bins):
                h0, w0 = i * kh - ph, j * kw - pw
                h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
                size = (h1 - h0) * (w1 - w0)
                window = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
                out[:, :, i, j] = window.sum(axis=(2, 3)) / size if average else window.max(axis=(2, 3))
        parts.append(out.reshape(n, -1))
    return np.concatenate(parts, axis=1)


def test_spp_hand_checked():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    _, _, top = run_layer('type: "SPP" spp_param { pyramid_height: 2 }', x)
    np.testing.assert_array_equal(top[0].data, [[15, 5, 7, 13, 15]])
    _, _, top = run_layer('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', x)
    np.testing.assert_array_equal(top[0].data, [[7.5, 2.5, 4.5, 10.5, 12.5]])
    _, _, top = run_layer('type: "SPP" spp_param { pyramid_height: 1 }', x)  # Caffe: no flatten
    np.testing.assert_array_equal(top[0].data, [[[[15]]]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels, pool, shape", [(3, "MAX", (2, 3, 9, 7)), (3, "AVE", (2, 3, 9, 7)),
                                                 (2, "AVE", (1, 2, 5, 3)), (4, "MAX", (1, 2, 16, 14))])
def test_spp_matches_reference(levels, pool, shape, dtype):
    x = np.random.default_rng(9).normal(size=shape).astype(dtype)
    text = f'type: "SPP" spp_param {{ pyramid_height: {levels} pool: {pool} }}'
    _, _, top = run_layer(text, x, dtype=dtype)
    assert top[0].shape == (shape[0], shape[1] * sum(4 ** i for i in range(levels)))
    np.testing.assert_allclose(top[0].data, spp_reference(x, levels, pool == "AVE"), **tolerance(dtype))


def test_spp_follows_a_new_input_size():
    layer, bottom, top = run_layer('type: "SPP" spp_param { pyramid_height: 3 }', np.ones((1, 2, 8, 8)))
    x = np.random.default_rng(10).normal(size=(3, 2, 11, 6))
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, spp_reference(x, 3))


def test_spp_gradients():
    x = np.random.default_rng(11).permutation(2 * 2 * 6 * 7).reshape(2, 2, 6, 7) * 0.05  # no near ties
    check_layer(layer_from_prototxt('type: "SPP" spp_param { pyramid_height: 3 }'), [x])
    check_layer(layer_from_prototxt('type: "SPP" spp_param { pyramid_height: 1 }'), [x])
    x = np.random.default_rng(12).normal(size=(2, 2, 5, 6))
    check_layer(layer_from_prototxt('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }'), [x])


@pytest.mark.parametrize("param, shape, message", [
    ("", (1, 1, 4, 4), "pyramid_height must be given and at least 1"),
    ("pyramid_height: 2 pool: STOCHASTIC", (1, 1, 4, 4), "STOCHASTIC is not supported"),
    ("pyramid_height: 3", (1, 1, 5, 8), r"input 5x8 .* too small for pyramid level 2 \(4x4 bins\)"),
    ("pyramid_height: 2", (1, 4, 4), "must have 4 axes"),
])
def test_spp_bad_parameters(param, shape, message):
    with pytest.raises(LayerError) as info:
        run_layer(f'type: "SPP" spp_param {{ {param} }}', np.ones(shape))
    assert "(SPP)" in str(info.value) and re.search(message, str(info.value))
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "SPP" spp_param { pyramid_height: 1 }', np.ones((1, 1, 2, 2)), in_place=True)


# -- the FCN-style net ---------------------------------------------------------------------------------

def segmentation_batch(rng, num=2, size=30):
    """Noisy 3-channel images with a brighter rectangle each; label 1 inside the rectangle, 0 outside."""
    data = rng.normal(0, 0.3, size=(num, 3, size, size))
    label = np.zeros((num, 1, size, size))
    for i in range(num):
        (top, left), (height, width) = rng.integers(3, size // 2, 2), rng.integers(8, size // 2, 2)
        label[i, 0, top:top + height, left:left + width] = 1
        data[i, :, top:top + height, left:left + width] += 1.0
    return data, label


def test_fcn_net_trains_on_synthetic_segmentation(monkeypatch):
    monkeypatch.chdir(REPO)
    solver = Solver(str(REPO / "models/fcn/solver.prototxt"))
    net = solver.net
    shapes = {name: net.blobs[name].shape for name in ("pool1", "fc6", "score_fr", "upscore2", "score_pool1c",
                                                       "fuse_pool1", "upscore", "score")}
    assert shapes == {"pool1": (2, 8, 24, 24), "fc6": (2, 16, 10, 10), "score_fr": (2, 2, 10, 10),
                      "upscore2": (2, 2, 22, 22), "score_pool1c": (2, 2, 22, 22),
                      "fuse_pool1": (2, 2, 22, 22), "upscore": (2, 2, 46, 46), "score": (2, 2, 30, 30)}
    fixed = np.array(net.params["upscore"][0].data)
    learned = np.array(net.params["upscore2"][0].data)
    ramp = [0.25, 0.75, 0.75, 0.25]
    np.testing.assert_allclose(fixed, np.broadcast_to(np.outer(ramp, ramp), (2, 1, 4, 4)))
    data, label = segmentation_batch(np.random.default_rng(13))
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    losses = []
    for _ in range(30):
        solver.step(1)
        losses.append(float(net.blobs["loss"].data))
    assert all(np.isfinite(losses)) and losses[0] > 0.5, losses
    assert losses[-1] < 0.4 * losses[0], losses
    prediction = net.blobs["score"].data.argmax(axis=1)
    assert (prediction == label[:, 0]).mean() > 0.9
    np.testing.assert_array_equal(net.params["upscore"][0].data, fixed)  # lr_mult 0: stays bilinear
    assert not np.array_equal(net.params["upscore2"][0].data, learned)  # learned
