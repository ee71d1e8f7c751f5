// Max and average pooling, following Caffe's PoolingLayer exactly (window clipping, divisor, ties).
//
// Forward: one plane per (n, c, output row); the inner index is the output column, and the window is
// looped inside. Average backward is a gather (as Caffe's GPU AvePoolBackward): one plane per (n, c,
// input row), the inner index the input column, summing over the output cells whose windows cover that
// pixel, so every iteration writes only its own dx and nothing races on the GPU. The range of output
// columns covering input column w needs a division by the stride; it is precomputed per column on the
// host (col_start[w], col_end[w]) so the inner loop has none. Max backward scatters through the argmax
// (pool_max_backward).
#include "shim.h"

#define MC_NEG_FLT_MAX real(-3.402823466e+38f)  // -FLT_MAX, where Caffe starts (also for double)

// Output rows [*start, *end) whose windows cover padded input row hp = h + pad.
DEVICE void pool_covering_rows(const int hp, const int kernel, const int stride, const int pooled,
                               int* start, int* end) {
  *start = hp < kernel ? 0 : (hp - kernel) / stride + 1;
  const int last = hp / stride + 1;
  *end = last < pooled ? last : pooled;
}

// Max pooling. mask gets the argmax's index h * width + w within its (n, c) plane, -1 for an empty
// window; the first maximum in row-major window order wins (strict >), and padding is never a
// candidate because the window is clipped to the image first.
KERNEL void pool_max_forward(const int planes, const int pooled_h, const int pooled_w,
                             const int height, const int width, const int kernel_h,
                             const int kernel_w, const int stride_h, const int stride_w,
                             const int pad_h, const int pad_w, const real* x, real* y, int* mask) {
  PLANE_LOOP(p, planes) {
    const int ph = p % pooled_h;
    const real* xp = x + (size_t)(p / pooled_h) * height * width;
    real* yp = y + (size_t)p * pooled_w;
    int* mp = mask + (size_t)p * pooled_w;
    const int hs = ph * stride_h - pad_h;
    const int hstart = hs > 0 ? hs : 0;
    const int hend = hs + kernel_h < height ? hs + kernel_h : height;
    INNER_LOOP(pw, pooled_w) {
      const int ws = pw * stride_w - pad_w;
      const int wstart = ws > 0 ? ws : 0;
      const int wend = ws + kernel_w < width ? ws + kernel_w : width;
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
      yp[pw] = best;
      mp[pw] = best_index;
    }
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

// Average pooling as Caffe: the divisor is the window clipped to the PADDED image (so padding cells
// count), computed before the window is clipped to the real image, whose cells alone are summed.
KERNEL void pool_ave_forward(const int planes, const int pooled_h, const int pooled_w,
                             const int height, const int width, const int kernel_h,
                             const int kernel_w, const int stride_h, const int stride_w,
                             const int pad_h, const int pad_w, const real* x, real* y) {
  PLANE_LOOP(p, planes) {
    const int ph = p % pooled_h;
    const real* xp = x + (size_t)(p / pooled_h) * height * width;
    real* yp = y + (size_t)p * pooled_w;
    const int hs = ph * stride_h - pad_h;
    const int hpad_end = hs + kernel_h < height + pad_h ? hs + kernel_h : height + pad_h;
    const int hstart = hs > 0 ? hs : 0;
    const int hend = hpad_end < height ? hpad_end : height;
    INNER_LOOP(pw, pooled_w) {
      const int ws = pw * stride_w - pad_w;
      const int wpad_end = ws + kernel_w < width + pad_w ? ws + kernel_w : width + pad_w;
      const int pool_size = (hpad_end - hs) * (wpad_end - ws);
      const int wstart = ws > 0 ? ws : 0;
      const int wend = wpad_end < width ? wpad_end : width;
      real sum = real(0);
      for (int h = hstart; h < hend; ++h) {
        for (int w = wstart; w < wend; ++w) sum += xp[h * width + w];
      }
      yp[pw] = sum / real(pool_size);
    }
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
