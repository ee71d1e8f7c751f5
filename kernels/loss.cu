// Loss kernels: SoftmaxWithLoss (multinomial logistic loss of a softmax), EuclideanLoss,
// SigmoidCrossEntropyLoss, HingeLoss, InfogainLoss, MultinomialLogisticLoss and ContrastiveLoss.
//
// Labels arrive as reals (Caffe keeps them in Dtype blobs) and are truncated to int as Caffe does.
// SoftmaxWithLoss writes its per-target losses to a buffer that the layer sums with the array module;
// the other losses' forward kernels are stage 1 of reduce.h's deterministic sums (each term is one
// target's loss), so no two iterations ever add into the same place, and the total has the same bits
// on the CPU and the GPU.
#include "reduce.h"

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
  ELEMENT_LOOP(i, count) { d[i] = a[i] - b[i]; }
}

// dx = sign * top_diff / num * d (sign +1 for the first bottom, -1 for the second).
KERNEL void euclidean_backward(const int count, const real* d, const real* top_diff,
                               const real sign_over_num, real* dx) {
  const real alpha = sign_over_num * top_diff[0];
  ELEMENT_LOOP(i, count) { dx[i] = alpha * d[i]; }
}

// Caffe's kLOG_THRESHOLD: InfogainLoss and MultinomialLogisticLoss clamp a probability to it before the
// log. As std::max(q, threshold) a NaN q stays NaN (a NaN in the data shows as a NaN loss).
#define MC_LOG_THRESHOLD real(1e-20)

DEVICE real clamp_probability(const real q) { return q < MC_LOG_THRESHOLD ? MC_LOG_THRESHOLD : q; }

// The class of a target from its label: the class in [0, classes), -1 for an ignored target, -2 for a
// label outside [0, classes) (the layer reports it; the kernels read nothing with it).
DEVICE int target_class(const real label, const int classes, const int has_ignore, const int ignore_label) {
  const int l = (int)label;
  if (has_ignore && l == ignore_label) return -1;
  return (l < 0 || l >= classes) ? -2 : l;
}

// valid[k] for a target of class l (target_class): 1 counted, 0 ignored, -1 a bad label.
DEVICE real valid_flag(const int l) { return l >= 0 ? real(1) : (l == -1 ? real(0) : real(-1)); }

// -- SigmoidCrossEntropyLoss ----------------------------------------------------------------------
// Stage 1 of the loss sum over planes of `inner` elements: term k is
//   -(x t - log(1 + exp(x))) = log(1 + exp(x - 2 x [x >= 0])) - x (t - [x >= 0]),
// Caffe's stable form (exp never overflows), or 0 for an ignored target; valid[k] = 1 counted, 0 ignored.
// The target t is any real (a probability); only the ignore test truncates it.
KERNEL void sigmoid_cross_entropy_loss_forward(const int planes, const int inner, const int lanes,
                                               const real* x, const real* target, real* valid,
                                               const int has_ignore, const int ignore_label, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t k) {
      const real v = x[k], t = target[k];
      const bool ignored = has_ignore && (int)t == ignore_label;
      const real positive = real(v >= real(0));
      valid[k] = ignored ? real(0) : real(1);
      return ignored ? real(0) : log(real(1) + exp(v - real(2) * v * positive)) - v * (t - positive);
    }, partial);
  }
}

// dx = (sigmoid(x) - t) * top_diff / normalizer, 0 for an ignored target; sigmoid as Caffe's Sigmoid
// layer computes it (kernels/activation.cu).
KERNEL void sigmoid_cross_entropy_loss_backward(const int planes, const int inner, const real* x,
                                                const real* target, const real* top_diff,
                                                const real* normalizer, real* dx, const int has_ignore,
                                                const int ignore_label) {
  const real scale = top_diff[0] / normalizer[0];
  PLANE_LOOP(p, planes) {
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const real v = x[offset + j], t = target[offset + j];
      const bool ignored = has_ignore && (int)t == ignore_label;
      const real sigmoid = real(0.5) * tanh(real(0.5) * v) + real(0.5);
      dx[offset + j] = ignored ? real(0) : (sigmoid - t) * scale;
    }
  }
}

// -- HingeLoss ------------------------------------------------------------------------------------
// Scores as planes (one per item) of `dim` classes; label[p] the item's class. The margin of class c is
// max(0, 1 + s x_c), s = -1 for the true class and +1 for the others (Caffe's one-vs-all hinge).
DEVICE real hinge_margin(const real v, const bool truth) {
  const real m = real(1) + (truth ? -v : v);
  return m > real(0) ? m : real(0);
}

