"""Fillers of parameter blobs, driven by caffe.FillerParameter (Caffe's semantics)."""

from __future__ import annotations

import numpy as np

from .blob import Blob


class FillerError(ValueError):
    pass


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Caffe's fan_in = count / num, fan_out = count / channels."""
    count = int(np.prod(shape)) if shape else 1
    num = shape[0] if len(shape) > 0 else 1
    channels = shape[1] if len(shape) > 1 else 1
    return count // max(num, 1), count // max(channels, 1)


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
    kind = param.type
    count = int(np.prod(shape)) if shape else 1
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
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise FillerError(f"bilinear filler needs a 4-d blob with square kernels, got {list(shape)}")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        ramp = 1 - np.abs(np.arange(k) / f - c)
        values = np.broadcast_to(np.outer(ramp, ramp), shape).ravel()
    else:
        raise FillerError(
            f"unknown filler type '{kind}' (known: constant, uniform, gaussian, xavier, msra, "
            "positive_unitball, bilinear)"
        )
    return np.asarray(values, dtype=np.float64).reshape(shape)


def fill(blob: Blob, param, rng: np.random.Generator) -> None:
    blob.data[...] = fill_array(blob.shape, param, rng)
