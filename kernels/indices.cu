// Rows picked by integer indices that a float blob carries (Embed's words, BatchReindex's and Filter's
// item numbers): reading the indices, gathering rows, and summing rows back by index.
//
// Rows are `width` contiguous values. The backward of a gather is a sum over the positions that picked
// a row; sum_rows_by_index takes them in a stable sort by index (the layer sorts with the array
// module), so every output row is one plane that adds its rows in ascending position order: the order
// of Caffe's CPU loop, the same bits on every run and device, no atomics.
#include "shim.h"

// index[i] = values[i] when it is an integer in [0, limit), else -1 (the layer reports it).
KERNEL void read_indices(const int count, const real* values, const int limit, int* index) {
  ELEMENT_LOOP(i, count) {
    const real v = values[i];
    const bool in_range = v >= real(0) && v < real(limit);  // false for NaN
    const int k = in_range ? (int)v : 0;
    index[i] = in_range && real(k) == v ? k : -1;
  }
}

// dst[m, :] = src[index[m], :]
KERNEL void gather_rows(const int rows, const int width, const int* index, const real* src, real* dst) {
  PLANE_LOOP(m, rows) {
    const real* s = src + (size_t)index[m] * width;
    real* d = dst + (size_t)m * width;
    INNER_LOOP(j, width) { d[j] = s[j]; }
  }
}

// dst[k, :] = (accumulate ? dst[k, :] : 0) + the sum, t ascending over [begin[k], begin[k + 1]), of
// src[order[t], :]: order lists the positions m sorted stably by index[m], begin[k] is where index k
// starts in it.
KERNEL void sum_rows_by_index(const int rows, const int width, const int* begin, const int* order,
                              const real* src, real* dst, const int accumulate) {
  PLANE_LOOP(k, rows) {
    real* d = dst + (size_t)k * width;
    if (!accumulate) {
      INNER_LOOP(j, width) { d[j] = real(0); }
    }
    for (int t = begin[k]; t < begin[k + 1]; ++t) {
      const real* s = src + (size_t)order[t] * width;
      INNER_LOOP(j, width) { d[j] += s[j]; }
    }
  }
}
