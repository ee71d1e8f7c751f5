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
#include "reduce.h"  // (includes shim.h) the depthwise weight gradient's sums

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
// per group would be a 1-row GEMM per channel. These kernels do the taps directly, on the input split
// into its stride phases: phase (a, b) of a plane is the zero-padded input's rows a, a + stride_h, ...
// and columns b, b + stride_w, ..., a (phase_h, phase_w) plane (im2col with a stride_h x stride_w
// "kernel": layers/convolution.py). Tap (ki, kj) of output (oh, ow) then reads phase
// (ki * dilation_h % stride_h, kj * dilation_w % stride_w) at (oh + ki * dilation_h / stride_h,
// ow + kj * dilation_w / stride_w): with the output laid out at the phases' row pitch, o = oh * phase_w
// + ow, every tap reads the phase at o + a fixed offset. So a block of output rows is one contiguous loop
// per tap, for every stride, and no tap needs a bounds test. (Reading the padded input at stride * o
// instead computed the scratch columns of a stride-2 output as well and gathered every other value:
// MobileNet's stride-2 layers ran 2-3x slower.) With stride 1 there is one phase, the padded input.
// MobileNet's 7x7 planes are 9 loops of 61 elements where a loop per output row made 63 loops of 7. The
// columns ow >= out_w of that pitched output are scratch, dropped by the caller's copy into the top.
// Race-freedom on the GPU: every inner loop of a plane runs over the same range and touches its own
// element o only, so one GPU thread owns each element for the whole launch.

// Where tap (ki, kj) reads in a plane's phases: the phase's offset plus the tap's within it.
DEVICE size_t depthwise_tap_offset(const int ki, const int kj, const int phase_h, const int phase_w,
                                   const int stride_h, const int stride_w, const int dilation_h,
                                   const int dilation_w) {
  const int di = ki * dilation_h, dj = kj * dilation_w;
  const int phase = (di % stride_h) * stride_w + dj % stride_w;
  return ((size_t)phase * phase_h + di / stride_h) * phase_w + dj / stride_w;
}

// dst[image, r, q] = src[image, (r - offset_h) / step_h, (q - offset_w) / step_w] where both divide
// evenly and land inside src, else 0: the output gradient spread over the input's grid for the backward
// pass (step = stride), or laid out at the forward's row pitch for the weight gradient (step 1).
// Planes: images; each loops over its dst_h rows; inner: dst_w.
KERNEL void depthwise_spread(const int planes, const real* src, const int src_h, const int src_w, real* dst,
                             const int dst_h, const int dst_w, const int offset_h, const int offset_w,
                             const int step_h, const int step_w) {
  PLANE_LOOP(image, planes) {
    for (int r = 0; r < dst_h; ++r) {
      real* row = dst + ((size_t)image * dst_h + r) * dst_w;
      const int u = r - offset_h;
      const int h = u >= 0 && u % step_h == 0 ? u / step_h : src_h;  // src_h: no source row
      if (h >= src_h) {
        INNER_LOOP(q, dst_w) { row[q] = real(0); }
      } else if (step_w == 1) {
        const real* from = src + ((size_t)image * src_h + h) * src_w - offset_w;  // from[q]: column q - offset_w
        INNER_LOOP(q, dst_w) { row[q] = q >= offset_w && q - offset_w < src_w ? from[q] : real(0); }
      } else {
        // v / step_w rounded to the nearest integer in floating point, which vectorizes (integer division
        // does not): exact where step_w divides v (v < 2^22), and elsewhere w * step_w != v.
        const real* from = src + ((size_t)image * src_h + h) * src_w;
        const float inverse_step = 1.0f / float(step_w);
        INNER_LOOP(q, dst_w) {
          const int v = q - offset_w;
          const int w = int(float(v) * inverse_step + 0.5f);
          row[q] = v >= 0 && w * step_w == v && w < src_w ? from[w] : real(0);
        }
      }
    }
  }
}

