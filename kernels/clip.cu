// Clip and Threshold (Caffe's neuron layers): comparisons of x with constants.
//
// Clip's gradient passes where min <= x <= max, which y has lost at the bounds; in place the layer
// keeps that as a byte mask (the *_masked kernels), as ReLU does. dx may alias dy.
#include "shim.h"

// Caffe's std::max(min, std::min(x, max)) written out: a nan x gives min, as in Caffe.
DEVICE real clip_value(const real v, const real lo, const real hi) {
  const real upper = hi < v ? hi : v;
  return lo < upper ? upper : lo;
}

DEVICE bool clip_passes(const real v, const real lo, const real hi) { return v >= lo && v <= hi; }

KERNEL void clip_forward(const int count, const real* x, real* y, const real lo, const real hi) {
  ELEMENT_LOOP(i, count) { y[i] = clip_value(x[i], lo, hi); }
}

// clip_forward that also keeps passes = (min <= x <= max) for backward (y may be x).
KERNEL void clip_forward_masked(const int count, const real* x, real* y, const real lo, const real hi,
                                unsigned char* passes) {
  ELEMENT_LOOP(i, count) {
    const real v = x[i];
    passes[i] = clip_passes(v, lo, hi);
    y[i] = clip_value(v, lo, hi);
  }
}

// dx = dy * [min <= x <= max] (a product, as in Caffe: a nan dy stays nan; the select, not real(bool),
// lets GCC vectorize the loop).
KERNEL void clip_backward(const int count, const real* x, const real* dy, real* dx, const real lo,
                          const real hi) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * (clip_passes(x[i], lo, hi) ? real(1) : real(0)); }
}

// clip_backward from the mask clip_forward_masked kept.
KERNEL void clip_backward_masked(const int count, const unsigned char* passes, const real* dy, real* dx) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * (passes[i] != 0 ? real(1) : real(0)); }
}

// Threshold: y = 1 where x > threshold, else 0 (nan gives 0). It has no backward (see threshold's layer).
KERNEL void threshold_forward(const int count, const real* x, real* y, const real threshold) {
  ELEMENT_LOOP(i, count) { y[i] = x[i] > threshold ? real(1) : real(0); }
}
