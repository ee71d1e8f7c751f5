// Broadcast kernels of the Scale and Bias layers: y = x * v[d], y = x + v[d], and Scale with a bias term
// in one pass: y = x * v[d] + b[d] (the product rounded first, as the two passes round it).
//
// x is viewed as (outer, dim, inner): dim = the count of the broadcast blob v, which covers axes
// [axis, axis + its num_axes), outer = the axes before, inner = the axes after.
//   *_planes kernels: one plane per (outer, d) pair, contiguous inner loop; for inner > 1.
//   *_rows kernels:   one plane per outer index, contiguous loop over d; for inner == 1, where a
//                     plane per element would leave nothing to vectorize.
// y may be x (in place). Scale's backward uses broadcast_mul too: dx = dy * v[d].
#include "reduce.h"

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

// Scale's backward with a bias term, from one read of dy and x: the bias gradient's and the scale
// gradient's partial sums (reduce.h; the terms dy and dy * x of reduce.cu's sum_and_product_partials, in
// its layout and order: the same bits) and dx = (dy * v[d]) * factor[d]: broadcast_mul's dy * v[d] for a
// factor of ones, or with the factor 1 / sqrt(var + eps) also the input gradient of the BatchNorm (global
// statistics) that the Net fused with this Scale (bn_normalize's, rounded the same). dx is written by the
// second term, after the plane's last read of dy, so dx may be dy (in place); the first term's read of a
// plane leaves it in the cache for the second's.
KERNEL void scale_bias_backward_partials(const int planes, const int inner, const int lanes, const int dim,
                                         const real* dy, const real* x, const real* v, const real* factor,
                                         real* dx, real* partial) {
  PLANE_LOOP(p, planes) {
    const real s = v[p % dim], f = factor[p % dim];
    mc_plane_partials_pair(p, inner, lanes, dim, [=](size_t j) { return dy[j]; },
                           [=](size_t j) {
                             const real g = dy[j];
                             dx[j] = (g * s) * f;
                             return g * x[j];
                           }, partial);
  }
}

// The product and the sum are rounded separately, so the bits are those of broadcast_mul then
// broadcast_add (and Caffe's two passes): no fused multiply-add. GCC contracts across statements unless
// told not to (from here to the end of the file: the kernels below), clang within an expression only;
// on the GPU the _rn intrinsics are never contracted.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
DEVICE float mul_rn(const float a, const float b) { return __fmul_rn(a, b); }
DEVICE double mul_rn(const double a, const double b) { return __dmul_rn(a, b); }
#else
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
DEVICE real mul_rn(const real a, const real b) { return a * b; }
#endif

DEVICE real mul_add(const real x, const real s, const real b) {
  const real scaled = mul_rn(x, s);
  return scaled + b;
}

// Scale with a bias term applied to a BatchNorm's output in the pass that normalizes (the Net fuses an
// in-place BatchNorm with global statistics and the in-place Scale after it): t = (x - mean[c]) *
// inv_std[c], rounded as bn_normalize rounds it, kept for Scale's backward, and y = t * v[c] + bias[c]
// rounded as broadcast_mul_add_planes rounds it, so y and kept have the bits of the two layers apart.
// One read of x and two writes, where the two layers read and wrote the blob twice and kept t too.
KERNEL void normalize_mul_add_planes(const int planes, const int inner, const int dim, const real* x,
                                     const real* mean, const real* inv_std, const real* v, const real* bias,
                                     real* y, real* kept) {
  PLANE_LOOP(p, planes) {
    const real m = mean[p % dim], r = inv_std[p % dim], s = v[p % dim], b = bias[p % dim];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const real t = (x[offset + j] - m) * r;
      kept[offset + j] = t;
      y[offset + j] = mul_add(t, s, b);
    }
  }
}

// With keep (Scale in place, whose backward reads x): x is also copied to kept in the same pass, where a
// separate copy before the kernel read and wrote x once more (on one core). y may be x; kept is not.
KERNEL void broadcast_mul_add_planes(const int planes, const int inner, const int dim, const real* x,
                                     const real* v, const real* bias, real* y, real* kept, const int keep) {
  PLANE_LOOP(p, planes) {
    const real s = v[p % dim], b = bias[p % dim];
    const size_t offset = (size_t)p * inner;
    if (keep) {
      INNER_LOOP(j, inner) {
        const real value = x[offset + j];
        kept[offset + j] = value;
        y[offset + j] = mul_add(value, s, b);
      }
    } else {
      INNER_LOOP(j, inner) { y[offset + j] = mul_add(x[offset + j], s, b); }
    }
  }
}

KERNEL void broadcast_mul_add_rows(const int outer, const int dim, const real* x, const real* v,
                                   const real* bias, real* y, real* kept, const int keep) {
  PLANE_LOOP(p, outer) {
    const size_t offset = (size_t)p * dim;
    if (keep) {
      INNER_LOOP(d, dim) {
        const real value = x[offset + d];
        kept[offset + d] = value;
        y[offset + d] = mul_add(value, v[d], bias[d]);
      }
    } else {
      INNER_LOOP(d, dim) { y[offset + d] = mul_add(x[offset + d], v[d], bias[d]); }
    }
  }
}
