// Softmax over one axis of a blob viewed as (outer, channels, inner): y = exp(x - max) / sum exp(x - max).
//
// inner == 1 (class scores, (N, C)): each row's channels are contiguous, so the channel loops are the
// vectorized ones (SIMD max and sum reductions on the CPU); on the GPU one thread runs a row.
//
// inner > 1: the channel loop runs outside a contiguous loop over the inner (spatial) index j, so each
// pass is a plain vectorizable loop on the CPU and a coalesced one on the GPU. Per-j running values
// (max, sum, dot) live in `scratch` (2 * outer * inner values). The INNER_LOOP maps each j to the same
// GPU thread in every pass, so a thread only ever reads the scratch values and the elements that it
// wrote itself: race-free without synchronization. Each element is read before it is written at the
// same place, so both kernels are also correct in place (x == y, or dy == dx).
#include "shim.h"

// ROW_THREAD: the statement after it runs once per plane: on the GPU in one thread (the plane's
// first), on the CPU in the plane loop's own iteration. ROW_SIMD(clauses): the loop after it is an
// `omp simd` loop with those clauses on the CPU (in a row, i.e. one GPU thread, a plain sequential loop).
// A SIMD reduction sums in a fixed order (per lane, then the lanes), so results are the same every run.
#ifdef MC_GPU_LOOPS
#define ROW_THREAD INNER_LOOP(row_thread_, 1)
#define ROW_SIMD(clauses)
#else
#define ROW_THREAD
#define MC_PRAGMA(text) _Pragma(#text)
#define ROW_SIMD(clauses) MC_PRAGMA(omp simd clauses)
#endif

DEVICE void softmax_row(const int channels, const real* x, real* y) {
  real m = x[0];
  ROW_SIMD(reduction(max : m))
  for (int c = 1; c < channels; ++c) m = x[c] > m ? x[c] : m;
  real s = real(0);
  ROW_SIMD(reduction(+ : s))
  for (int c = 0; c < channels; ++c) {
    const real e = exp(x[c] - m);
    y[c] = e;
    s += e;
  }
  const real r = real(1) / s;
  ROW_SIMD()
  for (int c = 0; c < channels; ++c) y[c] *= r;
}

DEVICE void softmax_row_backward(const int channels, const real* y, const real* dy, real* dx) {
  real s = real(0);
  ROW_SIMD(reduction(+ : s))
  for (int c = 0; c < channels; ++c) s += dy[c] * y[c];
  ROW_SIMD()
  for (int c = 0; c < channels; ++c) dx[c] = y[c] * (dy[c] - s);
}

KERNEL void softmax_forward(const int outer, const int channels, const int inner, const real* x,
                            real* y, real* scratch) {
  if (inner == 1) {
    PLANE_LOOP(p, outer) {
      ROW_THREAD softmax_row(channels, x + (size_t)p * channels, y + (size_t)p * channels);
    }
    return;
  }
  PLANE_LOOP(p, outer) {
    const size_t base = (size_t)p * channels * inner;
    const real* xp = x + base;
    real* yp = y + base;
    real* m = scratch + (size_t)p * inner;                  // running max
    real* s = scratch + ((size_t)outer + p) * inner;        // running sum, then its reciprocal
    // Subtracting the maximum keeps exp() from overflowing; the result is unchanged.
    INNER_LOOP(j, inner) {
      m[j] = xp[j];
      s[j] = real(0);
    }
    for (int c = 1; c < channels; ++c) {
      const real* xc = xp + (size_t)c * inner;
      INNER_LOOP(j, inner) { m[j] = xc[j] > m[j] ? xc[j] : m[j]; }
    }
    for (int c = 0; c < channels; ++c) {
      const real* xc = xp + (size_t)c * inner;
      real* yc = yp + (size_t)c * inner;
      INNER_LOOP(j, inner) {
        const real e = exp(xc[j] - m[j]);
        yc[j] = e;
        s[j] += e;
      }
    }
    INNER_LOOP(j, inner) { s[j] = real(1) / s[j]; }
    for (int c = 0; c < channels; ++c) {
      real* yc = yp + (size_t)c * inner;
      INNER_LOOP(j, inner) { yc[j] *= s[j]; }
    }
  }
}

// dx = y * (dy - sum_c dy * y), from the top data y (Caffe does the same).
KERNEL void softmax_backward(const int outer, const int channels, const int inner, const real* y,
                             const real* dy, real* dx, real* scratch) {
  if (inner == 1) {
    PLANE_LOOP(p, outer) {
      const size_t base = (size_t)p * channels;
      ROW_THREAD softmax_row_backward(channels, y + base, dy + base, dx + base);
    }
    return;
  }
  PLANE_LOOP(p, outer) {
    const size_t base = (size_t)p * channels * inner;
    real* s = scratch + (size_t)p * inner;
    INNER_LOOP(j, inner) { s[j] = real(0); }
    for (int c = 0; c < channels; ++c) {
      const size_t k = base + (size_t)c * inner;
      INNER_LOOP(j, inner) { s[j] += dy[k + j] * y[k + j]; }
    }
    for (int c = 0; c < channels; ++c) {
      const size_t k = base + (size_t)c * inner;
      INNER_LOOP(j, inner) { dx[k + j] = y[k + j] * (dy[k + j] - s[j]); }
    }
  }
}
