// Max and average pooling, following Caffe's PoolingLayer exactly (window clipping, divisor, ties).
//
// Forward: one plane per (n, c, output row); the inner index is the output column, and the window is
// looped inside. Windows that lie inside the image (all but the edges') skip the clipping, and at 2x2 / 2
// and 3x3 / 2 have a fixed size that the compiler unrolls and vectorizes across the row: 3-8x faster
// than clipping each window, the same results. Average backward is a gather (as Caffe's GPU
// AvePoolBackward): one plane per (n, c, input row), the inner index the input column, summing over the
// output cells whose windows cover that pixel, so every iteration writes only its own dx and nothing
// races on the GPU. The range of output columns covering input column w needs a division by the stride;
// it is precomputed per column on the host (col_start[w], col_end[w]) so the inner loop has none. Max
// backward scatters through the argmax (pool_max_backward), or for 2x2 / 2 on wide rows gathers
// (pool_max_backward_2x2).
#include "shim.h"

#define MC_NEG_FLT_MAX real(-3.402823466e+38f)  // -FLT_MAX, where Caffe starts (also for double)

// Output rows [*start, *end) whose windows cover padded input row hp = h + pad.
DEVICE void pool_covering_rows(const int hp, const int kernel, const int stride, const int pooled,
                               int* start, int* end) {
  *start = hp < kernel ? 0 : (hp - kernel) / stride + 1;
  const int last = hp / stride + 1;
  *end = last < pooled ? last : pooled;
}

// The max of window rows [hstart, hend) x columns [wstart, wend) of plane xp, first maximum in
// row-major order (strict >), written to *y, and its index h * width + w to *index (-1 for an empty
// window). The running maximum stays in registers (through the pointers it did not: 4x slower).
DEVICE void pool_max_window(const real* xp, const int width, const int hstart, const int hend,
                            const int wstart, const int wend, real* y, int* index) {
  real best = MC_NEG_FLT_MAX;
  int best_index = -1;
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) {
      const real v = xp[h * width + w];
      if (v > best) {
        best = v;
        best_index = h * width + w;
      }
    }
  }
  *y = best;
  *index = best_index;
}

// Output columns [lo, hi) of one output row whose windows lie inside the image: rows hs.. hs +
// kernel_h - 1 and kernel_w columns from pw * stride - pad_w each, with no clipping. KH, KW, STRIDE > 0:
// the window and the stride as compile-time constants (the common 2x2 / 2 and 3x3 / 2), a window loop
// of fixed trips that the compiler unrolls and vectorizes across pw, loads by shuffles; 0: the run-time
// values, one column at a time.
template <int KH, int KW, int STRIDE>
DEVICE void pool_max_full_windows(const real* xp, real* yp, int* mp, const int lo, const int hi,
                                  const int width, const int hs, const int kernel_h, const int kernel_w,
                                  const int stride_w, const int pad_w) {
  const int rows = KH > 0 ? KH : kernel_h, columns = KW > 0 ? KW : kernel_w;
  const int stride = STRIDE > 0 ? STRIDE : stride_w;
  INNER_LOOP(j, hi - lo) {
    const int ws = (lo + j) * stride - pad_w;
    pool_max_window(xp, width, hs, hs + rows, ws, ws + columns, yp + lo + j, mp + lo + j);
  }
}

// Output columns [lo, hi) of one output row, each window clipped to the image.
DEVICE void pool_max_clipped_columns(const real* xp, real* yp, int* mp, const int lo, const int hi,
                                     const int width, const int hstart, const int hend, const int kernel_w,
                                     const int stride_w, const int pad_w) {
  INNER_LOOP(j, hi - lo) {
    const int ws = (lo + j) * stride_w - pad_w;
    const int wstart = ws > 0 ? ws : 0;
    const int wend = ws + kernel_w < width ? ws + kernel_w : width;
    pool_max_window(xp, width, hstart, hend, wstart, wend, yp + lo + j, mp + lo + j);
  }
}

// Output columns [*lo, *hi) have their whole window inside the image's columns; the others (padding, or
// a last window past the edge under Caffe's ceil rounding) are clipped. The forward kernels write each
// output column in one of three loops: [0, lo) clipped, [lo, hi) whole windows, [hi, pooled_w) clipped.
DEVICE void pool_whole_columns(const int width, const int kernel_w, const int stride_w, const int pad_w,
                               const int pooled_w, int* lo, int* hi) {
  *lo = pad_w < pooled_w * stride_w ? (pad_w + stride_w - 1) / stride_w : pooled_w;
  const int last = width + pad_w - kernel_w;  // the last window start (+ pad) that fits
  int end = last < 0 ? 0 : last / stride_w + 1;
  end = end < pooled_w ? end : pooled_w;
  *hi = end > *lo ? end : *lo;
}

