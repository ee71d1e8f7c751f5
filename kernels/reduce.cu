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
// Planes: blocks of MC_LANES channels; inner: the channels of a block, each summed in its own acc[k]
// with the loops over n and l outside, so the CPU's inner loop is a vector add of MC_LANES channels
// (contiguous when lanes == 1, e.g. an InnerProduct's bias gradient over an (N, C) blob) rather than
// one scalar chain per channel (measured 7x slower on a (64, 500) blob).
KERNEL void channel_total(const int blocks, const int outer, const int dim, const int lanes,
                          const real* partial, real* out, const int accumulate, const real divisor) {
  PLANE_LOOP(block, blocks) {
    const int c0 = block * MC_LANES;
    const int width = dim - c0 < MC_LANES ? dim - c0 : MC_LANES;
    real acc[MC_LANES];
    INNER_LOOP(k, width) { acc[k] = real(0); }
    for (int n = 0; n < outer; ++n) {
      for (int l = 0; l < lanes; ++l) {
        const real* column = partial + ((size_t)n * dim + c0) * lanes + l;  // column[k * lanes]: channel c0 + k
        INNER_LOOP(k, width) { acc[k] += column[(size_t)k * lanes]; }
      }
    }
    INNER_LOOP(k, width) { out[c0 + k] = (accumulate ? out[c0 + k] : real(0)) + acc[k] / divisor; }
  }
}
