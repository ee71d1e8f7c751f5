// PReLU: y = max(x, 0) + a_c * min(x, 0), one learned slope a_c per channel (or one for all).
//
// The bottom is seen as planes (n, c) of `inner` contiguous elements (the spatial axes; 1 for a
// 2-D (N, C) blob). The slope of plane p is slope[p % slope_channels]: slope_channels is C for
// per-channel slopes and 1 when the slope is channel-shared (then every plane uses slope[0]).
//
// In place, the layer may keep only a byte per element (the "lean" keep): the sign mask x > 0, with
// x <= 0 read back from the output as y / a (all slopes nonzero; else it keeps a full copy of x). The
// slope gradient's term for x <= 0 is therefore dy * x_back with x_back = (a * x) / a, a != 0 -- in
// every path, also when x itself is at hand: (a * x) / a is not always x in floating point, and this
// way in place and not in place give the same bits. (With a = 0 the lean keep is never used and
// x_back = x.) It differs from dy * x by at most an ulp.
#include "reduce.h"

// Caffe's max(x, 0) + a * min(x, 0) (+0, not -0, for a = 0; nan stays nan), written with selects
// because GCC does not vectorize fmax/fmin here.
DEVICE real prelu_value(const real v, const real a) {
  return (v > real(0) ? v : real(0)) + a * (v > real(0) ? real(0) : v);
}

// x as the slope gradient sees it (see above), from x or, lean, from y = prelu_value(x, a) (for x <= 0,
// y is a * x, or +0 where a * x is -0: the same quotient up to the sign of a zero, which no sum sees).
DEVICE real prelu_x_back(const real v, const real a, const int v_is_y) {
  return v_is_y ? v / a : (a != real(0) ? (a * v) / a : v);
}

KERNEL void prelu_forward(const int planes, const int slope_channels, const int inner, const real* x,
                          real* y, const real* slope) {
  PLANE_LOOP(p, planes) {
    const real a = slope[p % slope_channels];
    const real* xp = x + (size_t)p * inner;
    real* yp = y + (size_t)p * inner;
    INNER_LOOP(j, inner) { yp[j] = prelu_value(xp[j], a); }
  }
}

// prelu_forward that also writes the lean keep's sign mask, positive = x > 0 (y may be x).
KERNEL void prelu_forward_masked(const int planes, const int slope_channels, const int inner, const real* x,
                                 real* y, const real* slope, unsigned char* positive) {
  PLANE_LOOP(p, planes) {
    const real a = slope[p % slope_channels];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const real v = x[offset + j];
      positive[offset + j] = v > real(0);
      y[offset + j] = prelu_value(v, a);
    }
  }
}

// The backward, one pass over its inputs: dx = dy where x > 0, a_c * dy elsewhere (Caffe's convention at
// x == 0), written when write_dx; and the slope gradient's stage-1 partial sums (reduce.h) of
// dy * x_back where x <= 0. `kept` is x (positive unused) or, lean, y with the mask `positive`
// (kept_is_y = 1). dx may alias dy: each element is read before it is written.
KERNEL void prelu_backward(const int planes, const int inner, const int lanes, const int slope_channels,
                           const real* kept, const unsigned char* positive, const int kept_is_y,
                           const real* dy, real* dx, const int write_dx, const real* slope, real* partial) {
  PLANE_LOOP(p, planes) {
    const real a = slope[p % slope_channels];
    mc_plane_partials(p, inner, lanes, [=](size_t j) {
      const real v = kept[j], g = dy[j];
      const bool up = kept_is_y ? positive[j] != 0 : v > real(0);
      if (write_dx) dx[j] = up ? g : a * g;
      return up ? real(0) : g * prelu_x_back(v, a, kept_is_y);
    }, partial);
  }
}

// The *_rows kernels: the same math for a blob whose planes hold one element (inner == 1, e.g. an
// (N, C) blob after InnerProduct). A plane per element would leave every loop one element long; here a
// plane is a row of the C channels, contiguous, and the slope goes with the inner index. The backward
// writes each element's term as its own partial (0 + term, as mc_plane_partials with one lane does), so
// stage 2 sums the same values in the same order as the per-element planes would: the same bits.
DEVICE real prelu_row_slope(const real* slope, const int slope_channels, const int c) {
  return slope[slope_channels == 1 ? 0 : c];
}

KERNEL void prelu_forward_rows(const int rows, const int channels, const int slope_channels, const real* x,
                               real* y, const real* slope) {
  PLANE_LOOP(r, rows) {
    const real* xr = x + (size_t)r * channels;
    real* yr = y + (size_t)r * channels;
    INNER_LOOP(c, channels) { yr[c] = prelu_value(xr[c], prelu_row_slope(slope, slope_channels, c)); }
  }
}

KERNEL void prelu_forward_masked_rows(const int rows, const int channels, const int slope_channels,
                                      const real* x, real* y, const real* slope, unsigned char* positive) {
  PLANE_LOOP(r, rows) {
    const size_t offset = (size_t)r * channels;
    INNER_LOOP(c, channels) {
      const real v = x[offset + c];
      positive[offset + c] = v > real(0);
      y[offset + c] = prelu_value(v, prelu_row_slope(slope, slope_channels, c));
    }
  }
}

KERNEL void prelu_backward_rows(const int rows, const int channels, const int slope_channels,
                                const real* kept, const unsigned char* positive, const int kept_is_y,
                                const real* dy, real* dx, const int write_dx, const real* slope,
                                real* partial) {
  PLANE_LOOP(r, rows) {
    const size_t offset = (size_t)r * channels;
    INNER_LOOP(c, channels) {
      const size_t i = offset + c;
      const real a = prelu_row_slope(slope, slope_channels, c);
      const real v = kept[i], g = dy[i];
      const bool up = kept_is_y ? positive[i] != 0 : v > real(0);
      if (write_dx) dx[i] = up ? g : a * g;
      partial[i] = real(0) + (up ? real(0) : g * prelu_x_back(v, a, kept_is_y));
    }
  }
}
