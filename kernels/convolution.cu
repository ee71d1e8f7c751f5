// im2col / col2im for 2-d convolution (Caffe's approach: convolution = im2col + one GEMM).
//
// The column buffer has one row per (c, ki, kj) -- Caffe's order, matching the weight layout
// (num_output, channels, kernel_h, kernel_w) -- and one column per output position (n, oh, ow) of a
// batch of images. Element (row, n, oh, ow) lives at
//     col[row * row_stride + n * image_stride + oh * out_w + ow]
// so the caller picks the layout: (rows, num, out_h*out_w) for one GEMM over the whole batch
// (row_stride = num * out_h * out_w, image_stride = out_h * out_w), or (num, rows, out_h*out_w) for
// one GEMM per image (row_stride = out_h * out_w, image_stride = rows * out_h * out_w).
//
// Both kernels loop over planes (n, c, [ki, kj,] oh) around a contiguous inner loop over ow. The
// part of the ow range whose input column lies inside the image is worked out once per plane, so
// the inner loops have neither branches nor integer division.
#include "shim.h"

// First ow in [0, out_w] whose input column w0 + ow * stride is >= lower.
DEVICE int first_output_at_or_after(const int lower, const int w0, const int stride, const int out_w) {
  const int distance = lower - w0;
  const int ow = distance <= 0 ? 0 : (distance + stride - 1) / stride;
  return ow < out_w ? ow : out_w;
}

// Planes: num * channels * kernel_h * kernel_w in (n, c, ki, kj) order, each looping over the output
// rows oh; inner: out_w. (Planes of whole kernel offsets rather than single rows keep the per-plane
// index arithmetic negligible for small images, e.g. LeNet's 8x8 outputs.)
KERNEL void im2col(const int planes, const real* x, real* col, const int channels, const int height,
                   const int width, const int kernel_h, const int kernel_w, const int pad_h,
                   const int pad_w, const int stride_h, const int stride_w, const int dilation_h,
                   const int dilation_w, const int out_h, const int out_w, const int row_stride,
                   const int image_stride) {
  PLANE_LOOP(p, planes) {
    const int kj = p % kernel_w;
    const int ki = (p / kernel_w) % kernel_h;
    const int c = (p / (kernel_w * kernel_h)) % channels;
    const int n = p / (kernel_w * kernel_h * channels);
    const int row = (c * kernel_h + ki) * kernel_w + kj;
    real* dst_plane = col + (size_t)row * row_stride + (size_t)n * image_stride;
    const real* src_plane = x + ((size_t)n * channels + c) * height * width;
    const int w0 = kj * dilation_w - pad_w;  // input column of ow = 0
    const int lo = first_output_at_or_after(0, w0, stride_w, out_w);
    int hi = first_output_at_or_after(width, w0, stride_w, out_w);
    hi = hi > lo ? hi : lo;
    for (int oh = 0; oh < out_h; ++oh) {
      real* dst = dst_plane + (size_t)oh * out_w;
      const int h = oh * stride_h - pad_h + ki * dilation_h;
      if (h < 0 || h >= height) {  // the whole output row reads padding
        INNER_LOOP(ow, out_w) { dst[ow] = real(0); }
        continue;
      }
      const real* src = src_plane + (size_t)h * width;
      // Three disjoint ranges: left padding, inside the image, right padding.
      INNER_LOOP(ow, lo) { dst[ow] = real(0); }
      INNER_LOOP(j, hi - lo) { dst[lo + j] = src[w0 + (lo + j) * stride_w]; }
      INNER_LOOP(j, out_w - hi) { dst[hi + j] = real(0); }
    }
  }
}

