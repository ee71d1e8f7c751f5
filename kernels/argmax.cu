// ArgMax (Caffe's ArgMaxLayer): the top_k largest values along one axis, or where they are, or both.
//
// x is viewed as (outer, dim, inner): rank over the `dim` values of each (p, j), which lie `inner`
// apart. Each (p, j) runs its own ranking (one GPU thread, one SIMD lane), so there is nothing to share:
// the k-th pass picks the first value, in ranking order, of those ranked after pass k - 1's pick. That
// costs top_k * dim reads and no scratch memory.
//
// Outputs go to y + p * plane_stride + offset + k * inner + j, for the indices (as reals) at
// index_offset and the values at value_offset; a negative offset writes nothing.
#include "shim.h"

// Caffe's ranking (std::partial_sort with std::greater on (value, index) pairs): the larger value first
// and, among equal values, the larger index. Caffe leaves NaN undefined; here NaN ranks above every
// number (as numpy's argmax finds it), so a diverged net shows, and the order stays a total one.
DEVICE bool argmax_ranks_before(const real a, const int ia, const real b, const int ib) {
  const bool a_nan = a != a, b_nan = b != b;
  return (a_nan && (!b_nan || ia > ib)) || (!a_nan && !b_nan && (a > b || (a == b && ia > ib)));
}

KERNEL void argmax_forward(const int outer, const int dim, const int inner, const int top_k, const real* x,
                           real* y, const int plane_stride, const int index_offset, const int value_offset) {
  PLANE_LOOP(p, outer) {
    const real* xp = x + (size_t)p * dim * inner;
    real* yp = y + (size_t)p * plane_stride;
    INNER_LOOP(j, inner) {
      real last = real(0);
      int last_index = -1;  // none picked yet
      for (int k = 0; k < top_k; ++k) {
        real best = real(0);
        int best_index = -1;
        for (int c = 0; c < dim; ++c) {
          const real v = xp[(size_t)c * inner + j];
          const bool candidate = last_index < 0 || argmax_ranks_before(last, last_index, v, c);
          if (candidate && (best_index < 0 || argmax_ranks_before(v, c, best, best_index))) {
            best = v;
            best_index = c;
          }
        }
        // top_k <= dim (checked by the layer): every pass finds one.
        if (index_offset >= 0) yp[index_offset + (size_t)k * inner + j] = real(best_index);
        if (value_offset >= 0) yp[value_offset + (size_t)k * inner + j] = best;
        last = best;
        last_index = best_index;
      }
    }
  }
}

// top_k == 1, the common case, as a scan over the axis with the contiguous j inner (so the CPU build
// vectorizes across j): best/best_index (outer * inner each) hold the pick so far. The same ranking as
// argmax_ranks_before: a later index wins ties, and NaN wins over numbers.
KERNEL void argmax_top1_forward(const int outer, const int dim, const int inner, const real* x, real* best,
                                real* best_index, real* y, const int plane_stride, const int index_offset,
                                const int value_offset) {
  PLANE_LOOP(p, outer) {
    const real* xp = x + (size_t)p * dim * inner;
    real* bp = best + (size_t)p * inner;
    real* ip = best_index + (size_t)p * inner;
    real* yp = y + (size_t)p * plane_stride;
    INNER_LOOP(j, inner) {
      bp[j] = xp[j];
      ip[j] = real(0);
    }
    for (int c = 1; c < dim; ++c) {
      const real* xc = xp + (size_t)c * inner;
      INNER_LOOP(j, inner) {
        const real v = xc[j], b = bp[j];
        const bool take = v != v || (b == b && v >= b);
        bp[j] = take ? v : b;
        ip[j] = take ? real(c) : ip[j];
      }
    }
    INNER_LOOP(j, inner) {
      if (index_offset >= 0) yp[index_offset + j] = ip[j];
      if (value_offset >= 0) yp[value_offset + j] = bp[j];
    }
  }
}