// y[n, c, oh, ow] at o = oh * phase_w + ow = bias[c] (if bias_term) + the sum over taps (ki, kj), in
// order, of weights[c, ki, kj] * (the padded input at (oh * stride_h + ki * dilation_h, ow * stride_w +
// kj * dilation_w)), read from the plane's phases (planes, stride_h * stride_w, phase_h, phase_w).
// y is (planes, out_h, phase_w); elements o < (out_h - 1) * phase_w + out_w are written.
// Planes: num * channels in (n, c) order.
KERNEL void depthwise_forward(const int planes, const real* phases, const real* weights, const real* bias,
                              const int bias_term, real* y, const int channels, const int phase_h,
                              const int phase_w, const int kernel_h, const int kernel_w,
                              const int stride_h, const int stride_w, const int dilation_h,
                              const int dilation_w, const int out_h, const int out_w) {
  // Output rows per contiguous run of o: as many as keep the run within ~16 KB (in the L1 cache while
  // the taps pass over it).
  const int block_rows = 4096 / phase_w > 0 ? 4096 / phase_w : 1;
  const size_t plane_size = (size_t)stride_h * stride_w * phase_h * phase_w;
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    const real* filter = weights + (size_t)c * kernel_h * kernel_w;
    const real start = bias_term ? bias[c] : real(0);
    for (int first_row = 0; first_row < out_h; first_row += block_rows) {
      const int rows = out_h - first_row < block_rows ? out_h - first_row : block_rows;
      const int length = (rows - 1) * phase_w + out_w;
      const real* src = phases + p * plane_size + (size_t)first_row * phase_w;
      real* dst = y + ((size_t)p * out_h + first_row) * phase_w;
      INNER_LOOP(o, length) { dst[o] = start; }
      for (int ki = 0; ki < kernel_h; ++ki) {
        for (int kj = 0; kj < kernel_w; ++kj) {
          const real tap = filter[ki * kernel_w + kj];
          const real* from = src + depthwise_tap_offset(ki, kj, phase_h, phase_w, stride_h, stride_w,
                                                        dilation_h, dilation_w);
          INNER_LOOP(o, length) { dst[o] += tap * from[o]; }
        }
      }
    }
  }
}

// Weight gradient, stage 1 (reduce.h): plane p = ((n * channels + c) * kernel_h + ki) * kernel_w + kj
// sums dy_pitched[n, c, o] * (the phase value tap (ki, kj) of output o reads) over o, the output gradient
// at the forward's row pitch phase_w (zero in the columns ow >= out_w, so they add nothing).
// Stage 2 (reduce.cu's channel_total) adds the images' partials per weight in a fixed order.
KERNEL void depthwise_weight_partials(const int planes, const int inner, const int lanes, const real* dy_pitched,
                                      const real* phases, const int phase_h, const int phase_w,
                                      const int kernel_h, const int kernel_w, const int stride_h,
                                      const int stride_w, const int dilation_h, const int dilation_w,
                                      const int out_h, real* partial) {
  const size_t plane_size = (size_t)stride_h * stride_w * phase_h * phase_w;
  PLANE_LOOP(p, planes) {
    const int kj = p % kernel_w;
    const int ki = (p / kernel_w) % kernel_h;
    const size_t image_channel = p / (kernel_w * kernel_h);  // n * channels + c
    const real* grad = dy_pitched + image_channel * out_h * phase_w;
    const real* from = phases + image_channel * plane_size +
                       depthwise_tap_offset(ki, kj, phase_h, phase_w, stride_h, stride_w, dilation_h, dilation_w);
    const size_t base = (size_t)p * inner;  // mc_plane_partials passes p * inner + o
    mc_plane_partials(p, inner, lanes, [=](size_t j) { return grad[j - base] * from[j - base]; }, partial);
  }
}

