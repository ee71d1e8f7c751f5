"""Fillers of parameter blobs, driven by caffe.FillerParameter (Caffe's semantics)."""

from __future__ import annotations

import math

import numpy as np

from .blob import Blob

KNOWN = ("constant", "uniform", "gaussian", "xavier", "msra", "positive_unitball", "bilinear")


class FillerError(ValueError):
    pass


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe's fan_in = count / num, fan_out = count / channels."""
    count = math.prod(shape)
    num = shape[0] if len(shape) > 0 else 1
    channels = shape[1] if len(shape) > 1 else 1
    return count // max(num, 1), count // max(channels, 1)


def check_filler(shape: tuple[int, ...], param) -> None:
    """Caffe's CHECKs of a filler for a blob of `shape`, as FillerError naming the filler: parameters
    that give no distribution, and the fillers that divide by the blob's size on an empty blob."""
    kind = param.type
    if kind not in KNOWN:
        raise FillerError(f"unknown filler type '{kind}' (known: {', '.join(KNOWN)})")
    if kind == "uniform" and not (math.isfinite(param.min) and math.isfinite(param.max)
                                  and param.min <= param.max):
        raise FillerError(f"uniform filler needs finite min <= max, got min {param.min}, max {param.max}")
    if kind == "gaussian":
        if not (math.isfinite(param.mean) and math.isfinite(param.std) and param.std > 0):
            raise FillerError(f"gaussian filler needs a finite mean and a finite std > 0, got mean "
                              f"{param.mean}, std {param.std}")
        if param.sparse < -1:
            raise FillerError(f"gaussian filler: sparse must be -1 (off) or >= 0, got {param.sparse}")
    if kind in ("xavier", "msra", "positive_unitball") and math.prod(shape) == 0:
        fan_in, fan_out = _fans(shape)
        raise FillerError(f"{kind} filler cannot fill a blob with no values (shape {list(shape)}, fan_in "
                          f"{fan_in}, fan_out {fan_out}): its scale divides by them; check the input "
                          f"channels and num_output")
    if kind == "bilinear" and (len(shape) != 4 or shape[2] != shape[3]):
        raise FillerError(f"bilinear filler needs a 4-d blob with square kernels, got {list(shape)}")


def _variance_norm(param, fan_in: int, fan_out: int) -> float:
    from .proto import caffe_pb2

    norm = param.variance_norm
    if norm == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if norm == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def fill_array(shape: tuple[int, ...], param, rng: np.random.Generator) -> np.ndarray:
    """Values for a blob of `shape` as the filler `param` says, in float64."""
    check_filler(shape, param)
    kind = param.type
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape)
    if kind == "constant":
        values = np.full(count, param.value)
    elif kind == "uniform":
        values = rng.uniform(param.min, param.max, count)
    elif kind == "gaussian":
        values = rng.normal(param.mean, param.std, count)
        if param.sparse >= 0:
            # Caffe: keep each weight with probability sparse / num_outputs (num_outputs = shape[0]).
            num_outputs = shape[0] if shape else 1
            keep = rng.random(count) < min(param.sparse / num_outputs, 1.0)
            values = values * keep
    elif kind == "xavier":
        n = _variance_norm(param, *_fans(shape))
        scale = np.sqrt(3.0 / n)
        values = rng.uniform(-scale, scale, count)
    elif kind == "msra":
        n = _variance_norm(param, *_fans(shape))
        values = rng.normal(0.0, np.sqrt(2.0 / n), count)
    elif kind == "positive_unitball":
        values = rng.uniform(0.0, 1.0, count).reshape(shape[0] if shape else 1, -1)
        values = (values / values.sum(axis=1, keepdims=True)).ravel()
    else:  # bilinear
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        ramp = 1 - np.abs(np.arange(k) / f - c)
        values = np.broadcast_to(np.outer(ramp, ramp), shape).ravel()
    return np.asarray(values, dtype=np.float64).reshape(shape)


def fill(blob: Blob, param, rng: np.random.Generator) -> None:
    blob.data[...] = fill_array(blob.shape, param, rng)
