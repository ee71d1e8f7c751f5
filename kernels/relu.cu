// ReLU with Caffe's negative_slope: y = max(x, 0) + negative_slope * min(x, 0) (no -0 for slope 0).
#include "shim.h"

KERNEL void relu_forward(const int count, const real* x, real* y, const real negative_slope) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { y[i] = rmax(x[i], real(0)) + negative_slope * rmin(x[i], real(0)); }
  }
}

// Picks the branch from the forward's input x (in place, the layer passes a copy it kept).
KERNEL void relu_backward(const int count, const real* x, const real* dy, real* dx,
                          const real negative_slope) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { dx[i] = x[i] > 0 ? dy[i] : negative_slope * dy[i]; }
  }
}
