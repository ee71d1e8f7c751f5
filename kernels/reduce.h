// reduce.h -- deterministic sums over planes, for parameter gradients and channel statistics.
//
// No atomics and no order that depends on threads or blocks: every addition's order is fixed by the
// shape alone, so a sum has the same bits on every run, at every thread count, and in the CPU build
// and the GPU build of a kernel (the fake-CuPy GPU == CPU tests compare them bit for bit).
//
// Stage 1, `mc_plane_partials`, called inside a kernel's PLANE_LOOP: plane p's `inner` terms go into
// `lanes` partial sums, lane l summing terms l, l + lanes, l + 2 lanes, ... in that order, written to
// partial[p * lanes + l]. On the CPU the lanes are SIMD lanes (each row of `lanes` contiguous terms is
// one vector step, the rows run in order); on the GPU each lane is a thread (a row is one coalesced
// read) -- the same order in both. A term may also write an element-wise result (e.g. PReLU's dx), so
// a backward reads its inputs once for both.
// Stage 2, reduce.cu's `channel_total`: out[c] (+)= the partials of channel c, planes in order.
//
// lanes = min(MC_LANES, inner) (at least 1; the launcher's `plane_lanes`), so the partials take
// planes * lanes values: count / (inner / 32) for big planes, but as many as the elements for inner < 32
// (e.g. an (N, C) blob: one partial per element). A plain sum of an array skips stage 1 there (the
// partials would be the array itself); a fused or product term (PReLU, Scale, BatchNorm) needs them.
// A kernel may pass a plane fewer terms than the launch's lanes (e.g. the depthwise weight gradient's
// tap rows that lie inside the image): the lanes past its terms hold 0.
#pragma once
#include "shim.h"

#define MC_LANES 32

template <class Term>
DEVICE void mc_plane_partials(const int p, const int inner, const int lanes, const Term& term,
                              real* partial) {
  if (inner == 1 && lanes == 1) {  // one term, e.g. a plane per element of an (N, C) blob: the same sum,
    INNER_LOOP(l, 1) { partial[p] = real(0) + term((size_t)p); }  // without the accumulators' loops
    return;
  }
  real acc[MC_LANES];
  INNER_LOOP(l, lanes) { acc[l] = real(0); }
  const size_t offset = (size_t)p * inner;
  const int full = inner - inner % lanes;  // whole rows of `lanes` terms
  if (lanes == MC_LANES) {  // the same rows; a constant width keeps acc in vector registers on the CPU
    for (int i = 0; i < full; i += MC_LANES) {
      INNER_LOOP(l, MC_LANES) { acc[l] += term(offset + i + l); }
    }
  } else {
    for (int i = 0; i < full; i += lanes) {
      INNER_LOOP(l, lanes) { acc[l] += term(offset + i + l); }
    }
  }
  INNER_LOOP(l, inner - full) { acc[l] += term(offset + full + l); }
  INNER_LOOP(l, lanes) { partial[(size_t)p * lanes + l] = acc[l]; }
}

// Two sums of plane p = n * dim + c at once, in the (outer, 2 dim, lanes) layout of layers/reduce.py's
// paired_channel_sums: the partials of `first` at row p + n * dim, those of `second` at row
// p + (n + 1) * dim, so that one stage-2 launch over 2 dim "channels" totals both.
template <class First, class Second>
DEVICE void mc_plane_partials_pair(const int p, const int inner, const int lanes, const int dim,
                                   const First& first, const Second& second, real* partial) {
  real* sums = partial + (size_t)(p / dim) * dim * lanes;
  mc_plane_partials(p, inner, lanes, first, sums);
  mc_plane_partials(p, inner, lanes, second, sums + (size_t)dim * lanes);
}
