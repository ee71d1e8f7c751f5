// ReLU with Caffe's negative_slope: y = max(x, 0) + negative_slope * min(x, 0) (no -0 for slope 0).
// Backward needs only whether x > 0: in place, the layer keeps that as a byte mask (the *_masked
// kernels) instead of a copy of x.
#include "shim.h"

DEVICE real relu_value(const real v, const real negative_slope) {
  return rmax(v, real(0)) + negative_slope * rmin(v, real(0));
}

// Which side of the kink x is on, for backward: the one comparison of both backward paths.
DEVICE bool relu_positive(const real v) { return v > real(0); }

DEVICE real relu_dx(const bool positive, const real g, const real negative_slope) {
  return positive ? g : negative_slope * g;
}

KERNEL void relu_forward(const int count, const real* x, real* y, const real negative_slope) {
  ELEMENT_LOOP(i, count) { y[i] = relu_value(x[i], negative_slope); }
}

// relu_forward that also keeps positive = x > 0 for backward (y may be x).
KERNEL void relu_forward_masked(const int count, const real* x, real* y, const real negative_slope,
                                unsigned char* positive) {
  ELEMENT_LOOP(i, count) {
    const real v = x[i];
    positive[i] = relu_positive(v);
    y[i] = relu_value(v, negative_slope);
  }
}

// Picks the branch from the forward's input x. dx may alias dy.
KERNEL void relu_backward(const int count, const real* x, const real* dy, real* dx,
                          const real negative_slope) {
  ELEMENT_LOOP(i, count) { dx[i] = relu_dx(relu_positive(x[i]), dy[i], negative_slope); }
}

// relu_backward from the mask relu_forward_masked kept.
KERNEL void relu_backward_masked(const int count, const unsigned char* positive, const real* dy, real* dx,
                                 const real negative_slope) {
  ELEMENT_LOOP(i, count) { dx[i] = relu_dx(positive[i] != 0, dy[i], negative_slope); }
}
