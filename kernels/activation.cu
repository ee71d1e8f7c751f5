// Element-wise activations: Sigmoid, TanH, AbsVal (Caffe's neuron layers).
//
// Sigmoid and TanH differentiate through the top data y, as Caffe does, which stays correct in place
// (y overwrites x, and backward needs only y). AbsVal needs the sign of x, which y = |x| has lost; in
// place the layer keeps it as one byte per element (the *_masked kernels).
#include "shim.h"

// sigmoid(x) = 1 / (1 + e^-x). e^-x may overflow to inf for large negative x, which gives the right 0
// (no nan: the build does not trap). Caffe's 0.5 tanh(x / 2) + 0.5 cancels there (relative error) and
// is slower: on the CPU libmvec's vector tanh costs more than its exp and a division (0.45 against
// 0.35 ns an element per core, which made the kernel compute-bound at the 8 MB size).
KERNEL void sigmoid_forward(const int count, const real* x, real* y) {
  ELEMENT_LOOP(i, count) { y[i] = real(1) / (real(1) + exp(-x[i])); }
}

KERNEL void sigmoid_backward(const int count, const real* y, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * y[i] * (real(1) - y[i]); }
}

KERNEL void tanh_forward(const int count, const real* x, real* y) {
  ELEMENT_LOOP(i, count) { y[i] = tanh(x[i]); }
}

KERNEL void tanh_backward(const int count, const real* y, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * (real(1) - y[i] * y[i]); }
}

// The sign of x kept in a byte: bit 0 for x > 0, bit 1 for x < 0 (neither for 0 and nan).
DEVICE unsigned char sign_code(const real v) { return (unsigned char)((v > real(0)) | ((v < real(0)) << 1)); }

// dx = sign(x) * dy with sign(0) = 0, as Caffe's caffe_sign; the sign from sign_code's bits.
DEVICE real absval_dx(const unsigned char code, const real g) {
  return (real(code & 1) - real(code >> 1)) * g;
}

KERNEL void absval_forward(const int count, const real* x, real* y) {
  ELEMENT_LOOP(i, count) { y[i] = fabs(x[i]); }
}

// absval_forward that also keeps sign = sign_code(x) for backward (y may be x).
KERNEL void absval_forward_masked(const int count, const real* x, real* y, unsigned char* sign) {
  ELEMENT_LOOP(i, count) {
    const real v = x[i];
    sign[i] = sign_code(v);
    y[i] = fabs(v);
  }
}

KERNEL void absval_backward(const int count, const real* x, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = absval_dx(sign_code(x[i]), dy[i]); }
}

// absval_backward from the signs absval_forward_masked kept.
KERNEL void absval_backward_masked(const int count, const unsigned char* sign, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = absval_dx(sign[i], dy[i]); }
}
