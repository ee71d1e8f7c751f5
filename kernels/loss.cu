// Loss kernels: SoftmaxWithLoss (multinomial logistic loss of a softmax) and EuclideanLoss.
//
// Labels arrive as reals (Caffe keeps them in Dtype blobs) and are truncated to int as Caffe does. The
// per-element losses go to a buffer that the layer sums with the array module, so no two iterations
// ever add into the same place.
#include "shim.h"

// FLT_MIN: Caffe clamps the probability here before the log (so float and double agree). A NaN
// probability is not clamped: it stays NaN, so a NaN in the data shows as a NaN loss (Caffe's
// max(q, FLT_MIN) would log -log(FLT_MIN) = 87.3365 while the weights are already NaN).
#define MC_FLT_MIN real(1.175494351e-38)

// prob viewed as (outer, channels, inner); label as (outer, inner).
// loss[i] = -log(max(prob[label], FLT_MIN)) (NaN for a NaN prob) and valid[i] = 1 for a counted target; both 0 for an
// ignored one; valid[i] = -1 flags a label outside [0, channels) so the layer can report it.
KERNEL void softmax_loss_forward(const int outer, const int channels, const int inner, const real* prob,
                                 const real* label, real* loss, real* valid, const int has_ignore,
                                 const int ignore_label) {
  PLANE_LOOP(p, outer) {
    const real* pp = prob + (size_t)p * channels * inner;
    const real* lp = label + (size_t)p * inner;
    real* lossp = loss + (size_t)p * inner;
    real* validp = valid + (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const int l = (int)lp[j];
      if (has_ignore && l == ignore_label) {
        lossp[j] = real(0);
        validp[j] = real(0);
      } else if (l < 0 || l >= channels) {
        lossp[j] = real(0);
        validp[j] = real(-1);
      } else {
        const real q = pp[(size_t)l * inner + j];
        lossp[j] = -log(q > MC_FLT_MIN || q != q ? q : MC_FLT_MIN);
        validp[j] = real(1);
      }
    }
  }
}

// dx = (prob - onehot(label)) * top_diff / normalizer; zero for ignored targets. top_diff and
// normalizer are one-element arrays so that the GPU never waits for them to reach the host.
KERNEL void softmax_loss_backward(const int outer, const int channels, const int inner,
                                  const real* prob, const real* label, const real* top_diff,
                                  const real* normalizer, real* dx, const int has_ignore,
                                  const int ignore_label) {
  const real scale = top_diff[0] / normalizer[0];
  if (inner == 1) {  // rows of contiguous channels: the channel loop is the inner one (the layer's
                     // extents are then (outer, channels))
    PLANE_LOOP(p, outer) {
      const int l = (int)label[p];
      const real s = (has_ignore && l == ignore_label) ? real(0) : scale;
      const real* pp = prob + (size_t)p * channels;
      real* dxp = dx + (size_t)p * channels;
      INNER_LOOP(c, channels) { dxp[c] = (pp[c] - real(c == l)) * s; }
    }
    return;
  }
  PLANE_LOOP(p, outer) {
    const real* lp = label + (size_t)p * inner;
    // Channels outside, the contiguous inner index inside: vectorizes (the label is re-read per
    // channel, which is cheaper than a strided inner loop).
    for (int c = 0; c < channels; ++c) {
      const size_t k = ((size_t)p * channels + c) * inner;
      const real* pc = prob + k;
      real* dxc = dx + k;
      INNER_LOOP(j, inner) {
        const int l = (int)lp[j];
        const real s = (has_ignore && l == ignore_label) ? real(0) : scale;
        dxc[j] = (pc[j] - real(c == l)) * s;
      }
    }
  }
}

// d = a - b; the layer takes the loss as dot(d, d) / (2 num).
KERNEL void euclidean_diff(const int count, const real* a, const real* b, real* d) {
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { d[i] = a[i] - b[i]; }
  }
}

// dx = sign * top_diff / num * d (sign +1 for the first bottom, -1 for the second).
KERNEL void euclidean_backward(const int count, const real* d, const real* top_diff,
                               const real sign_over_num, real* dx) {
  const real alpha = sign_over_num * top_diff[0];
  PLANE_LOOP(p, 1) {
    INNER_LOOP(i, count) { dx[i] = alpha * d[i]; }
  }
}
