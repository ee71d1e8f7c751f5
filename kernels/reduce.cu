// Deterministic reductions shared by the layers (see reduce.h): stage 1 for plain sums and sums of
// products, and stage 2, the per-channel total of the partials.
#include "reduce.h"

// partial[p * lanes + l]: plane p's sums of a (stage 1; planes of `inner` contiguous elements).
KERNEL void sum_partials(const int planes, const int inner, const int lanes, const real* a, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t j) { return a[j]; }, partial);
  }
}

// partial[p * lanes + l]: plane p's sums of a * b (stage 1).
KERNEL void product_sum_partials(const int planes, const int inner, const int lanes, const real* a,
                                 const real* b, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t j) { return a[j] * b[j]; }, partial);
  }
}

// Stage 2. The partials are (outer, dim, lanes): plane p = n * dim + c belongs to channel c.
// out[c] = (accumulate ? out[c] : 0) + (sum over n, then l, in order) / divisor. A divisor of 1 is exact
// (a gradient); the count of elements gives a mean.
KERNEL void channel_total(const int outer, const int dim, const int lanes, const real* partial, real* out,
                          const int accumulate, const real divisor) {
  PLANE_LOOP(q, 1) {
    INNER_LOOP(c, dim) {
      real sum = real(0);
      for (int n = 0; n < outer; ++n) {
        const real* row = partial + ((size_t)n * dim + c) * lanes;
        for (int l = 0; l < lanes; ++l) sum += row[l];
      }
      out[c] = (accumulate ? out[c] : real(0)) + sum / divisor;
    }
  }
}

// channel_total for lanes == 1 (a plane per element, e.g. an (N, C) blob's (n, c)): the same sums in the
// same order, with the channels taken MC_LANES at a time, a block of them per plane (so the CPU threads
// share them) and one per lane (so the CPU build vectorizes the loop over n: contiguous reads).
KERNEL void channel_total_single_lane(const int outer, const int dim, const real* partial, real* out,
                                      const int accumulate, const real divisor) {
  PLANE_LOOP(block, (dim + MC_LANES - 1) / MC_LANES) {
    const int first = block * MC_LANES;
    const int width = dim - first < MC_LANES ? dim - first : MC_LANES;
    real acc[MC_LANES];
    INNER_LOOP(l, width) { acc[l] = real(0); }
    for (int n = 0; n < outer; ++n) {
      const real* row = partial + (size_t)n * dim + first;
      INNER_LOOP(l, width) { acc[l] += row[l]; }
    }
    INNER_LOOP(l, width) {
      out[first + l] = (accumulate ? out[first + l] : real(0)) + acc[l] / divisor;
    }
  }
}