// col2im in gather form, for stride_w == 1 (col2im_add below does any stride, in kernel_w launches):
// x[n, c, h, w] = the sum of the column entries read from it, written once (no zeroing pass).
// Planes: num * channels * height image rows (n, c, h); inner: width.
//
// Race-free on the GPU by construction: iteration (plane, w) writes pixel (n, c, h, w) only and reads
// only col. Every inner loop runs over the same range [0, width), so one GPU thread owns the pixel for
// the whole launch and adds its taps in program order; a tap whose output column falls outside
// [0, out_w) is skipped by a per-element test (a masked load on the CPU). For stride_w == 1 the output
// column ow = w + pad_w - kj * dilation_w is contiguous in w, so the CPU's inner loop is a vector add of
// a contiguous run of col, without the per-element division a general stride would need. The output
// row oh of a kernel row ki is one per image row (a test per plane, not per element).
KERNEL void col2im_gather(const int planes, const real* col, real* x, const int channels, const int height,
                          const int width, const int kernel_h, const int kernel_w, const int pad_h,
                          const int pad_w, const int stride_h, const int dilation_h, const int dilation_w,
                          const int out_h, const int out_w, const int row_stride, const int image_stride) {
  PLANE_LOOP(p, planes) {
    const int h = p % height;
    const int c = (p / height) % channels;
    const int n = p / (height * channels);
    real* dst = x + (size_t)p * width;
    INNER_LOOP(w, width) { dst[w] = real(0); }
    for (int ki = 0; ki < kernel_h; ++ki) {
      const int oh_times_stride = h + pad_h - ki * dilation_h;  // oh * stride_h, if this tap was read
      if (oh_times_stride < 0 || oh_times_stride % stride_h != 0 || oh_times_stride / stride_h >= out_h)
        continue;
      const int oh = oh_times_stride / stride_h;
      for (int kj = 0; kj < kernel_w; ++kj) {
        const int row = (c * kernel_h + ki) * kernel_w + kj;
        const real* src = col + (size_t)row * row_stride + (size_t)n * image_stride + (size_t)oh * out_w;
        const int shift = pad_w - kj * dilation_w;  // ow = w + shift
        INNER_LOOP(w, width) {
          if (w + shift >= 0 && w + shift < out_w) dst[w] += src[w + shift];
        }
      }
    }
  }
}

// col2im for ONE kernel column offset kj: adds the column rows (c, ki, kj), for every ki, into x at
// the pixels they were read from. The caller zeroes x and launches this once per kj.
//
// Why this is race-free on the GPU without atomics: a pixel of x receives contributions from up to
// kernel_h * kernel_w positions (oh, ow), one per kernel offset. For a FIXED kj, the inner index ow
// maps one-to-one to the input column w = kj * dilation_w - pad_w + ow * stride_w, so iteration
// (p = (n, c), ow) is the only one that writes column w of image plane (n, c); it adds the kernel
// rows ki and output rows oh one after another itself. The kernel_w launches run in stream order.
// Caffe's col2im_gpu instead gathers per input pixel, which needs integer division per element and
// would not vectorize on the CPU; here the inner loop is a plain add over a contiguous run of col
// (into x with stride stride_w).
// Planes: num * channels in (n, c) order, each looping over ki and oh; inner: out_w.
KERNEL void col2im_add(const int planes, const real* col, real* x, const int channels, const int height,
                       const int width, const int kernel_h, const int kernel_w, const int pad_h,
                       const int pad_w, const int stride_h, const int stride_w, const int dilation_h,
                       const int dilation_w, const int out_h, const int out_w, const int row_stride,
                       const int image_stride, const int kj) {
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    const int n = p / channels;
    real* dst_plane = x + (size_t)p * height * width;
    const int w0 = kj * dilation_w - pad_w;
    const int lo = first_output_at_or_after(0, w0, stride_w, out_w);
    int hi = first_output_at_or_after(width, w0, stride_w, out_w);
    hi = hi > lo ? hi : lo;
    for (int ki = 0; ki < kernel_h; ++ki) {
      const int row = (c * kernel_h + ki) * kernel_w + kj;
      const real* src_plane = col + (size_t)row * row_stride + (size_t)n * image_stride;
      for (int oh = 0; oh < out_h; ++oh) {
        const int h = oh * stride_h - pad_h + ki * dilation_h;
        if (h < 0 || h >= height) continue;  // this output row only read padding
        const real* src = src_plane + (size_t)oh * out_w;
        real* dst = dst_plane + (size_t)h * width + w0;
        INNER_LOOP(j, hi - lo) { dst[(lo + j) * stride_w] += src[lo + j]; }
      }
    }
  }
}