// -- depthwise, stride 1, output the input's size (2 pad == dilation (kernel - 1): MobileNet's 3x3 pad 1) --
//
// Then output o = oh * width + ow reads tap (ki, kj) at o + (ki dilation_h - pad_h) width + kj dilation_w
// - pad_w of the unpadded plane itself, where that row and column lie inside the plane (the padding adds
// tap * 0). So these kernels read the blobs as they are: no padded copy in (im2col into phases), no copy
// out of a pitched output, no spread of the output gradient, the three kernels of the general path
// above whose per-row work cost 5-10x a copy of 14x14 and 7x7 planes. The input gradient is the same
// convolution of dy with the taps flipped (its padding, dilation (kernel - 1) - pad, is pad again).
// column[o] = o % width (a buffer the caller fills once per layer): a load instead of a division.
// Every inner loop of a plane runs over the same range and touches element j only: race-free on the GPU.

// Whether a tap dj columns off reads inside the row from output column `column`.
// (One unsigned comparison for both bounds: a negative column wraps to a large unsigned one.)
DEVICE bool depthwise_column_inside(const int column, const int dj, const int width) {
  return dj == 0 || unsigned(column + dj) < unsigned(width);
}

// Whether tap (di, dj)'s read for output o (column `column`) lies in the height x width plane. The row
// test is skipped where test_rows is false (a block whose rows all read inside): loop-invariant tests
// the compiler takes out of the loop (-funswitch-loops), leaving plain loops for most taps.
DEVICE bool depthwise_same_inside(const int o, const int column, const int di, const int dj, const int height,
                                  const int width, const bool test_rows) {
  const int row_read = o + di * width;  // o's column with the tap's row: inside when 0 <= row < height
  const bool row_inside = !test_rows || unsigned(row_read) < unsigned(height * width);
  return row_inside && depthwise_column_inside(column, dj, width);
}

// y[n, c] = bias[c] (if bias_term) + the sum over taps (ki, kj), in order, of weights[c, ki, kj] * x[n, c]
// at the tap's offset (zero outside the plane). Planes: num * channels; each runs blocks of rows.
KERNEL void depthwise_same_forward(const int planes, const real* x, const real* weights, const real* bias,
                                   const int bias_term, real* y, const int channels, const int height,
                                   const int width, const int kernel_h, const int kernel_w, const int pad_h,
                                   const int pad_w, const int dilation_h, const int dilation_w,
                                   const int* column) {
  // Output rows per block: as many as keep the block within ~16 KB (in the L1 cache while the taps pass
  // over it).
  const int block_rows = 4096 / width > 0 ? 4096 / width : 1;
  const size_t size = (size_t)height * width;
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    const real* filter = weights + (size_t)c * kernel_h * kernel_w;
    const real start = bias_term ? bias[c] : real(0);
    const real* src = x + p * size;
    // Blocks: the pad_h rows at the top, those at the bottom, the rest block_rows at a time: only the
    // first two read outside the rows, so the other blocks' taps test their columns only. Planes of
    // fewer than 512 values are one block (MobileNet's 7x7 planes took twice as long in three blocks,
    // its 14x14 ones no less in one).
    const int top = pad_h < height && size >= 512 ? pad_h : 0;
    const int bottom = top == 0 ? height : height - pad_h > top ? height - pad_h : top;  // first bottom row
    for (int first_row = 0, rows = 0; first_row < height; first_row += rows) {
      rows = first_row < top      ? top - first_row
             : first_row < bottom ? (bottom - first_row < block_rows ? bottom - first_row : block_rows)
                                  : height - first_row;
      const int begin = first_row * width, length = rows * width;
      real* dst = y + p * size + begin;
      INNER_LOOP(j, length) { dst[j] = start; }
      for (int ki = 0; ki < kernel_h; ++ki) {
        for (int kj = 0; kj < kernel_w; ++kj) {
          const real tap = filter[ki * kernel_w + kj];
          const int di = ki * dilation_h - pad_h, dj = kj * dilation_w - pad_w;
          // from[j]: the tap's read for dst[j] (a pointer, not an index, so that the read vectorizes as a
          // masked load, not a gather; it points outside the plane only where `inside` is false)
          const real* from = src + begin + di * width + dj;
          const int* columns = column + begin;
          const bool test_rows = begin + di * width < 0 || begin + length + di * width > height * width;
          INNER_LOOP(j, length) {
            const bool inside =
                depthwise_same_inside(begin + j, columns[j], di, dj, height, width, test_rows);
            dst[j] += tap * (inside ? from[j] : real(0));
          }
        }
      }
    }
  }
}

