// Tile (Caffe's TileLayer): the bottom viewed as (outer, inner), inner = the axes from `axis` on; the top
// is (outer, tiles, inner), each tile a copy of the bottom's row. Backward sums a row's tiles, in tile
// order (Caffe's order), each element by one thread: deterministic without atomics.
#include "shim.h"

KERNEL void tile_forward(const int outer, const int tiles, const int inner, const real* x, real* y) {
  PLANE_LOOP(p, outer) {
    const real* xp = x + (size_t)p * inner;
    for (int t = 0; t < tiles; ++t) {
      real* yt = y + ((size_t)p * tiles + t) * inner;
      INNER_LOOP(j, inner) { yt[j] = xp[j]; }
    }
  }
}

KERNEL void tile_backward(const int outer, const int tiles, const int inner, const real* dy, real* dx) {
  PLANE_LOOP(p, outer) {
    real* dxp = dx + (size_t)p * inner;
    const real* dyp = dy + (size_t)p * tiles * inner;
    INNER_LOOP(j, inner) { dxp[j] = dyp[j]; }
    for (int t = 1; t < tiles; ++t) {
      const real* dyt = dyp + (size_t)t * inner;
      INNER_LOOP(j, inner) { dxp[j] += dyt[j]; }
    }
  }
}