// -- depthwise convolution (group == channels == num_output): one kernel per pass, no GEMM ----------
//
// Each output channel reads only its own input channel through a kernel_h x kernel_w filter, so a GEMM
// per group would be a 1-row GEMM per channel. These kernels do the taps directly. Planes are image
// channels (n, c) (times taps for the weight gradient); the inner index is the output column ow.
//
// Race-freedom on the GPU: in depthwise_forward and depthwise_weight_terms every inner loop runs over
// the same range [0, out_w) and touches element ow only, so one GPU thread owns each output element
// for the whole launch and applies its updates in program order; taps whose input column is padding
// are skipped by a per-element test (a masked load on the CPU).

// y[n, c] = bias[c] (if bias_term) + sum over taps (ki, kj) of weights[c, ki, kj] * x[n, c, h, w].
// Planes: num * channels in (n, c) order, each looping over the output rows; inner: out_w.
KERNEL void depthwise_forward(const int planes, const real* x, const real* weights, const real* bias,
                              const int bias_term, real* y, const int channels, const int height,
                              const int width, const int kernel_h, const int kernel_w, const int pad_h,
                              const int pad_w, const int stride_h, const int stride_w,
                              const int dilation_h, const int dilation_w, const int out_h, const int out_w) {
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    const real* src_plane = x + (size_t)p * height * width;
    real* dst_plane = y + (size_t)p * out_h * out_w;
    const real* filter = weights + (size_t)c * kernel_h * kernel_w;
    const real start = bias_term ? bias[c] : real(0);
    for (int oh = 0; oh < out_h; ++oh) {
      real* dst = dst_plane + (size_t)oh * out_w;
      INNER_LOOP(ow, out_w) { dst[ow] = start; }
    }
    // Taps outermost: the range of output columns a tap reads inside the image is worked out once
    // per tap and plane, not per row (the plane's output stays in the L1 cache meanwhile).
    for (int ki = 0; ki < kernel_h; ++ki) {
      for (int kj = 0; kj < kernel_w; ++kj) {
        const int w0 = kj * dilation_w - pad_w;  // input column of ow = 0
        const int lo = first_output_at_or_after(0, w0, stride_w, out_w);
        const int hi = first_output_at_or_after(width, w0, stride_w, out_w);
        const real tap = filter[ki * kernel_w + kj];
        for (int oh = 0; oh < out_h; ++oh) {
          const int h = oh * stride_h - pad_h + ki * dilation_h;
          if (h < 0 || h >= height) continue;  // this tap reads padding for the whole output row
          real* dst = dst_plane + (size_t)oh * out_w;
          const real* from = src_plane + (size_t)h * width + w0;  // from[ow * stride_w]: column ow's input
          INNER_LOOP(ow, out_w) {
            if (ow >= lo && ow < hi) dst[ow] += tap * from[ow * stride_w];
          }
        }
      }
    }
  }
}

