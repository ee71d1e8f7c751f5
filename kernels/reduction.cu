// Reduction (Caffe's ReductionLayer): each of `num` rows of `dim` contiguous values is reduced to one,
// coeff * (SUM: x, ASUM: |x|, SUMSQ: x^2, MEAN: x / dim) summed over the row. The sums are reduce.h's
// deterministic two-stage sums: reduction_partials is stage 1 (the layer passes the divisor to stage 2).
// `op` is ReductionParameter's enum: 1 SUM, 2 ASUM, 3 SUMSQ, 4 MEAN.
#include "reduce.h"

DEVICE real reduction_term(const int op, const real v) {
  return op == 2 ? fabs(v) : (op == 3 ? v * v : v);
}

KERNEL void reduction_partials(const int planes, const int inner, const int lanes, const int op,
                               const real coeff, const real* x, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t j) { return coeff * reduction_term(op, x[j]); }, partial);
  }
}

// dx = scale * dy[row] * (SUM, MEAN: 1; ASUM: sign(x), 0 at 0; SUMSQ: 2 x), as Caffe's backward;
// scale is coeff (coeff / dim for MEAN).
KERNEL void reduction_backward(const int num, const int dim, const int op, const real scale, const real* x,
                               const real* dy, real* dx) {
  PLANE_LOOP(p, num) {
    const real g = (op == 3 ? real(2) : real(1)) * scale * dy[p];
    const size_t offset = (size_t)p * dim;
    INNER_LOOP(j, dim) {
      const real v = x[offset + j];
      const real sign = real(v > real(0)) - real(v < real(0));
      dx[offset + j] = g * (op == 2 ? sign : (op == 3 ? v : real(1)));
    }
  }
}
