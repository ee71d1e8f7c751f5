// Eltwise: element-wise PROD, SUM (with coefficients) or MAX over several bottoms of one shape.
// The layer calls these pairwise, one bottom at a time, so any number of bottoms works.
#include "shim.h"

// y = a * b
KERNEL void eltwise_prod(const int count, const real* a, const real* b, real* y) {
  ELEMENT_LOOP(i, count) { y[i] = a[i] * b[i]; }
}

// y *= a
KERNEL void eltwise_prod_into(const int count, const real* a, real* y) {
  ELEMENT_LOOP(i, count) { y[i] *= a[i]; }
}

// y = coeff * a
KERNEL void eltwise_scale(const int count, const real* a, real* y, const real coeff) {
  ELEMENT_LOOP(i, count) { y[i] = coeff * a[i]; }
}

// y = coeff_a * a + coeff_b * b: the first two bottoms of a SUM in one pass (3 arrays of memory traffic
// instead of eltwise_scale then eltwise_axpy's 5).
KERNEL void eltwise_sum2(const int count, const real* a, const real* b, real* y, const real coeff_a,
                         const real coeff_b) {
  ELEMENT_LOOP(i, count) { y[i] = coeff_a * a[i] + coeff_b * b[i]; }
}

// y += coeff * a
KERNEL void eltwise_axpy(const int count, const real* a, real* y, const real coeff) {
  ELEMENT_LOOP(i, count) { y[i] += coeff * a[i]; }
}

// Bottoms 0 and 1. Caffe's tie rule: bottom 0 wins only when strictly greater (a tie goes to 1).
KERNEL void eltwise_max_first(const int count, const real* a, const real* b, real* y, int* mask) {
  ELEMENT_LOOP(i, count) {
    const bool first = a[i] > b[i];
    y[i] = first ? a[i] : b[i];
    mask[i] = first ? 0 : 1;
  }
}

// Bottom `index` >= 2 takes over only when strictly greater: a tie stays with the earlier bottom.
KERNEL void eltwise_max_next(const int count, const real* b, real* y, int* mask, const int index) {
  ELEMENT_LOOP(i, count) {
    const bool take = b[i] > y[i];
    y[i] = take ? b[i] : y[i];
    mask[i] = take ? index : mask[i];
  }
}

// dx = dy where bottom `index` gave the max, 0 elsewhere.
KERNEL void eltwise_max_backward(const int count, const real* dy, const int* mask, real* dx,
                                 const int index) {
  ELEMENT_LOOP(i, count) { dx[i] = mask[i] == index ? dy[i] : real(0); }
}

// Caffe's unstable PROD gradient: dx = dy * y / x (inf or nan where x == 0).
KERNEL void eltwise_prod_backward_div(const int count, const real* y, const real* x, const real* dy,
                                      real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * y[i] / x[i]; }
}
