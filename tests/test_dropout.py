"""Dropout layer: identity at TEST; at TRAIN a replayable mask from the kernel's counter-based hash,
checked against an independent numpy uint32 implementation of that hash."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, layer_from_prototxt

TRAIN, TEST = minicaffe.TRAIN, minicaffe.TEST
GOLDEN = np.uint32(0x9E3779B9)


# -- independent reference of the hash documented in kernels/dropout.cu ---------------------------------

def fmix32(h):
    """murmur3's finalizer on numpy uint32 (wrapping arithmetic)."""
    h = np.asarray(h, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))


def ref_hash(key: int, counter: int, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        stream = fmix32(np.uint32(key) ^ fmix32(np.uint32(counter) + GOLDEN))
        i = np.arange(count, dtype=np.uint32)
        return fmix32(fmix32(stream ^ (i * GOLDEN)) + stream)


def ref_mask(key: int, counter: int, count: int, ratio: float) -> np.ndarray:
    u = (ref_hash(key, counter, count) >> np.uint32(8)).astype(np.float64) * 2.0**-24
    return (u >= ratio).astype(np.float64)


def py_fmix32(h: int) -> int:
    """The same finalizer with Python integers, to check the numpy one."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_reference_hash_hand_checked():
    # murmur3 fmix32 fixed point and well-known values.
    assert py_fmix32(0) == 0
    assert py_fmix32(1) == 0x514E28B7
    for value in (1, 2, 0xDEADBEEF, 0xFFFFFFFF):
        assert int(fmix32(value)) == py_fmix32(value)
    # A few (key, counter, index) hashes, each worked through with Python integers.
    for key, counter, index in [(0, 0, 0), (1, 0, 5), (0x12345678, 7, 1000), (0xFFFFFFFF, 2**32 - 1, 3)]:
        stream = py_fmix32(key ^ py_fmix32((counter + 0x9E3779B9) & 0xFFFFFFFF))
        expected = py_fmix32((py_fmix32(stream ^ ((index * 0x9E3779B9) & 0xFFFFFFFF)) + stream)
                             & 0xFFFFFFFF)
        assert int(ref_hash(key, counter, index + 1)[index]) == expected


def dropout(x, ratio=0.5, phase=TRAIN, forward_index=0, name="drop", in_place=False, dtype=np.float64):
    text = f'name: "{name}" type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}'
    layer = layer_from_prototxt(text, phase=phase, dtype=dtype)
    layer.forward_index = forward_index
    x = np.asarray(x, dtype=dtype)
    bottom = [Blob(x.shape, dtype)]
    bottom[0].data[...] = x
    top = [bottom[0]] if in_place else [Blob((), dtype)]
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    return layer, bottom, top


# -- TEST phase ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_test_phase_is_identity(dtype, in_place):
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(dtype)
    layer, bottom, top = dropout(x, phase=TEST, in_place=in_place, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, x)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_array_equal(dx, dy)


# -- TRAIN phase ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.9])
def test_train_mask_matches_reference_hash(dtype, ratio):
    x = np.random.default_rng(2).standard_normal((3, 7, 11)).astype(dtype)
    layer, _, top = dropout(x, ratio=ratio, forward_index=12, name="fc6_drop", dtype=dtype)
    ratio32 = float(np.float32(ratio))  # the proto field is a float
    expected_mask = ref_mask(rng.key32("dropout", "fc6_drop"), 12, x.size, ratio32).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(layer.buffers["mask"]), expected_mask)
    scale = dtype(np.float32(1 / (1 - ratio32)))
    np.testing.assert_array_equal(top[0].data, x * expected_mask.astype(dtype) * scale)


def test_hand_checked_values():
    x = np.arange(1.0, 9.0)
    layer, _, top = dropout(x, ratio=0.5, forward_index=3, name="d")
    kept = ref_mask(rng.key32("dropout", "d"), 3, 8, 0.5).astype(bool)
    assert 0 < kept.sum() < 8  # this key drops some and keeps some
    # Values are exactly 0 or 2x.
    np.testing.assert_array_equal(top[0].data[kept], 2 * x[kept])
    np.testing.assert_array_equal(top[0].data[~kept], 0.0)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75])
def test_train_mask_statistics(ratio):
    x = np.ones(100_000)
    layer, _, top = dropout(x, ratio=ratio, forward_index=5)
    scale = float(np.float32(1 / (1 - float(np.float32(ratio)))))
    values = top[0].data
    assert np.all((values == 0) | (values == scale))
    kept = float(np.mean(values != 0))
    # Binomial std is at most 0.0016 here; 0.01 is over 6 sigma.
    assert abs(kept - (1 - ratio)) < 0.01
    # Neighbours are not correlated (a weak hash would show runs).
    mask = values != 0
    both = float(np.mean(mask[1:] & mask[:-1]))
    assert abs(both - (1 - ratio) ** 2) < 0.01


def test_ratio_zero_keeps_everything():
    x = np.random.default_rng(3).standard_normal(1000)
    _, _, top = dropout(x, ratio=0.0)
    np.testing.assert_array_equal(top[0].data, x)


def test_same_forward_index_same_mask_and_replay():
    x = np.ones(4096)
    a, _, _ = dropout(x, forward_index=7)
    b, bottom, top = dropout(x, forward_index=7)
    np.testing.assert_array_equal(a.buffers["mask"], b.buffers["mask"])
    # Another forward with a new index draws a new mask; going back replays the old one.
    b.forward_index = 8
    b.run_forward(bottom, top)
    assert np.mean(a.buffers["mask"] != b.buffers["mask"]) > 0.3
    b.forward_index = 7
    b.run_forward(bottom, top)
    np.testing.assert_array_equal(a.buffers["mask"], b.buffers["mask"])


def test_different_forward_index_or_name_different_mask():
    x = np.ones(4096)
    masks = [np.array(dropout(x, forward_index=i, name=name)[0].buffers["mask"])
             for i, name in [(0, "a"), (1, "a"), (2, "a"), (0, "b")]]
    for i in range(len(masks)):
        for j in range(i):
            assert 0.4 < np.mean(masks[i] != masks[j]) < 0.6


def test_seed_changes_mask():
    x = np.ones(4096)
    first = np.array(dropout(x)[0].buffers["mask"])
    minicaffe.set_random_seed(99)
    second = np.array(dropout(x)[0].buffers["mask"])
    assert np.mean(first != second) > 0.3


def test_float_and_double_builds_draw_the_same_mask():
    x = np.ones(5000)
    m32 = np.array(dropout(x, ratio=0.3, dtype=np.float32, forward_index=4)[0].buffers["mask"])
    m64 = np.array(dropout(x, ratio=0.3, dtype=np.float64, forward_index=4)[0].buffers["mask"])
    np.testing.assert_array_equal(m32, m64)


def test_in_place_matches_not_in_place():
    x = np.random.default_rng(4).standard_normal((4, 5, 6))
    dy = np.random.default_rng(5).standard_normal(x.shape)
    layer, bottom, top = dropout(x, forward_index=9)
    y = np.array(top[0].data)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    layer_ip, bottom_ip, top_ip = dropout(x, forward_index=9, in_place=True)
    np.testing.assert_array_equal(top_ip[0].data, y)
    (dx_ip,) = backward_layer(layer_ip, bottom_ip, top_ip, [dy])
    np.testing.assert_array_equal(dx_ip, dx)
    np.testing.assert_array_equal(dx, dy * layer.buffers["mask"] * 2.0)


def test_gradient_fixed_forward_index():
    layer = layer_from_prototxt('name: "drop" type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
                                phase=TRAIN)
    layer.forward_index = 11
    x = np.random.default_rng(6).standard_normal((2, 3, 5))
    bottom = [Blob(x.shape, np.float64)]
    bottom[0].data[...] = x
    top = [Blob((), np.float64)]
    GradientChecker(stepsize=1e-2, threshold=1e-6).check_gradient_eltwise(layer, bottom, top)
    GradientChecker(stepsize=1e-2, threshold=1e-6).check_gradient(layer, bottom, top)
    assert 0 < np.count_nonzero(layer.buffers["mask"]) < x.size  # the check covered dropped and kept elements


def test_reshape_follows_bottom():
    layer, bottom, top = dropout(np.ones((2, 3)))
    bottom[0].reshape(4, 5)
    bottom[0].data[...] = 1.0
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    assert top[0].shape == (4, 5) and layer.buffers["mask"].shape == (4, 5)
    np.testing.assert_array_equal(np.asarray(layer.buffers["mask"]).ravel(),
                                  ref_mask(rng.key32("dropout", "drop"), 0, 20, 0.5))


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_bad_ratio(ratio):
    with pytest.raises(LayerError, match="dropout_ratio"):
        dropout(np.ones(3), ratio=ratio)


def test_bad_blob_counts():
    with pytest.raises(LayerError, match="bottom"):
        run_layer('type: "Dropout"', np.ones(3), np.ones(3))


def test_gpu_mask_matches_cpu():
    pytest.importorskip("cupy")
    try:
        minicaffe.set_mode_gpu()
    except minicaffe.backend.BackendError as error:
        pytest.skip(str(error))
    x = np.random.default_rng(7).standard_normal(10_000)
    try:
        gpu_layer, gpu_bottom, gpu_top = dropout(x, forward_index=21)
        gpu_y = np.array(gpu_top[0].data)
        gpu_mask = np.asarray(gpu_layer.buffers["mask"].get())
    finally:
        minicaffe.set_mode_cpu()
    cpu_layer, _, cpu_top = dropout(x, forward_index=21)
    np.testing.assert_array_equal(gpu_mask, cpu_layer.buffers["mask"])
    np.testing.assert_array_equal(gpu_y, cpu_top[0].data)


@pytest.mark.parametrize("in_place", [False, True])
def test_train_keeps_a_byte_per_element(in_place):
    """The mask backward needs is kept as bytes (0 or 1): what `minicaffe summary` plans is what forward
    keeps, a byte per element, also in place; at TEST nothing is kept."""
    x = np.random.default_rng(4).normal(size=(3, 4, 5))
    layer, bottom, top = dropout(x, in_place=in_place)
    assert layer.buffers["mask"].dtype == np.uint8 and set(np.unique(layer.buffers["mask"])) == {0, 1}
    assert layer.kept_bytes() == layer.planned_kept_bytes(bottom, top) == x.size
    layer, bottom, top = dropout(x, phase=TEST)
    assert layer.kept_bytes() == layer.planned_kept_bytes(bottom, top) == 0