// Weight gradient, stage 1 (reduce.h): plane p = ((n * channels + c) * kernel_h + ki) * kernel_w + kj sums
// dy[n, c, o] * (tap (ki, kj)'s read of x[n, c] for output o) over the outputs o whose tap row lies inside
// the plane (a range of whole rows, so only the column is tested), in order. The range leaves out the
// first row's columns left of the tap's reach and the last row's right of it (terms that are 0), so every
// read lies in the plane and is made unconditionally: a masked load there kept the compiler's
// accumulators in memory, at half the speed.
// Stage 2 (reduce.cu's channel_total) adds the images' partials per weight in a fixed order.
KERNEL void depthwise_same_weight_partials(const int planes, const int inner, const int lanes, const real* dy,
                                           const real* x, const int height, const int width,
                                           const int kernel_h, const int kernel_w, const int pad_h,
                                           const int pad_w, const int dilation_h, const int dilation_w,
                                           const int* column, real* partial) {
  PLANE_LOOP(p, planes) {
    const int kj = p % kernel_w;
    const int ki = (p / kernel_w) % kernel_h;
    const size_t image_channel = p / (kernel_w * kernel_h);  // n * channels + c
    const int di = ki * dilation_h - pad_h, dj = kj * dilation_w - pad_w;
    const int first_row = di < 0 ? -di : 0, end_row = di > 0 ? height - di : height;
    const int first = first_row * width + (dj < 0 ? -dj : 0);
    const int end = end_row * width - (dj > 0 ? dj : 0);
    const int count = end > first ? end - first : 0;
    const real* grad = dy + image_channel * inner + first;
    const real* from = x + image_channel * inner + first + di * width + dj;  // as in depthwise_same_forward
    const int* columns = column + first;
    const size_t base = (size_t)p * count;  // mc_plane_partials passes p * count + o
    mc_plane_partials(p, count, lanes, [=](size_t j) {
      const real value = from[j - base];
      return grad[j - base] * (depthwise_column_inside(columns[j - base], dj, width) ? value : real(0));
    }, partial);
  }
}

// -- Winograd F(4x4, 3x3): 3x3 stride-1 convolutions with a quarter of the multiplications ------------
//
// Lavin & Gray's minimal filtering (arXiv:1509.09308), with the interpolation points 0, +-1, +-2: a 4x4
// block of outputs of a 3x3 filter g over a 6x6 input tile d is A^T [(G g G^T) .* (B^T d B)] A. Summed
// over input channels, the 36 element-wise products become 36 GEMMs, M[xi] = U[xi] @ V[xi], with
//   U[xi] (out_channels x in_channels)  = (G g G^T)[xi]   per filter   (winograd_weights)
//   V[xi] (in_channels x tiles)         = (B^T d B)[xi]   per tile     (winograd_input)
// and y = A^T M A per tile (winograd_output): 36 multiplications per 4x4 block and channel pair in the
// GEMMs where a direct convolution does 9 * 16. Tile t = (n * tiles_h + th) * tiles_w + tw covers outputs
// (4 th .. 4 th + 3, 4 tw .. 4 tw + 3) and reads the input rows and columns from 4 th - pad and 4 tw - pad,
// six of each (zero outside the image, as padding). Point xi = 6 * row + column of the 6x6 transform.
// The gradients are the same transforms transposed: the weight gradient is G^T (sum over tiles of
// (A dy A^T) .* (B^T d B)) G (winograd_output_diff, one GEMM per xi, winograd_filter_diff); the input
// gradient is the forward of dy padded by 2 - pad with the filters flipped and in and out swapped
// (winograd_weights with flip = 1).
// U, V and M (and the gradients' W and dU) are 36 matrices point_step elements apart, a little more than
// a matrix: the kernels read or write all 36 at once, and at a power-of-two distance those 36 streams
// fell into the same few cache sets (the input transform of 8x32x32x32 took 1.3 ms, 5x the copy).
// Every kernel loops over planes of one tile row (or one filter row) with its tiles (filters) as the
// inner loop; one inner iteration owns its tile's (filter's) outputs, so the launches are race-free.
// The transforms are products with small constants (B and A: integers; G: 1/4, 1/6, 1/12, 1/24), which
// add a few ulp of rounding where the direct sum of 9 products adds one per product.
//
// index clamped to [0, size): an address inside the plane's row for any tile.
DEVICE int clamp_index(const int index, const int size) {
  return index < 0 ? 0 : (index < size ? index : size - 1);
}

