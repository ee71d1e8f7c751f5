// The copy behind Concat and Slice (both directions): `planes` blocks of `n` contiguous values, read at
// a stride of src_stride and written at a stride of dst_stride. The caller passes src and dst already
// offset to the slice's start along the axis; planes are the product of the dims before the axis and n
// is (the slice's size along the axis) * (the product of the dims after it).
#include "shim.h"

KERNEL void copy_planes(const int planes, const int n, const int src_stride, const int dst_stride,
                        const real* src, real* dst) {
  PLANE_LOOP(p, planes) {
    const real* s = src + (size_t)p * src_stride;
    real* d = dst + (size_t)p * dst_stride;
    INNER_LOOP(j, n) { d[j] = s[j]; }
  }
}