// Max pooling. mask gets the argmax's index h * width + w within its (n, c) plane, -1 for an empty
// window; the first maximum in row-major window order wins (strict >), and padding is never a
// candidate because the window is clipped to the image first.
KERNEL void pool_max_forward(const int planes, const int pooled_h, const int pooled_w,
                             const int height, const int width, const int kernel_h,
                             const int kernel_w, const int stride_h, const int stride_w,
                             const int pad_h, const int pad_w, const real* x, real* y, int* mask) {
  int full_lo, full_hi;
  pool_whole_columns(width, kernel_w, stride_w, pad_w, pooled_w, &full_lo, &full_hi);
  PLANE_LOOP(p, planes) {
    const int ph = p % pooled_h;
    const real* xp = x + (size_t)(p / pooled_h) * height * width;
    real* yp = y + (size_t)p * pooled_w;
    int* mp = mask + (size_t)p * pooled_w;
    const int hs = ph * stride_h - pad_h;
    const int hstart = hs > 0 ? hs : 0;
    const int hend = hs + kernel_h < height ? hs + kernel_h : height;
    pool_max_clipped_columns(xp, yp, mp, 0, full_lo, width, hstart, hend, kernel_w, stride_w, pad_w);
    if (hs < 0 || hs + kernel_h > height) {  // rows clipped: the windows of the row are
      pool_max_clipped_columns(xp, yp, mp, full_lo, full_hi, width, hstart, hend, kernel_w, stride_w, pad_w);
    } else if (kernel_h == 2 && kernel_w == 2 && stride_w == 2) {
      pool_max_full_windows<2, 2, 2>(xp, yp, mp, full_lo, full_hi, width, hs, 2, 2, 2, pad_w);
    } else if (kernel_h == 3 && kernel_w == 3 && stride_w == 2) {
      pool_max_full_windows<3, 3, 2>(xp, yp, mp, full_lo, full_hi, width, hs, 3, 3, 2, pad_w);
    } else {
      pool_max_full_windows<0, 0, 0>(xp, yp, mp, full_lo, full_hi, width, hs, kernel_h, kernel_w, stride_w,
                                     pad_w);
    }
    pool_max_clipped_columns(xp, yp, mp, full_hi, pooled_w, width, hstart, hend, kernel_w, stride_w, pad_w);
  }
}

// Max-pool backward: dx[argmax of cell] += dy[cell] over the output cells (ph, pw) of one class, ph =
// first_ph + i * step_h and pw = first_pw + j * step_w, with steps such that step * stride >= kernel on
// each axis (1 where windows never overlap): the windows of one class share no pixel, so each pixel takes
// at most one term per launch and nothing races on the GPU. The caller zeroes dx and launches once per
// class, (first_ph, first_pw) in order. One term per output cell, where a gather per input pixel tests
// every covering cell (2-3x2-3 masked gathers per pixel for a 3x3 / 2 window; the scatter was measured
// 4-5x faster on 2x2 / 2). A pixel that is the argmax of several overlapping windows gets their terms in
// class order (Caffe adds them in output order: the same sum, rounded in another order at times).
// Planes: num * channels * class_rows (this class's output rows); inner: class_cols.
KERNEL void pool_max_backward(const int planes, const int class_rows, const int class_cols,
                              const int first_ph, const int first_pw, const int step_h, const int step_w,
                              const int pooled_h, const int pooled_w, const int height, const int width,
                              const real* dy, const int* mask, real* dx) {
  PLANE_LOOP(p, planes) {
    const size_t image = p / class_rows;  // n * channels + c
    const int ph = first_ph + (p % class_rows) * step_h;
    real* dxp = dx + image * height * width;
    const size_t cells = (image * pooled_h + ph) * pooled_w + first_pw;
    const real* dyp = dy + cells;
    const int* mp = mask + cells;
    if (step_w == 1) {  // contiguous loads (the vectorizer does not split this case off itself)
      INNER_LOOP(j, class_cols) {
        const int index = mp[j];
        if (index >= 0) dxp[index] += dyp[j];
      }
    } else {
      INNER_LOOP(j, class_cols) {
        const int index = mp[(size_t)j * step_w];
        if (index >= 0) dxp[index] += dyp[(size_t)j * step_w];
      }
    }
  }
}

