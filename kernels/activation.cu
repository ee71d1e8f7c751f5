// Element-wise activations: Sigmoid, TanH, AbsVal (Caffe's neuron layers).
//
// Sigmoid and TanH differentiate through the top data y, as Caffe does, which stays correct in place
// (y overwrites x, and backward needs only y). AbsVal needs the sign of x, which y = |x| has lost; the
// layer keeps a copy of x when it runs in place.
#include "shim.h"

// sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5: no overflow of exp(-x) for large negative x.
KERNEL void sigmoid_forward(const int count, const real* x, real* y) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { y[i] = real(0.5) * tanh(real(0.5) * x[i]) + real(0.5); }
  }
}

KERNEL void sigmoid_backward(const int count, const real* y, const real* dy, real* dx) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { dx[i] = dy[i] * y[i] * (real(1) - y[i]); }
  }
}

KERNEL void tanh_forward(const int count, const real* x, real* y) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { y[i] = tanh(x[i]); }
  }
}

KERNEL void tanh_backward(const int count, const real* y, const real* dy, real* dx) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { dx[i] = dy[i] * (real(1) - y[i] * y[i]); }
  }
}

KERNEL void absval_forward(const int count, const real* x, real* y) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { y[i] = fabs(x[i]); }
  }
}

// dx = sign(x) * dy with sign(0) = 0, as Caffe's caffe_sign.
KERNEL void absval_backward(const int count, const real* x, const real* dy, real* dx) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) {
      const real sign = real(x[i] > real(0)) - real(x[i] < real(0));
      dx[i] = sign * dy[i];
    }
  }
}
