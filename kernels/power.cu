// Power: y = (shift + scale * x)^power, with cheaper kernels for power 1 and 2. The constant cases
// (power 0 or scale 0) need no kernel: the layer fills y and zeroes dx.
#include "shim.h"

KERNEL void power_forward(const int count, const real* x, real* y, const real power, const real scale,
                          const real shift) {
  ELEMENT_LOOP(i, count) { y[i] = pow(shift + scale * x[i], power); }
}

KERNEL void power_forward_linear(const int count, const real* x, real* y, const real scale,
                                 const real shift) {
  ELEMENT_LOOP(i, count) { y[i] = shift + scale * x[i]; }
}

KERNEL void power_forward_square(const int count, const real* x, real* y, const real scale,
                                 const real shift) {
  ELEMENT_LOOP(i, count) {
    const real base = shift + scale * x[i];
    y[i] = base * base;
  }
}

// dx = dy * power * scale * (shift + scale * x)^(power - 1), from x itself: Caffe's y / x shortcut
// divides by zero at x == 0 and is wrong in place, where y has overwritten x. dx may alias dy.
KERNEL void power_backward(const int count, const real* x, const real* dy, real* dx, const real power,
                           const real scale, const real shift) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * power * scale * pow(shift + scale * x[i], power - real(1)); }
}

KERNEL void power_backward_linear(const int count, const real* dy, real* dx, const real scale) {
  ELEMENT_LOOP(i, count) { dx[i] = scale * dy[i]; }
}

KERNEL void power_backward_square(const int count, const real* x, const real* dy, real* dx,
                                  const real scale, const real shift) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * real(2) * scale * (shift + scale * x[i]); }
}
