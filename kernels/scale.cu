// Broadcast kernels of the Scale layer and of the Bias layer (both use this file).
//
// bottom[0] is viewed as (outer, dim, inner): dim = the count of the scale (or bias) blob, which
// covers axes [axis, axis + its num_axes), outer = the axes before, inner = the axes after.
//   *_planes kernels: one plane per (outer, d) pair, contiguous inner loop; for inner > 1.
//   *_rows kernels:   one plane per outer index, contiguous loop over d; for inner == 1, where a
//                     plane per element would leave nothing to vectorize.
#include "shim.h"

// y = x * scale[d] (also dx = dy * scale[d]). y may be x.
KERNEL void scale_planes(const int planes, const int inner, const int dim, const real* x,
                         const real* scale, real* y) {
  PLANE_LOOP(p, planes) {
    const real s = scale[p % dim];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) { y[offset + j] = x[offset + j] * s; }
  }
}

KERNEL void scale_rows(const int outer, const int dim, const real* x, const real* scale, real* y) {
  PLANE_LOOP(p, outer) {
    const size_t offset = (size_t)p * dim;
    INNER_LOOP(d, dim) { y[offset + d] = x[offset + d] * scale[d]; }
  }
}

// y = x + bias[d] (Bias layer, and Scale's bias_term through it). y may be x.
KERNEL void bias_planes(const int planes, const int inner, const int dim, const real* x,
                        const real* bias, real* y) {
  PLANE_LOOP(p, planes) {
    const real b = bias[p % dim];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) { y[offset + j] = x[offset + j] + b; }
  }
}

KERNEL void bias_rows(const int outer, const int dim, const real* x, const real* bias, real* y) {
  PLANE_LOOP(p, outer) {
    const size_t offset = (size_t)p * dim;
    INNER_LOOP(d, dim) { y[offset + d] = x[offset + d] + bias[d]; }
  }
}

// prod = dy * x element-wise; the scale gradient is its sum over outer and inner (done by the caller).
KERNEL void scale_product(const int count, const real* dy, const real* x, real* prod) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { prod[i] = dy[i] * x[i]; }
  }
}