// One axis of each transform, as statements declaring its outputs o##0, o##1, ... (scalars, so that the
// inner loops vectorize: see EACHn in shim.h). The inputs are scalar names (each is read several times).
// B^T d: the input transform.
#define WINOGRAD_BT(o, d0, d1, d2, d3, d4, d5)                     \
  const real o##0 = real(4) * d0 - real(5) * d2 + d4;              \
  const real o##1 = d3 + d4 - real(4) * (d1 + d2);                 \
  const real o##2 = real(4) * (d1 - d2) + d4 - d3;                 \
  const real o##3 = real(2) * (d3 - d1) + d4 - d2;                 \
  const real o##4 = real(2) * (d1 - d3) + d4 - d2;                 \
  const real o##5 = real(4) * d1 - real(5) * d3 + d5;
// A^T m: the output transform.
#define WINOGRAD_AT(o, m0, m1, m2, m3, m4, m5)                                  \
  const real o##0 = m0 + (m1 + m2) + (m3 + m4);                                 \
  const real o##1 = (m1 - m2) + real(2) * (m3 - m4);                            \
  const real o##2 = (m1 + m2) + real(4) * (m3 + m4);                            \
  const real o##3 = (m1 - m2) + real(8) * (m3 - m4) + m5;
// G g: the filter transform.
#define WINOGRAD_G(o, g0, g1, g2)                                               \
  const real o##0 = g0 / real(4);                                               \
  const real o##1 = -(g0 + g2 + g1) / real(6);                                  \
  const real o##2 = (g1 - g0 - g2) / real(6);                                   \
  const real o##3 = g0 / real(24) + g1 / real(12) + g2 / real(6);               \
  const real o##4 = g0 / real(24) - g1 / real(12) + g2 / real(6);               \
  const real o##5 = g2;
// A y: the adjoint of A^T, for the output gradient.
#define WINOGRAD_A(o, y0, y1, y2, y3)                                           \
  const real o##0 = y0;                                                         \
  const real o##1 = y0 + y1 + y2 + y3;                                          \
  const real o##2 = y0 - y1 + y2 - y3;                                          \
  const real o##3 = y0 + real(2) * y1 + real(4) * y2 + real(8) * y3;            \
  const real o##4 = y0 - real(2) * y1 + real(4) * y2 - real(8) * y3;            \
  const real o##5 = y3;
// G^T u: the adjoint of G, for the weight gradient.
#define WINOGRAD_GT(o, u0, u1, u2, u3, u4, u5)                                  \
  const real o##0 = u0 / real(4) - (u1 + u2) / real(6) + (u3 + u4) / real(24);  \
  const real o##1 = (u2 - u1) / real(6) + (u3 - u4) / real(12);                 \
  const real o##2 = (u3 + u4 - u1 - u2) / real(6) + u5;