// Max-pool backward for windows two columns wide that tile the image (kernel_w == stride_w == 2,
// kernel_h == stride_h, no padding: 2x2 / 2), as a gather: dx[h, w] = dy of the cell (h / stride_h,
// w / 2) if (h, w) is its argmax, else 0 (also for pixels no window holds: past the last window under
// FLOOR rounding). One write of dx, no zeroing pass and no scatter: 2-2.4x faster on rows of 16 or more
// cells; the caller keeps the scatter for shorter rows, where this took as long or twice as long
// (LeNet's 12 and 4), and for other windows (3x3 / 3 took twice as long). Each cell writes its two
// pixels of the row, a loop the compiler vectorizes across cells, the pixel after the last whole window
// (an odd width) in a second loop. The term is 0 + dy, as the scatter adds it to a zeroed dx.
// Planes: num * channels * height (input rows); inner: the row's cells.
KERNEL void pool_max_backward_2x2(const int planes, const int pooled_h, const int pooled_w, const int height,
                                  const int width, const int stride_h, const real* dy, const int* mask,
                                  real* dx) {
  PLANE_LOOP(p, planes) {
    const int h = p % height;
    const size_t image = p / height;  // n * channels + c
    const int ph = h / stride_h;
    const int cells = ph < pooled_h ? pooled_w : 0;  // a row past the last window: zeros
    const size_t first_cell = (image * pooled_h + (ph < pooled_h ? ph : 0)) * pooled_w;
    const real* dyp = dy + first_cell;
    const int* mp = mask + first_cell;
    real* dxp = dx + (size_t)p * width;
    const int first_index = h * width;  // the mask's index of (h, 0)
    const int whole = cells < width / 2 ? cells : width / 2;  // windows inside the row
    INNER_LOOP(pw, whole) {
      const int argmax = mp[pw];
      const real term = real(0) + dyp[pw];
      dxp[2 * pw] = argmax == first_index + 2 * pw ? term : real(0);
      dxp[2 * pw + 1] = argmax == first_index + 2 * pw + 1 ? term : real(0);
    }
    // The rest of the row: in the last (clipped) window if there is one, else in none.
    const bool clipped = whole < cells;
    const int last_argmax = clipped ? mp[whole] : -1;
    const real last_term = clipped ? real(0) + dyp[whole] : real(0);
    INNER_LOOP(j, width - 2 * whole) {
      const int w = 2 * whole + j;
      dxp[w] = last_argmax == first_index + w ? last_term : real(0);
    }
  }
}

// Average pooling as Caffe: the divisor is the window clipped to the PADDED image (so padding cells
// count), computed before the window is clipped to the real image, whose cells alone are summed.
// The sum of window rows [hstart, hend) x columns [wstart, wend) of plane xp, in row-major order.
DEVICE real pool_window_sum(const real* xp, const int width, const int hstart, const int hend,
                            const int wstart, const int wend) {
  real sum = real(0);
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) sum += xp[h * width + w];
  }
  return sum;
}

// Output columns [lo, hi) of one output row whose windows lie inside the image (pool size kernel_h *
// kernel_w), as pool_max_full_windows: KH, KW, STRIDE > 0 compile-time constants, 0 the run-time values.
template <int KH, int KW, int STRIDE>
DEVICE void pool_ave_full_windows(const real* xp, real* yp, const int lo, const int hi, const int width,
                                  const int hs, const int kernel_h, const int kernel_w, const int stride_w,
                                  const int pad_w) {
  const int rows = KH > 0 ? KH : kernel_h, columns = KW > 0 ? KW : kernel_w;
  const int stride = STRIDE > 0 ? STRIDE : stride_w;
  const real pool_size = real(rows * columns);
  INNER_LOOP(j, hi - lo) {
    const int ws = (lo + j) * stride - pad_w;
    yp[lo + j] = pool_window_sum(xp, width, hs, hs + rows, ws, ws + columns) / pool_size;
  }
}

