// PReLU: y = max(x, 0) + a_c * min(x, 0), one learned slope a_c per channel (or one for all).
//
// The bottom is seen as planes (n, c) of `inner` contiguous elements (the spatial axes; 1 for a
// 2-D (N, C) blob). The slope of plane p is slope[p % slope_channels]: slope_channels is C for
// per-channel slopes and 1 when the slope is channel-shared (then every plane uses slope[0]).
#include "shim.h"

KERNEL void prelu_forward(const int planes, const int slope_channels, const int inner, const real* x,
                          real* y, const real* slope) {
  PLANE_LOOP(p, planes) {
    const real a = slope[p % slope_channels];
    const real* xp = x + (size_t)p * inner;
    real* yp = y + (size_t)p * inner;
    // Caffe's max(x, 0) + a * min(x, 0) (+0, not -0, for a = 0; nan stays nan), written with
    // selects because GCC does not vectorize fmax/fmin here.
    INNER_LOOP(j, inner) {
      const real v = xp[j];
      yp[j] = (v > real(0) ? v : real(0)) + a * (v > real(0) ? real(0) : v);
    }
  }
}

// dx = dy where x > 0, a_c * dy elsewhere (Caffe's convention at x == 0). x must be the forward's
// input, not its output: with a negative slope sign(y) differs from sign(x). dx may alias dy.
KERNEL void prelu_backward(const int planes, const int slope_channels, const int inner, const real* x,
                           const real* dy, real* dx, const real* slope) {
  PLANE_LOOP(p, planes) {
    const real a = slope[p % slope_channels];
    const real* xp = x + (size_t)p * inner;
    const real* dyp = dy + (size_t)p * inner;
    real* dxp = dx + (size_t)p * inner;
    INNER_LOOP(j, inner) { dxp[j] = xp[j] > real(0) ? dyp[j] : a * dyp[j]; }
  }
}

// Per-element terms of the slope gradient, dy * x where x <= 0 (0 elsewhere). Many elements add
// into one slope, so they go to a buffer that the caller sums per channel (race-free on the GPU).
KERNEL void prelu_slope_terms(const int count, const real* x, const real* dy, real* terms) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { terms[i] = x[i] <= real(0) ? dy[i] * x[i] : real(0); }
  }
}