// U[xi, o, i] = (G g G^T)[xi] for the filter g = weights[o, i] (3x3), or with flip = 1 the filter
// weights[i, o] turned by 180 degrees (weights then being (in_channels, out_channels, 3, 3)): the input
// gradient's filters. Planes: out_channels; inner: in_channels.
// (Indices inside the inner loops are ints off per-plane pointers, as in every kernel here: GCC proves
// an int index affine in the loop variable, which it cannot for a size_t sum that includes it.)
KERNEL void winograd_weights(const int planes, const real* weights, real* u, const int point_step,
                             const int in_channels, const int flip) {
  PLANE_LOOP(o, planes) {
    // tap (a, b) of filter i at first[i * filter_step + tap_step * (3 a + b)]
    const real* first = weights + (flip ? (size_t)o * 9 + 8 : (size_t)o * in_channels * 9);
    const int filter_step = flip ? planes * 9 : 9;
    const int tap_step = flip ? -1 : 1;
    real* dst = u + (size_t)o * in_channels;
    INNER_LOOP(i, in_channels) {
      const real* g = first + i * filter_step;
#define TAPS(a) const real g##a##0 = g[tap_step * (3 * a)], g##a##1 = g[tap_step * (3 * a + 1)], \
                           g##a##2 = g[tap_step * (3 * a + 2)];
      EACH3(TAPS)
#define COLUMN(b) WINOGRAD_G(c##b##_, g0##b, g1##b, g2##b)  // column b of G g: c<b>_<row>
      EACH3(COLUMN)
// Row r of the 6x6 result (its values v0 .. v5) into U, V or W[6 r .. 6 r + 5] at `index` of the
// plane's pointer dst (EACHn cannot nest, so the six stores are written out).
#define STORE_ROW(r, index) (dst + (size_t)(6 * r) * point_step)[index] = v0; (dst + (size_t)(6 * r + 1) * point_step)[index] = v1; \
  (dst + (size_t)(6 * r + 2) * point_step)[index] = v2; (dst + (size_t)(6 * r + 3) * point_step)[index] = v3;                  \
  (dst + (size_t)(6 * r + 4) * point_step)[index] = v4; (dst + (size_t)(6 * r + 5) * point_step)[index] = v5;
#define ROW(r) { WINOGRAD_G(v, c0_##r, c1_##r, c2_##r) STORE_ROW(r, i) }
      EACH6(ROW)
#undef TAPS
#undef COLUMN
#undef ROW
    }
  }
}

