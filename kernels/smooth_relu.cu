// BNLL and Swish (Caffe's neuron layers): smooth relatives of ReLU whose derivatives are sigmoids.
//
//   BNLL:  y = log(1 + exp(x)) (softplus),  dy/dx = sigmoid(x)
//   Swish: y = x * sigmoid(beta x),         dy/dx = beta y + sigmoid(beta x) * (1 - beta y)
//
// Both differentiate from x (y does not give the sigmoid back accurately, or at all for Swish).
// dx may alias dy: each element is read before it is written.
#include "shim.h"

// sigmoid(v) = 0.5 * tanh(0.5 v) + 0.5, as the Sigmoid layer computes it: no overflow of exp(-v).
DEVICE real sigmoid_of(const real v) { return real(0.5) * tanh(real(0.5) * v) + real(0.5); }

// log(1 + e) for 0 <= e <= 1, accurate also where 1 + e rounds to 1 (e tiny), with log alone (which
// vectorizes): log(u) * e / (u - 1) for u = 1 + e corrects u's rounding (u - 1 is exact).
DEVICE real log_one_plus(const real e) {
  const real u = real(1) + e;
  return u == real(1) ? e : log(u) * (e / (u - real(1)));
}

// max(x, 0) + log(1 + exp(-|x|)): Caffe's two branches in one expression, no overflow of exp.
KERNEL void bnll_forward(const int count, const real* x, real* y) {
  ELEMENT_LOOP(i, count) {
    const real v = x[i];
    y[i] = (v > real(0) ? v : real(0)) + log_one_plus(exp(-fabs(v)));
  }
}

KERNEL void bnll_backward(const int count, const real* x, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * sigmoid_of(x[i]); }
}

KERNEL void swish_forward(const int count, const real* x, real* y, const real beta) {
  ELEMENT_LOOP(i, count) { y[i] = x[i] * sigmoid_of(beta * x[i]); }
}

// Caffe's form beta y + s (1 - beta y), with y and s = sigmoid(beta x) recomputed from x.
KERNEL void swish_backward(const int count, const real* x, const real* dy, real* dx, const real beta) {
  ELEMENT_LOOP(i, count) {
    const real v = x[i];
    const real s = sigmoid_of(beta * v);
    const real beta_y = beta * (v * s);
    dx[i] = dy[i] * (beta_y + s * (real(1) - beta_y));
  }
}
