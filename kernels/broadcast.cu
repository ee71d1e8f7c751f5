// Broadcast kernels of the Scale and Bias layers: y = x * v[d] and y = x + v[d].
//
// x is viewed as (outer, dim, inner): dim = the count of the broadcast blob v, which covers axes
// [axis, axis + its num_axes), outer = the axes before, inner = the axes after.
//   *_planes kernels: one plane per (outer, d) pair, contiguous inner loop; for inner > 1.
//   *_rows kernels:   one plane per outer index, contiguous loop over d; for inner == 1, where a
//                     plane per element would leave nothing to vectorize.
// y may be x (in place). Scale's backward uses broadcast_mul too: dx = dy * v[d].
#include "shim.h"

KERNEL void broadcast_mul_planes(const int planes, const int inner, const int dim, const real* x,
                                 const real* v, real* y) {
  PLANE_LOOP(p, planes) {
    const real s = v[p % dim];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) { y[offset + j] = x[offset + j] * s; }
  }
}

KERNEL void broadcast_mul_rows(const int outer, const int dim, const real* x, const real* v, real* y) {
  PLANE_LOOP(p, outer) {
    const size_t offset = (size_t)p * dim;
    INNER_LOOP(d, dim) { y[offset + d] = x[offset + d] * v[d]; }
  }
}

KERNEL void broadcast_add_planes(const int planes, const int inner, const int dim, const real* x,
                                 const real* v, real* y) {
  PLANE_LOOP(p, planes) {
    const real b = v[p % dim];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) { y[offset + j] = x[offset + j] + b; }
  }
}

KERNEL void broadcast_add_rows(const int outer, const int dim, const real* x, const real* v, real* y) {
  PLANE_LOOP(p, outer) {
    const size_t offset = (size_t)p * dim;
    INNER_LOOP(d, dim) { y[offset + d] = x[offset + d] + v[d]; }
  }
}
