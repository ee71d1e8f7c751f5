"""Rows picked by integer indices carried in a float blob (Embed, BatchReindex, Filter): the helpers
around kernels/indices.cu. Sorting the indices (the bookkeeping of a backward) is the array module's;
gathering rows and summing them back are the kernels'."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..blob import Blob
from ..kernel import KernelFile
from ..layer import Layer

KERNELS = KernelFile("indices.cu")


def read_indices(layer: Layer, blob: Blob, limit: int, what: str):
    """blob's values as int32 indices (the layer's buffer "index", kept for backward); a value that is
    not an integer in 0..limit - 1 fails, naming the layer, `what`, the value and its position."""
    values = blob.get_data().reshape(-1)
    index = layer.buffer("index", (values.size,), np.int32, kept=True)
    if values.size == 0:
        return index
    KERNELS.read_indices(values.size, values, limit, index, extents=values.size)
    bad = index < 0
    if bool(bad.any()):
        position = int(backend.xp().flatnonzero(bad)[0])
        layer.fail(f"{what} {float(values[position]):g} at position {position} is not an integer in "
                   f"0..{limit - 1} (bottom shape {list(blob.shape)})")
    return index


def gather_rows(index, src, dst, width: int) -> None:
    """dst[m, :] = src[index[m], :] for rows of `width` values."""
    if index.size and width:
        KERNELS.gather_rows(index.size, width, index, src, dst, extents=(index.size, width))


def sum_rows_by_index(layer: Layer, index, src, dst, rows: int, width: int, accumulate: bool) -> None:
    """dst[k, :] (+)= the sum of src[m, :] over the m with index[m] == k, m ascending, for k < rows
    (without accumulate, a row no index names becomes 0). Deterministic: see kernels/indices.cu."""
    if rows == 0 or width == 0:
        return
    xp = backend.xp()
    # Positions sorted by (index, position): the keys are unique, so any sort gives this one order.
    keys = index.astype(np.int64) * index.size + xp.arange(index.size, dtype=np.int64)
    order = layer.buffer("order", (index.size,), np.int32)
    order[...] = xp.argsort(keys)
    begin = layer.buffer("begin", (rows + 1,), np.int32)
    begin[0] = 0
    begin[1:] = xp.cumsum(xp.bincount(index, minlength=rows))
    KERNELS.sum_rows_by_index(rows, width, begin, order, src, dst, int(accumulate), extents=(rows, width))
