// Accuracy (top-k), Caffe's rule: a target is correct when fewer than top_k classes score strictly
// higher than the true class (so ties count in the label's favour). Unlike Caffe, a NaN among a
// target's scores makes it wrong: every comparison with NaN is false, so otherwise nothing would score
// higher than a NaN and a diverged net would report 100% accuracy.
//
// scores viewed as (outer, channels, inner); label as (outer, inner). Per target it writes
// correct[i] (1 or 0) and cls[i]: the label for a counted target, `channels` for an ignored one (a
// spare bin the layer drops when it counts per class), -1 for a label outside [0, channels).
// `truth` is scratch (outer * inner). The channel loop runs outside the contiguous inner loop so that
// it vectorizes; each j stays with one GPU thread across the passes, so there are no races.
// The per-class and total sums are taken by the layer with the array module.
#include "shim.h"

KERNEL void accuracy_forward(const int outer, const int channels, const int inner, const real* scores,
                             const real* label, real* correct, int* cls, real* truth,
                             const int has_ignore, const int ignore_label, const int top_k) {
  PLANE_LOOP(p, outer) {
    const real* sp = scores + (size_t)p * channels * inner;
    const real* lp = label + (size_t)p * inner;
    real* cp = correct + (size_t)p * inner;  // counts the classes scoring higher, then 1 / 0
    int* clsp = cls + (size_t)p * inner;
    real* tp = truth + (size_t)p * inner;
    INNER_LOOP(j, inner) {
      const int l = (int)lp[j];
      const bool ignored = has_ignore && l == ignore_label;
      const bool bad = !ignored && (l < 0 || l >= channels);
      clsp[j] = ignored ? channels : (bad ? -1 : l);
      tp[j] = sp[(size_t)(ignored || bad ? 0 : l) * inner + j];
      cp[j] = real(0);
    }
    for (int c = 0; c < channels; ++c) {
      const real* sc = sp + (size_t)c * inner;
      // A NaN score (the label's own included: c == label) adds `channels`, which no top_k reaches.
      INNER_LOOP(j, inner) { cp[j] += sc[j] != sc[j] ? real(channels) : real(sc[j] > tp[j]); }
    }
    INNER_LOOP(j, inner) {
      const int l = clsp[j];
      cp[j] = (l >= 0 && l < channels && cp[j] < real(top_k)) ? real(1) : real(0);
    }
  }
}