// Stage 1 of the loss sum: term k is the margin (norm 1) or its square (norm 2). valid[p] = 1, or -1 for
// a label outside [0, dim) (written by the iteration of the plane's first element: one writer).
KERNEL void hinge_loss_forward(const int planes, const int inner, const int lanes, const real* x,
                               const real* label, const int norm, real* valid, real* partial) {
  PLANE_LOOP(p, planes) {
    const int l = target_class(label[p], inner, 0, 0);
    const size_t first = (size_t)p * inner, truth = first + (size_t)l;
    mc_plane_partials(p, inner, lanes, [=](size_t k) {
      if (k == first) valid[p] = valid_flag(l);
      const real m = hinge_margin(x[k], k == truth);
      return norm == 1 ? m : m * m;
    }, partial);
  }
}

// dx = top_diff / num * (sign(m) for norm 1, 2 m for norm 2), m the margin with its sign s (Caffe's
// caffe_cpu_sign: sign(0) = 0, so a class past the margin gets no gradient).
KERNEL void hinge_loss_backward(const int planes, const int inner, const real* x, const real* label,
                                const int norm, const real* top_diff, real* dx) {
  const real scale = top_diff[0] / real(planes);
  PLANE_LOOP(p, planes) {
    const int l = (int)label[p];
    const size_t offset = (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const bool truth = j == l;
      const real m = hinge_margin(x[offset + j], truth);
      const real g = norm == 1 ? real(m > real(0)) : real(2) * m;
      dx[offset + j] = (truth ? -g : g) * scale;
    }
  }
}

// -- MultinomialLogisticLoss ----------------------------------------------------------------------
// Probabilities as `num` rows of `dim`; label[i] the row's class. Stage 1 (one plane of `num` terms) of
// the loss sum: term i is -log(max(prob[i, label], kLOG_THRESHOLD)); valid[i] = 1, or -1 for a bad label.
KERNEL void multinomial_logistic_loss_forward(const int planes, const int inner, const int lanes,
                                              const real* prob, const real* label, const int dim,
                                              real* valid, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t i) {
      const int l = target_class(label[i], dim, 0, 0);
      valid[i] = valid_flag(l);
      return l < 0 ? real(0) : -log(clamp_probability(prob[i * dim + l]));
    }, partial);
  }
}

// dx = -top_diff / num / max(prob, kLOG_THRESHOLD) at the label's class, 0 elsewhere.
KERNEL void multinomial_logistic_loss_backward(const int num, const int dim, const real* prob,
                                               const real* label, const real* top_diff, real* dx) {
  const real scale = -top_diff[0] / real(num);
  PLANE_LOOP(p, num) {
    const int l = (int)label[p];
    const real* pp = prob + (size_t)p * dim;
    real* dxp = dx + (size_t)p * dim;
    INNER_LOOP(j, dim) { dxp[j] = j == l ? scale / clamp_probability(pp[j]) : real(0); }
  }
}

// -- InfogainLoss ---------------------------------------------------------------------------------
// prob (a softmax) viewed as (outer, channels, inner), label as (outer, inner), H a channels x channels
// matrix. Stage 1 of the loss sum over the planes p < outer of `inner` targets: term k (target (p, j)) is
// -sum_c H[label, c] log(max(prob[p, c, j], kLOG_THRESHOLD)), 0 for an ignored target; valid[k] = 1
// counted, 0 ignored, -1 a bad label.
KERNEL void infogain_loss_forward(const int planes, const int inner, const int lanes, const int channels,
                                  const real* prob, const real* label, const real* infogain, real* valid,
                                  const int has_ignore, const int ignore_label, real* partial) {
  PLANE_LOOP(p, planes) {
    // target k = p * inner + j; its class-c probability at (p * channels + c) * inner + j.
    const real* pp = prob + (size_t)p * (channels - 1) * inner;
    mc_plane_partials(p, inner, lanes, [=](size_t k) {
      const int l = target_class(label[k], channels, has_ignore, ignore_label);
      valid[k] = valid_flag(l);
      real loss = real(0);
      if (l >= 0) {
        const real* row = infogain + (size_t)l * channels;
        for (int c = 0; c < channels; ++c) loss -= row[c] * log(clamp_probability(pp[k + (size_t)c * inner]));
      }
      return loss;
    }, partial);
  }
}

