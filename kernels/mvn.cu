// MVN's one kernel of its own: the rest (row means and variances, normalizing, the backward) are
// batch_norm.cu's and reduce.cu's kernels with one "channel" per normalized row.
#include "shim.h"

// inv_std[r] = 1 / (sqrt(var[r]) + eps): Caffe's MVN adds eps to the standard deviation (BatchNorm adds
// it to the variance).
KERNEL void mvn_inv_std(const int rows, const real* var, const real eps, real* inv_std) {
  ELEMENT_LOOP(r, rows) { inv_std[r] = real(1) / (sqrt(var[r]) + eps); }
}
