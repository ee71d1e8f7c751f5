// Batch normalisation (Caffe's BatchNormLayer): y = (x - mean[c]) / sqrt(var[c] + eps).
// Blobs are viewed as (num, channels, spatial); planes are (n, c) pairs, the inner loop runs over the
// contiguous spatial positions. Sums over n and spatial (the channel statistics) are reduce.h's
// deterministic two-stage sums: reduce.cu's kernels, and the *_partials kernels here.
#include "reduce.h"

// Where plane p = n * group + g of a channel group starts in a (num, channels, spatial) blob: image n,
// channel first + g. The batch-statistics forward goes through a big blob a group at a time (layers/
// batch_norm.py's STATS_CACHE_LIMIT), so that its second read of x (to normalize) hits the caches; with
// first 0 and group = channels, plane p starts at p * spatial.
DEVICE size_t bn_group_offset(const int p, const int spatial, const int channels, const int first,
                              const int group) {
  return ((size_t)(p / group) * channels + first + p % group) * spatial;
}

// Stage-1 partial sums (reduce.h) of (x - mean[c])^2: a variance from a known mean (MVN's rows).
KERNEL void bn_variance_partials(const int planes, const int spatial, const int lanes, const int channels,
                                 const real* x, const real* mean, real* partial) {
  PLANE_LOOP(p, planes) {
    const real m = mean[p % channels];
    mc_plane_partials(p, spatial, lanes, [=](size_t j) {
      const real v = x[j] - m;
      return v * v;
    }, partial);
  }
}

// Stage-1 partial sums (reduce.h) of x - shift[c] and of its square, from one read of x (a plane is
// read twice, the second time from the L1 cache). Their means m1, m2 give the batch statistics
// (bn_batch_stats): mean = shift + m1, var = m2 - m1^2. The shift is a value of the channel, so m1 is
// within the channel's spread and the difference keeps its precision (the one-pass formula without a
// shift loses it when the mean is large against the standard deviation).
// Over the channels first .. first + group - 1 of each image (a channel group, see bn_group_offset): the
// planes are (n, g) pairs, p = n * group + g, and both sums go in the (num, 2 group, lanes) layout of
// mc_plane_partials_pair (reduce.h): the sums, then the squares, totalled by one stage-2 launch.
KERNEL void bn_moment_partials(const int planes, const int spatial, const int lanes, const int channels,
                               const int first, const int group, const real* x, const real* shift,
                               real* partial) {
  PLANE_LOOP(p, planes) {
    const real k = shift[first + p % group];
    // x_p[j] for j in plane p's range p * spatial + [0, spatial): mc_plane_partials's indices
    const real* x_p = x + bn_group_offset(p, spatial, channels, first, group) - (size_t)p * spatial;
    mc_plane_partials_pair(p, spatial, lanes, group, [=](size_t j) { return x_p[j] - k; },
                           [=](size_t j) {
                             const real v = x_p[j] - k;
                             return v * v;
                           }, partial);
  }
}

DEVICE real bn_inv_std(const real var, const real eps) { return real(1) / sqrt(var + eps); }

// Per channel: the batch mean = shift + m1 and variance var = m2 - m1^2 (rounding may leave it a hair
// below 0: clamped), and inv_std = 1 / sqrt(var + eps).
KERNEL void bn_batch_stats(const int channels, const real* shift, const real* shifted_mean,
                           const real* square_mean, const real eps, real* mean, real* var, real* inv_std) {
  ELEMENT_LOOP(c, channels) {
    const real m1 = shifted_mean[c];
    const real v = square_mean[c] - m1 * m1;
    mean[c] = shift[c] + m1;
    var[c] = v > real(0) ? v : real(0);
    inv_std[c] = bn_inv_std(var[c], eps);
  }
}

// y = (x - mean[c]) * inv_std[c] over the planes (n, g) of the channel group first .. first + group - 1
// (bn_group_offset; all of it with first 0, group = channels); with mean all zero this scales a gradient
// by inv_std. y may be x.
KERNEL void bn_normalize(const int planes, const int spatial, const int channels, const int first,
                         const int group, const real* x, const real* mean, const real* inv_std, real* y) {
  PLANE_LOOP(p, planes) {
    const int c = first + p % group;
    const real m = mean[c];
    const real s = inv_std[c];
    const size_t offset = bn_group_offset(p, spatial, channels, first, group);
    INNER_LOOP(j, spatial) { y[offset + j] = (x[offset + j] - m) * s; }
  }
}

// Per channel: mean = mean_sum * factor, inv_std = 1 / sqrt(var_sum * factor + eps): the global
// statistics from the stored sums, factor = 1 / their weight.
KERNEL void bn_channel_stats(const int channels, const real* mean_sum, const real* var_sum,
                             const real factor, const real eps, real* mean, real* inv_std) {
  ELEMENT_LOOP(c, channels) {
    mean[c] = mean_sum[c] * factor;
    inv_std[c] = bn_inv_std(var_sum[c] * factor, eps);
  }
}

// Running sums: stat = stat * decay + weight * batch (Caffe's axpby on the stored blobs).
DEVICE real bn_running(const real stat, const real decay, const real weight, const real batch) {
  return stat * decay + weight * batch;
}

// The three stored blobs in one launch: mean_sum[c] and var_sum[c] take the batch mean and the batch
// variance times `correction` (m / (m - 1): the unbiased estimate), and their weight (one value) 1.
KERNEL void bn_update_running(const int channels, const real* batch_mean, const real* batch_var,
                              real* mean_sum, real* var_sum, real* weight, const real decay,
                              const real correction) {
  ELEMENT_LOOP(c, channels) {
    mean_sum[c] = bn_running(mean_sum[c], decay, real(1), batch_mean[c]);
    var_sum[c] = bn_running(var_sum[c], decay, correction, batch_var[c]);
    if (c == 0) weight[0] = bn_running(weight[0], decay, real(1), real(1));
  }
}

// Batch-statistics backward: dx = (dy - mean(dy)[c] - mean(dy * y)[c] * y) * inv_std[c].
// dx may be dy (in place).
KERNEL void bn_backward(const int planes, const int spatial, const int channels, const real* dy,
                        const real* y, const real* mean_dy, const real* mean_dy_y, const real* inv_std,
                        real* dx) {
  PLANE_LOOP(p, planes) {
    const int c = p % channels;
    const real a = mean_dy[c], b = mean_dy_y[c], s = inv_std[c];
    const size_t offset = (size_t)p * spatial;
    INNER_LOOP(j, spatial) { dx[offset + j] = (dy[offset + j] - a - b * y[offset + j]) * s; }
  }
}
