"""Deterministic per-channel sums (parameter gradients, channel statistics) in two kernel stages.

Stage 1 is a layer's own kernel (or reduce.cu's sum_partials / product_sum_partials) that writes each
plane's partial sums, `lanes` per plane; stage 2, reduce.cu's channel_total, adds each channel's partials
in a fixed order. Every addition's order depends on the shape only: the same bits on every run, at any
thread count, on the CPU and the GPU (kernels/reduce.h says how).
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer

KERNELS = KernelFile("reduce.cu")
LANES = 32  # MC_LANES of kernels/reduce.h


def plane_lanes(inner: int) -> int:
    """The partial sums per plane of `inner` elements (the kernels' `lanes` argument)."""
    return max(1, min(LANES, inner))


def channel_sums(layer: Layer, dims: tuple[int, int, int], stage1, args: tuple, out,
                 accumulate: bool = True, divisor: float = 1.0) -> None:
    """out[c] (+)= (the sum over n < outer and j < inner of the terms of plane n * dim + c) / divisor,
    for dims = (outer, dim, inner); out has dim values.

    stage1 is a kernel launcher taking (planes, inner, lanes, *args, partial) that writes plane p's
    partial sums to partial[p * lanes:(p + 1) * lanes] (kernels/reduce.h's mc_plane_partials). The partials
    go to the layer's buffer "partial". out None: stage 1 only (for a kernel that also writes an
    element-wise result, e.g. PReLU's dx, when the sums are not wanted)."""
    outer, dim, inner = dims
    planes, lanes = outer * dim, plane_lanes(inner)
    partial = layer.buffer("partial", (planes, lanes))
    # Each lane loops over its share of the plane: the work is the elements, for the CPU's threads.
    stage1(planes, inner, lanes, *args, partial, extents=(planes, lanes), work=planes * inner)
    if out is not None:
        channel_total(dims, lanes, partial, out, accumulate, divisor)


def paired_channel_sums(layer: Layer, dims: tuple[int, int, int], stage1, args: tuple, name: str,
                        divisor: float = 1.0):
    """Two channel sums from one read: the buffer `name` of 2 * dim values, the first sum of each channel
    then the second, / divisor. stage1 takes (planes, inner, lanes, *args, partial) and writes plane
    p = n * dim + c's partial sums of its two terms at rows p + n * dim and p + (n + 1) * dim of an
    (outer, 2 dim, lanes) array (e.g. reduce.cu's sum_and_product_partials), so that one stage 2 over
    2 * dim channels totals both, each in the order channel_sums would."""
    outer, dim, inner = dims
    planes, lanes = outer * dim, plane_lanes(inner)
    partial = layer.buffer(f"{name}_partial", (2 * planes, lanes))
    stage1(planes, inner, lanes, *args, partial, extents=(planes, lanes), work=planes * inner)
    totals = layer.buffer(name, (2 * dim,))
    channel_total((outer, 2 * dim, inner), lanes, partial, totals, accumulate=False, divisor=divisor)
    return totals


def channel_sums_of(layer: Layer, dims: tuple[int, int, int], values, out, accumulate: bool = True,
                    divisor: float = 1.0) -> None:
    """channel_sums of the elements of `values` (of shape dims). For inner <= LANES stage 1 would copy
    them (one term per lane), so stage 2 sums `values` itself: the same bits, and no partials buffer."""
    outer, dim, inner = dims
    if plane_lanes(inner) == inner:
        channel_total(dims, inner, values, out, accumulate, divisor)
    else:
        channel_sums(layer, dims, KERNELS.sum_partials, (values,), out, accumulate, divisor)


def channel_total(dims: tuple[int, int, int], lanes: int, partial, out, accumulate: bool,
                  divisor: float) -> None:
    """Stage 2: out[c] (+)= channel c's partials (outer planes of `lanes`) summed in order / divisor
    (reduce.cu's channel_total: blocks of LANES channels, on threads of their own when the partials
    are many: its work is all of them, not one row of a block)."""
    outer, dim, _ = dims
    KERNELS.channel_total(outer, dim, lanes, partial, out, int(accumulate), divisor,
                          extents=(-(-dim // LANES), min(dim, LANES)), work=outer * dim * lanes)
