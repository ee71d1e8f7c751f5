// Dropout at train time: y = x * mask * scale, mask ~ Bernoulli(1 - ratio), scale = 1 / (1 - ratio).
//
// The mask is drawn inside the kernel by a counter-based hash, so the CPU and GPU builds (and the
// float and double builds) draw the same mask, and a given (key, counter) always replays it:
//   fmix(h)  = murmur3's 32-bit finalizer (h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13;
//              h *= 0xc2b2ae35; h ^= h >> 16), a bijection with full avalanche;
//   s        = fmix(key ^ fmix(counter + 0x9e3779b9))       (once per call: the stream);
//   hash(i)  = fmix(fmix(s ^ (i * 0x9e3779b9)) + s)          (per element i, all mod 2^32);
//   u        = (hash(i) >> 8) * 2^-24, uniform in [0, 1) and exact in float and double;
//   keep i   iff u >= ratio, so P(keep) = 1 - ratio (tested as (hash(i) >> 8) >= ceil(ratio * 2^24)).
// The key is minicaffe.rng.key32("dropout", layer name), the counter the layer's forward_index.
#include "shim.h"

#define MC_GOLDEN 0x9e3779b9u

DEVICE unsigned int dropout_fmix32(unsigned int h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Whether element i is kept: u >= ratio, tested in integers as (hash(i) >> 8) >= ceil(ratio * 2^24), the
// same predicate (u and ratio * 2^24 are exact in real) without a conversion per element. i * MC_GOLDEN
// is a multiply; the two fmix32's four are the cost of the draw (no 64-bit arithmetic, no branch).
DEVICE bool dropout_keep(const unsigned int stream, const unsigned int threshold, const int i) {
  return (dropout_fmix32(dropout_fmix32(stream ^ ((unsigned int)i * MC_GOLDEN)) + stream) >> 8) >= threshold;
}

DEVICE unsigned int dropout_threshold(const real ratio) {
  return (unsigned int)ceil(ratio * real(16777216));  // 2^24; ratio in [0, 1)
}

// mask[i] gets 1 (kept) or 0 (dropped), a byte; x and y may be the same array (in place).
KERNEL void dropout_forward(const int count, const real* x, real* y, unsigned char* mask,
                            const unsigned key, const unsigned counter, const real ratio,
                            const real scale) {
  const unsigned int stream = dropout_fmix32(key ^ dropout_fmix32(counter + MC_GOLDEN));
  const unsigned int threshold = dropout_threshold(ratio);
  ELEMENT_LOOP(i, count) {
    const real keep = dropout_keep(stream, threshold, i) ? real(1) : real(0);
    mask[i] = (unsigned char)keep;
    y[i] = x[i] * keep * scale;
  }
}

// dx = dy * mask * scale; dy and dx may be the same array (in place).
KERNEL void dropout_backward(const int count, const real* dy, const unsigned char* mask, real* dx,
                             const real scale) {
  ELEMENT_LOOP(i, count) { dx[i] = dy[i] * real(mask[i]) * scale; }
}
