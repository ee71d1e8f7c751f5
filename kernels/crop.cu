// Crop: the top is the window of the bottom that starts at `offsets` (one per axis, 0 for the axes
// that are not cropped) and has the top's shape.
//
// Both blobs are seen as rows along their last axis, which is contiguous in both: a plane is one row
// and the inner loop copies it. The shapes and offsets come as int arrays of `axes` values; a row's
// position in the other blob is worked out once per plane (integer division per plane, none per
// element).
#include "shim.h"

// y = the window of x. Planes: the top's rows (every axis but the last), in order; inner: the top's
// last axis.
KERNEL void crop_forward(const int planes, const int axes, const int* top_shape, const int* bottom_shape,
                         const int* offsets, const real* x, real* y) {
  PLANE_LOOP(p, planes) {
    const int width = top_shape[axes - 1];
    // The bottom element of the row's first element: each axis' top index plus its offset, in the
    // bottom's strides (built up from the last axis back).
    size_t start = offsets[axes - 1];
    size_t stride = bottom_shape[axes - 1];
    int rest = p;
    for (int a = axes - 2; a >= 0; --a) {
      const int i = rest % top_shape[a];
      rest /= top_shape[a];
      start += (size_t)(i + offsets[a]) * stride;
      stride *= bottom_shape[a];
    }
    const real* from = x + start;
    real* to = y + (size_t)p * width;
    INNER_LOOP(j, width) { to[j] = from[j]; }
  }
}

// dx = dy inside the window, 0 outside, every element written once (no separate zeroing pass).
// Planes: the bottom's rows, in order; inner: the bottom's last axis, in three disjoint ranges (before,
// inside, after the window).
KERNEL void crop_backward(const int planes, const int axes, const int* top_shape, const int* bottom_shape,
                          const int* offsets, const real* dy, real* dx) {
  PLANE_LOOP(p, planes) {
    const int width = bottom_shape[axes - 1];
    const int top_width = top_shape[axes - 1];
    const int offset = offsets[axes - 1];
    real* to = dx + (size_t)p * width;
    // The top row this bottom row lies in, if it lies in the window on every axis but the last.
    bool inside = true;
    size_t top_row = 0, top_rows = 1;
    int rest = p;
    for (int a = axes - 2; a >= 0; --a) {
      const int i = rest % bottom_shape[a] - offsets[a];
      rest /= bottom_shape[a];
      inside = inside && i >= 0 && i < top_shape[a];
      if (inside) top_row += (size_t)i * top_rows;
      top_rows *= top_shape[a];
    }
    if (!inside) {
      INNER_LOOP(j, width) { to[j] = real(0); }
      continue;
    }
    const real* from = dy + top_row * top_width;
    INNER_LOOP(j, offset) { to[j] = real(0); }
    INNER_LOOP(j, top_width) { to[offset + j] = from[j]; }
    INNER_LOOP(j, width - offset - top_width) { to[offset + top_width + j] = real(0); }
  }
}
