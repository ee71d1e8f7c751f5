// Local response normalisation (Caffe's LRN), both norm regions, as window sums plus element-wise steps.
//
//   scale = shift + mult * sum_window(x^2),   y = x * scale^-beta
//   ACROSS_CHANNELS: window over channels,               shift = k, mult = alpha / local_size
//   WITHIN_CHANNEL:  local_size x local_size spatial box, shift = 1, mult = alpha / local_size^2
//                    (Caffe composes it of square -> AVE pooling, padding counted -> power)
//   dx = dy * scale^-beta - 2 * mult * beta * x * sum_window'(dy * y / scale)
// where window' is the mirrored window (the positions whose window holds this one); for odd
// local_size both windows are the same.
#include "shim.h"

// out[o, l, i] = sum of in[o, l', i] (squared if `squared`) for l' in [l - before, l + after] ∩ [0, length).
// Planes are (o, l) pairs; the window bounds are per plane. One contiguous pass per window tap keeps
// the inner loops vectorizable; on the GPU each thread revisits only its own j, so the passes need no
// synchronisation.
KERNEL void lrn_window_sum(const int planes, const int length, const int inner, const int before,
                           const int after, const int squared, const real* in, real* out) {
  PLANE_LOOP(p, planes) {
    const int l = p % length;
    const int first = l - before < 0 ? 0 : l - before;
    const int last = l + after > length - 1 ? length - 1 : l + after;
    const real* base = in + (size_t)(p - l) * inner;  // start of this o's block
    real* op = out + (size_t)p * inner;
    INNER_LOOP(j, inner) { op[j] = 0; }
    for (int q = first; q <= last; ++q) {
      const real* ip = base + (size_t)q * inner;
      if (squared) {
        INNER_LOOP(j, inner) { op[j] += ip[j] * ip[j]; }
      } else {
        INNER_LOOP(j, inner) { op[j] += ip[j]; }
      }
    }
  }
}

// Window sum along the contiguous last axis (rows of `width`); out-of-row taps count as zero, as
// the zero padding of Caffe's pooling does.
KERNEL void lrn_row_window_sum(const int rows, const int width, const int before, const int after,
                               const int squared, const real* in, real* out) {
  PLANE_LOOP(r, rows) {
    const real* ip = in + (size_t)r * width;
    real* op = out + (size_t)r * width;
    INNER_LOOP(j, width) { op[j] = 0; }
    for (int d = -before; d <= after; ++d) {
      INNER_LOOP(j, width) {
        const int q = j + d;
        const bool inside = q >= 0 && q < width;
        const real v = ip[inside ? q : j];  // a valid address either way; masked below
        op[j] += inside ? (squared ? v * v : v) : real(0);
      }
    }
  }
}

// scale^-beta without pow: glibc's vector powf is about 3x slower than its exp and log together.
// beta = 0.75 (Caffe's default, AlexNet's) is 1 / (sqrt(s) * sqrt(sqrt(s))): square roots only, at
// memory speed. Both forms are within a few ulps of pow. The test on beta is the same for every
// element, so the compiler moves it out of the loop (one vectorized loop per case).
DEVICE real lrn_power(const real scale, const real beta) {
  if (beta == real(0.75)) {
    const real root = sqrt(scale);
    return real(1) / (root * sqrt(root));
  }
  return exp(-beta * log(scale));
}

// scale = shift + mult * sum (in place on `sum` allowed), y = x * scale^-beta.
KERNEL void lrn_forward_output(const int count, const real* x, const real* sum, real* scale, real* y,
                               const real shift, const real mult, const real beta) {
  ELEMENT_LOOP(i, count) {
    const real s = shift + mult * sum[i];
    scale[i] = s;
    y[i] = x[i] * lrn_power(s, beta);
  }
}

// First backward step: dx = dy * scale^-beta, ratio = dy * y / scale with y recomputed from x, so a
// later in-place layer that overwrote the top does not matter.
KERNEL void lrn_backward_ratio(const int count, const real* x, const real* dy, const real* scale,
                               real* ratio, real* dx, const real beta) {
  ELEMENT_LOOP(i, count) {
    const real power = lrn_power(scale[i], beta);
    dx[i] = dy[i] * power;
    ratio[i] = dy[i] * x[i] * power / scale[i];
  }
}

// Last backward step: dx -= coeff * x * window_sum(ratio), coeff = 2 * mult * beta.
KERNEL void lrn_backward_finish(const int count, const real* x, const real* ratio_sum, real* dx,
                                const real coeff) {
  ELEMENT_LOOP(i, count) { dx[i] -= coeff * x[i] * ratio_sum[i]; }
}