// dx for ONE kernel column offset kj: adds weights[c, ki, kj] * dy into x's pixels, for every ki. The
// caller zeroes dx and launches this once per kj; race-free on the GPU for the reason col2im_add is
// (for a fixed kj, ow maps one-to-one to the input column it adds into).
// Planes: num * channels in (n, c) order, each looping over ki and the output rows; inner: out_w.
KERNEL void depthwise_backward_data_add(const int planes, const real* dy, const real* weights, real* dx,
                                        const int channels, const int height, const int width,
                                        const int kernel_h, const int kernel_w, const int pad_h,
                                        const int pad_w, const int stride_h, const int stride_w,
                                        const int dilation_h, const int dilation_w, const int out_h,
                                        const int out_w, const int kj) {
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    real* dst_plane = dx + (size_t)p * height * width;
    const real* src_plane = dy + (size_t)p * out_h * out_w;
    const int w0 = kj * dilation_w - pad_w;
    const int lo = first_output_at_or_after(0, w0, stride_w, out_w);
    int hi = first_output_at_or_after(width, w0, stride_w, out_w);
    hi = hi > lo ? hi : lo;
    for (int ki = 0; ki < kernel_h; ++ki) {
      const real tap = weights[((size_t)c * kernel_h + ki) * kernel_w + kj];
      for (int oh = 0; oh < out_h; ++oh) {
        const int h = oh * stride_h - pad_h + ki * dilation_h;
        if (h < 0 || h >= height) continue;
        const real* src = src_plane + (size_t)oh * out_w;
        real* dst = dst_plane + (size_t)h * width + w0;
        INNER_LOOP(j, hi - lo) { dst[(lo + j) * stride_w] += tap * src[lo + j]; }
      }
    }
  }
}

// Weight gradient, step 1 of 2: terms[n, c, ki, kj, ow] = sum over the output rows oh (in order) of
// dy[n, c, oh, ow] * x[n, c, h, w] -- per-plane partial sums, out_w of them per plane.
// Planes: num * channels * kernel_h * kernel_w in (n, c, ki, kj) order; inner: out_w.
KERNEL void depthwise_weight_terms(const int planes, const real* dy, const real* x, real* terms,
                                   const int channels, const int height, const int width,
                                   const int kernel_h, const int kernel_w, const int pad_h, const int pad_w,
                                   const int stride_h, const int stride_w, const int dilation_h,
                                   const int dilation_w, const int out_h, const int out_w) {
  PLANE_LOOP(p, planes) {
    const int kj = p % kernel_w;
    const int ki = (p / kernel_w) % kernel_h;
    const int image_channel = p / (kernel_w * kernel_h);  // n * channels + c
    const real* dy_plane = dy + (size_t)image_channel * out_h * out_w;
    const real* x_plane = x + (size_t)image_channel * height * width;
    real* dst = terms + (size_t)p * out_w;
    const int w0 = kj * dilation_w - pad_w;
    const int lo = first_output_at_or_after(0, w0, stride_w, out_w);
    const int hi = first_output_at_or_after(width, w0, stride_w, out_w);
    INNER_LOOP(ow, out_w) { dst[ow] = real(0); }
    for (int oh = 0; oh < out_h; ++oh) {
      const int h = oh * stride_h - pad_h + ki * dilation_h;
      if (h < 0 || h >= height) continue;
      const real* src = x_plane + (size_t)h * width;
      const real* grad = dy_plane + (size_t)oh * out_w;
      const real* from = src + w0;
      INNER_LOOP(ow, out_w) {
        if (ow >= lo && ow < hi) dst[ow] += grad[ow] * from[ow * stride_w];
      }
    }
  }
}

// Weight gradient, step 2 of 2: weight_diff[q] += the terms of weight q = (c, ki, kj) of every image n
// and column ow, summed in a fixed order (n outer, ow inner) by the one thread that owns q: the same
// bits on every run and on both devices, without atomics. The inner index is q (vectorized across
// weights on the CPU, one GPU thread per weight); one plane.
KERNEL void depthwise_weight_sum(const int planes, const real* terms, real* weight_diff, const int weights,
                                 const int num, const int out_w) {
  PLANE_LOOP(unused, planes) {
    INNER_LOOP(q, weights) {
      real sum = real(0);
      for (int n = 0; n < num; ++n) {
        const real* row = terms + ((size_t)n * weights + q) * out_w;
        for (int ow = 0; ow < out_w; ++ow) sum += row[ow];
      }
      weight_diff[q] += sum;
    }
  }
}
