// ELU, Exp and Log (Caffe's neuron layers).
//
// ELU and Exp differentiate through their output y, as Caffe does. Their backward kernels read `kept`:
// y itself (kept_is_y = 1, read back from the top) or x (kept_is_y = 0), from which they recompute y with
// the forward's own function. ELU branches on kept > 0, which is the same test for x and y when
// alpha >= 0 (the layer reads y only then). dx may alias dy: each element is read before it is written.
#include "shim.h"

// Caffe's max(x, 0) + alpha * (exp(min(x, 0)) - 1), with selects (nan stays nan).
DEVICE real elu_value(const real v, const real alpha) {
  return (v > real(0) ? v : real(0)) + alpha * (exp(v > real(0) ? real(0) : v) - real(1));
}

KERNEL void elu_forward(const int count, const real* x, real* y, const real alpha) {
  ELEMENT_LOOP(i, count) { y[i] = elu_value(x[i], alpha); }
}

// dx = dy where x > 0, dy * (alpha + y) elsewhere (Caffe's convention at x == 0).
KERNEL void elu_backward(const int count, const real* kept, const int kept_is_y, const real* dy, real* dx,
                         const real alpha) {
  ELEMENT_LOOP(i, count) {
    const real v = kept[i];
    const real y = kept_is_y ? v : elu_value(v, alpha);
    dx[i] = v > real(0) ? dy[i] : dy[i] * (alpha + y);
  }
}

// Exp: y = outer_scale * exp(inner_scale * x), with inner_scale = ln(base) * scale and
// outer_scale = base^shift, as Caffe folds base, scale and shift.
DEVICE real exp_value(const real v, const real inner_scale, const real outer_scale) {
  return outer_scale * exp(inner_scale * v);
}

KERNEL void exp_forward(const int count, const real* x, real* y, const real inner_scale,
                        const real outer_scale) {
  ELEMENT_LOOP(i, count) { y[i] = exp_value(x[i], inner_scale, outer_scale); }
}

// dx = dy * y * inner_scale.
KERNEL void exp_backward(const int count, const real* kept, const int kept_is_y, const real* dy, real* dx,
                         const real inner_scale, const real outer_scale) {
  ELEMENT_LOOP(i, count) {
    const real v = kept[i];
    const real y = kept_is_y ? v : exp_value(v, inner_scale, outer_scale);
    dx[i] = y * dy[i] * inner_scale;
  }
}

// Log: y = output_scale * log(scale * x + shift), with output_scale = 1 / ln(base).
KERNEL void log_forward(const int count, const real* x, real* y, const real scale, const real shift,
                        const real output_scale) {
  ELEMENT_LOOP(i, count) { y[i] = output_scale * log(scale * x[i] + shift); }
}

// dx = dy * gradient_scale / (scale * x + shift), gradient_scale = scale / ln(base); from x (y gives x
// back only up to rounding).
KERNEL void log_backward(const int count, const real* x, const real* dy, real* dx, const real scale,
                         const real shift, const real gradient_scale) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * (gradient_scale / (scale * x[i] + shift)); }
}