// dx = (prob * rowsum(H)[label] - H[label, c]) * top_diff / normalizer; 0 for an ignored target.
// row_sum[l] = sum_c H[l, c] (the layer sums it with reduce.h).
KERNEL void infogain_loss_backward(const int outer, const int channels, const int inner, const real* prob,
                                   const real* label, const real* infogain, const real* row_sum,
                                   const real* top_diff, const real* normalizer, real* dx,
                                   const int has_ignore, const int ignore_label) {
  const real scale = top_diff[0] / normalizer[0];
  if (inner == 1) {  // rows of contiguous channels, as softmax_loss_backward (extents (outer, channels))
    PLANE_LOOP(p, outer) {
      const int l = target_class(label[p], channels, has_ignore, ignore_label);
      const real* pp = prob + (size_t)p * channels;
      real* dxp = dx + (size_t)p * channels;
      const real* row = infogain + (size_t)(l < 0 ? 0 : l) * channels;
      const real sum = l < 0 ? real(0) : row_sum[l];
      INNER_LOOP(c, channels) { dxp[c] = l < 0 ? real(0) : (pp[c] * sum - row[c]) * scale; }
    }
    return;
  }
  PLANE_LOOP(p, outer) {
    const real* lp = label + (size_t)p * inner;
    for (int c = 0; c < channels; ++c) {
      const size_t k = ((size_t)p * channels + c) * inner;
      const real* pc = prob + k;
      real* dxc = dx + k;
      INNER_LOOP(j, inner) {
        const int l = target_class(lp[j], channels, has_ignore, ignore_label);
        const int r = l < 0 ? 0 : l;
        dxc[j] = l < 0 ? real(0) : (pc[j] * row_sum[r] - infogain[(size_t)r * channels + c]) * scale;
      }
    }
  }
}

// -- ContrastiveLoss ------------------------------------------------------------------------------
// a and b as `num` planes (pairs) of `dim` features. Stage 1 of the per-pair sums of squares (d^2, one
// channel per pair); also writes difference = a - b for backward.
KERNEL void contrastive_loss_distance(const int planes, const int inner, const int lanes, const real* a,
                                      const real* b, real* difference, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t k) {
      const real d = a[k] - b[k];
      difference[k] = d;
      return d * d;
    }, partial);
  }
}

// Stage 1 (one plane of `num` terms) of the loss sum: term i is d^2 for a similar pair (y != 0 once
// truncated), else max(margin - d, 0)^2, or max(margin - d^2, 0) with legacy_version.
KERNEL void contrastive_loss_forward(const int planes, const int inner, const int lanes,
                                     const real* distance_sq, const real* similar, const real margin,
                                     const int legacy, real* partial) {
  PLANE_LOOP(p, planes) {
    mc_plane_partials(p, inner, lanes, [=](size_t i) {
      const real d2 = distance_sq[i];
      const real m = legacy ? margin - d2 : margin - sqrt(d2);
      const real hinge = m > real(0) ? m : real(0);
      return (int)similar[i] != 0 ? d2 : (legacy ? hinge : hinge * hinge);
    }, partial);
  }
}

// dx = alpha (a - b) for a similar pair, alpha = sign * top_diff / num (sign +1 for a, -1 for b); for a
// dissimilar pair within the margin -alpha (a - b) (legacy) or -alpha (margin - d) / (d + 1e-4) (a - b)
// (Caffe's 1e-4 keeps d = 0 finite), else 0.
KERNEL void contrastive_loss_backward(const int num, const int dim, const real* difference,
                                      const real* distance_sq, const real* similar, const real margin,
                                      const int legacy, const real sign, const real* top_diff, real* dx) {
  const real alpha = sign * top_diff[0] / real(num);
  PLANE_LOOP(p, num) {
    const real d2 = distance_sq[p];
    const real d = sqrt(d2);
    const real m = legacy ? margin - d2 : margin - d;
    const real beta = legacy ? -alpha : -alpha * m / (d + real(1e-4));
    const real coefficient = (int)similar[p] != 0 ? alpha : (m > real(0) ? beta : real(0));
    const real* dp = difference + (size_t)p * dim;
    real* dxp = dx + (size_t)p * dim;
    INNER_LOOP(j, dim) { dxp[j] = coefficient * dp[j]; }
  }
}