// Output columns [lo, hi) of one output row, each window clipped to the padded image for its pool
// size (Caffe's divisor counts the padding) and to the image for its sum.
DEVICE void pool_ave_clipped_columns(const real* xp, real* yp, const int lo, const int hi, const int width,
                                     const int hs, const int hpad_end, const int hstart, const int hend,
                                     const int kernel_w, const int stride_w, const int pad_w) {
  INNER_LOOP(j, hi - lo) {
    const int ws = (lo + j) * stride_w - pad_w;
    const int wpad_end = ws + kernel_w < width + pad_w ? ws + kernel_w : width + pad_w;
    const int pool_size = (hpad_end - hs) * (wpad_end - ws);
    const int wstart = ws > 0 ? ws : 0;
    const int wend = wpad_end < width ? wpad_end : width;
    yp[lo + j] = pool_window_sum(xp, width, hstart, hend, wstart, wend) / real(pool_size);
  }
}

KERNEL void pool_ave_forward(const int planes, const int pooled_h, const int pooled_w,
                             const int height, const int width, const int kernel_h,
                             const int kernel_w, const int stride_h, const int stride_w,
                             const int pad_h, const int pad_w, const real* x, real* y) {
  int full_lo, full_hi;
  pool_whole_columns(width, kernel_w, stride_w, pad_w, pooled_w, &full_lo, &full_hi);
  PLANE_LOOP(p, planes) {
    const int ph = p % pooled_h;
    const real* xp = x + (size_t)(p / pooled_h) * height * width;
    real* yp = y + (size_t)p * pooled_w;
    const int hs = ph * stride_h - pad_h;
    const int hpad_end = hs + kernel_h < height + pad_h ? hs + kernel_h : height + pad_h;
    const int hstart = hs > 0 ? hs : 0;
    const int hend = hpad_end < height ? hpad_end : height;
    pool_ave_clipped_columns(xp, yp, 0, full_lo, width, hs, hpad_end, hstart, hend, kernel_w, stride_w, pad_w);
    if (hs < 0 || hs + kernel_h > height) {  // rows clipped: the windows of the row are
      pool_ave_clipped_columns(xp, yp, full_lo, full_hi, width, hs, hpad_end, hstart, hend, kernel_w, stride_w,
                               pad_w);
    } else if (kernel_h == 2 && kernel_w == 2 && stride_w == 2) {
      pool_ave_full_windows<2, 2, 2>(xp, yp, full_lo, full_hi, width, hs, 2, 2, 2, pad_w);
    } else if (kernel_h == 3 && kernel_w == 3 && stride_w == 2) {
      pool_ave_full_windows<3, 3, 2>(xp, yp, full_lo, full_hi, width, hs, 3, 3, 2, pad_w);
    } else {
      pool_ave_full_windows<0, 0, 0>(xp, yp, full_lo, full_hi, width, hs, kernel_h, kernel_w, stride_w, pad_w);
    }
    pool_ave_clipped_columns(xp, yp, full_hi, pooled_w, width, hs, hpad_end, hstart, hend, kernel_w, stride_w,
                             pad_w);
  }
}

// dx[h, w] = sum over the output cells covering (h, w) of dy / that cell's pool_size; loops
// arranged as in pool_max_backward.
KERNEL void pool_ave_backward(const int planes, const int pooled_h, const int pooled_w,
                              const int height, const int width, const int kernel_h,
                              const int kernel_w, const int stride_h, const int stride_w,
                              const int pad_h, const int pad_w, const int cover,
                              const int* col_start, const int* col_end, const real* dy, real* dx) {
  PLANE_LOOP(p, planes) {
    const int h = p % height;
    const real* dyp = dy + (size_t)(p / height) * pooled_h * pooled_w;
    real* dxp = dx + (size_t)p * width;
    int phstart, phend;
    pool_covering_rows(h + pad_h, kernel_h, stride_h, pooled_h, &phstart, &phend);
    INNER_LOOP(w, width) { dxp[w] = real(0); }
    for (int ph = phstart; ph < phend; ++ph) {
      const int hs = ph * stride_h - pad_h;
      const int hsize = (hs + kernel_h < height + pad_h ? hs + kernel_h : height + pad_h) - hs;
      for (int j = 0; j < cover; ++j) {
        INNER_LOOP(w, width) {
          const int pw = col_start[w] + j;
          const bool covers = pw < col_end[w];
          const int ws = pw * stride_w - pad_w;
          const int wsize = (ws + kernel_w < width + pad_w ? ws + kernel_w : width + pad_w) - ws;
          const real g = dyp[ph * pooled_w + (covers ? pw : 0)] / real(hsize * (covers ? wsize : 1));
          dxp[w] += covers ? g : real(0);
        }
      }
    }
  }
}
