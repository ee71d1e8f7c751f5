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

// Two stage-1 sums from one read of a and b (mc_plane_partials_pair): those of a, then those of a * b.
// Each sum's bits are those of sum_partials and product_sum_partials (the same lanes, the same order).
KERNEL void sum_and_product_partials(const int planes, const int inner, const int lanes, const int dim,
                                     const real* a, const real* b, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials_pair(p, inner, lanes, dim, [=](size_t j) { return a[j]; },
                           [=](size_t j) { return a[j] * b[j]; }, partial);
  }
}

// Stage 2. The partials are (outer, dim, lanes): plane p = n * dim + c belongs to channel c.
// out[c] = (accumulate ? out[c] : 0) + (sum over n, then l, in order) / divisor. A divisor of 1 is exact
// (a gradient); the count of elements gives a mean. The channels go MC_LANES at a time, a block of them
// per plane and one per lane: on the CPU the innermost loop runs over a block's channels, so it
// vectorizes (each lane still adds its channel's partials in the order above), and blocks may run on
// threads of their own.
KERNEL void channel_total(const int outer, const int dim, const int lanes, const real* partial, real* out,
                          const int accumulate, const real divisor) {
  PLANE_LOOP(block, (dim + MC_LANES - 1) / MC_LANES) {
    const int first = block * MC_LANES;
    const int width = dim - first < MC_LANES ? dim - first : MC_LANES;
    real acc[MC_LANES];
    INNER_LOOP(k, width) { acc[k] = real(0); }
    for (int n = 0; n < outer; ++n) {
      const real* row = partial + ((size_t)n * dim + first) * lanes;
      for (int l = 0; l < lanes; ++l) {
        INNER_LOOP(k, width) { acc[k] += row[(size_t)k * lanes + l]; }
      }
    }
    INNER_LOOP(k, width) {
      out[first + k] = (accumulate ? out[first + k] : real(0)) + acc[k] / divisor;
    }
  }
}