// V[xi, c, t] = (B^T d B)[xi] for the input tile d of tile t: padded images (num, channels, padded_h,
// padded_w), the zero padding already in place (im2col with a 1x1 kernel: layers/convolution.py), at least
// 4 tiles_h + 2 by 4 tiles_w + 2; V (36, channels, tiles), tiles = num * tiles_h * tiles_w. Planes:
// (n, c, th); inner: tw. (Without the padded copy, the zeros at the border were loads under a condition:
// masked loads at a stride, which GCC does not vectorize; the transform took 5x as long as the copy.)
KERNEL void winograd_input(const int planes, const real* padded, real* v, const int point_step,
                           const int channels, const int padded_h, const int padded_w, const int tiles_h,
                           const int tiles_w) {
  const int tiles = planes / channels * tiles_w;
  PLANE_LOOP(p, planes) {
    const int th = p % tiles_h;
    const int c = (p / tiles_h) % channels;
    const int n = p / (tiles_h * channels);
    const real* image = padded + (((size_t)n * channels + c) * padded_h + th * 4) * padded_w;
    real* dst = v + (size_t)c * tiles + ((size_t)n * tiles_h + th) * tiles_w;
#define INPUT_ROW(r) const real* const row##r = image + r * padded_w;
    EACH6(INPUT_ROW)
    INNER_LOOP_8(tw, tiles_w) {
#define LOAD(r, j) const real d##r##j = row##r[tw * 4 + j];
#define COLUMN(j) LOAD(0, j) LOAD(1, j) LOAD(2, j) LOAD(3, j) LOAD(4, j) LOAD(5, j) \
                  WINOGRAD_BT(c##j##_, d0##j, d1##j, d2##j, d3##j, d4##j, d5##j)  // column j of B^T d
      EACH6(COLUMN)
#define ROW(r) { WINOGRAD_BT(v, c0_##r, c1_##r, c2_##r, c3_##r, c4_##r, c5_##r) STORE_ROW(r, tw) }
      EACH6(ROW)
#undef INPUT_ROW
#undef LOAD
#undef COLUMN
#undef ROW
    }
  }
}

// W[xi, k, t] = (A dy A^T)[xi] for the 4x4 block of dy (num, channels, out_h, out_w) that tile t covers
// (zero outside out_h x out_w): the output gradient in the GEMMs' space. Planes: (n, k, th); inner: tw.
KERNEL void winograd_output_diff(const int planes, const real* dy, real* w, const int point_step,
                                 const int channels, const int out_h, const int out_w, const int tiles_h,
                                 const int tiles_w) {
  const int tiles = planes / channels * tiles_w;
  PLANE_LOOP(p, planes) {
    const int th = p % tiles_h;
    const int k = (p / tiles_h) % channels;
    const int n = p / (tiles_h * channels);
    const real* plane = dy + ((size_t)n * channels + k) * out_h * out_w;
    real* dst = w + (size_t)k * tiles + ((size_t)n * tiles_h + th) * tiles_w;
// Row r of the tile row's 4x4 blocks, in the plane; one past out_h (in the last tile row) reads as zeros
// or is not written, and points at row 0, in bounds.
#define BLOCK_ROW(r) const bool inside##r = th * 4 + r < out_h; \
                     auto* const row##r = plane + (size_t)(inside##r ? th * 4 + r : 0) * out_w;
    EACH4(BLOCK_ROW)
    INNER_LOOP(tw, tiles_w) {
#define LOAD(r, j) const real d##r##j = inside##r && tw * 4 + j < out_w \
                                        ? row##r[clamp_index(tw * 4 + j, out_w)] : real(0);  // as above
#define COLUMN(j) LOAD(0, j) LOAD(1, j) LOAD(2, j) LOAD(3, j) \
                  WINOGRAD_A(c##j##_, d0##j, d1##j, d2##j, d3##j)  // column j of A dy
      EACH4(COLUMN)
#define ROW(r) { WINOGRAD_A(v, c0_##r, c1_##r, c2_##r, c3_##r) STORE_ROW(r, tw) }
      EACH6(ROW)
#undef LOAD
#undef COLUMN
#undef ROW
    }
  }
}

// y = (A^T m A) (+ bias[k]) for every tile of M (36, channels, tiles): y (num, channels, out_h, out_w),
// the outputs of a tile that fall outside out_h x out_w not written. Planes: (n, k, th); inner: tw, in two
// loops: the tiles inside the plane's columns, then the last if the edge cuts it.
KERNEL void winograd_output(const int planes, const real* m, const int point_step, const real* bias,
                            const int bias_term, real* y, const int channels, const int out_h, const int out_w,
                            const int tiles_h, const int tiles_w) {
  const int tiles = planes / channels * tiles_w;
  const int whole_tiles = out_w / 4;  // tiles whose four columns are all inside
  PLANE_LOOP(p, planes) {
    const int th = p % tiles_h;
    const int k = (p / tiles_h) % channels;
    const int n = p / (tiles_h * channels);
    const real* src = m + (size_t)k * tiles + ((size_t)n * tiles_h + th) * tiles_w;
    real* plane = y + ((size_t)n * channels + k) * out_h * out_w;
    const real offset = bias_term ? bias[k] : real(0);
    // No store under a condition (masked stores do not vectorize at a stride): an output past the
    // plane's last row or column goes to that last row or column instead, before the value that belongs
    // there (rows and columns in decreasing order), which then overwrites it. One inner iteration owns
    // those elements, so on the GPU too the last store wins.
#define STORE_ROW_OF(r) real* const store_row##r = plane + (size_t)(th * 4 + r < out_h ? th * 4 + r : out_h - 1) * out_w;
    EACH4(STORE_ROW_OF)
#undef STORE_ROW_OF
#define LOAD(r, j) const real m##r##j = (src + (size_t)(6 * r + j) * point_step)[tw];
#define COLUMN(j) LOAD(0, j) LOAD(1, j) LOAD(2, j) LOAD(3, j) LOAD(4, j) LOAD(5, j) \
                  WINOGRAD_AT(c##j##_, m0##j, m1##j, m2##j, m3##j, m4##j, m5##j)  // column j of A^T m
#define STORE(r, j, COLUMN_OF) store_row##r[COLUMN_OF(tw * 4 + j)] = v##j + offset;
#define ROW(r, COLUMN_OF) { WINOGRAD_AT(v, c0_##r, c1_##r, c2_##r, c3_##r, c4_##r, c5_##r) \
    STORE(r, 3, COLUMN_OF) STORE(r, 2, COLUMN_OF) STORE(r, 1, COLUMN_OF) STORE(r, 0, COLUMN_OF) }
#define AS_IS(column) (column)
#define CLAMPED(column) clamp_index(column, out_w)
    // Inside: plain stores at stride 4, which the CPU build writes with permutes rather than scatters.
    INNER_LOOP(tw, whole_tiles) {
      EACH6(COLUMN)
      ROW(3, AS_IS) ROW(2, AS_IS) ROW(1, AS_IS) ROW(0, AS_IS)
    }
    INNER_LOOP(edge, tiles_w - whole_tiles) {
      const int tw = whole_tiles + edge;
      EACH6(COLUMN)
      ROW(3, CLAMPED) ROW(2, CLAMPED) ROW(1, CLAMPED) ROW(0, CLAMPED)
    }
#undef LOAD
#undef COLUMN
#undef STORE
#undef ROW
#undef AS_IS
#undef CLAMPED
  }
}
#undef BLOCK_ROW

// filter_diff[o, i] = G^T du[:, o, i] G (3x3) for du (36, out_channels, in_channels): the weight
// gradient out of the GEMMs' space, written (the caller adds it to the weight diff: a += at the filters'
// stride of 9 is a gather and a scatter, which GCC does not vectorize; plain stores it does).
// Planes: out_channels; inner: in_channels.
KERNEL void winograd_filter_diff(const int planes, const real* du, const int point_step, real* filter_diff,
                                 const int in_channels) {
  PLANE_LOOP(o, planes) {
    const real* src = du + (size_t)o * in_channels;
    real* dst = filter_diff + (size_t)o * in_channels * 9;
    INNER_LOOP(i, in_channels) {
#define LOAD(r, c) const real u##r##c = (src + (size_t)(6 * r + c) * point_step)[i];
#define ROW(r) LOAD(r, 0) LOAD(r, 1) LOAD(r, 2) LOAD(r, 3) LOAD(r, 4) LOAD(r, 5) \
               WINOGRAD_GT(t##r##_, u##r##0, u##r##1, u##r##2, u##r##3, u##r##4, u##r##5)  // row r of du G
      EACH6(ROW)
#define COLUMN(c) { WINOGRAD_GT(v, t0_##c, t1_##c, t2_##c, t3_##c, t4_##c, t5_##c) \
                    dst[i * 9 + c] = v0; dst[i * 9 + 3 + c] = v1; dst[i * 9 + 6 + c] = v2; }
      EACH3(COLUMN)
#undef LOAD
#undef ROW
#undef COLUMN
    }
  }
}
#undef STORE_ROW
