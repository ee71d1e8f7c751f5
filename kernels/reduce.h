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

// Stage 1's loop for one sum of plane p (count 1: `first`'s terms into the row first_out) or two at once
// (count 2, mc_plane_partials_pair: `second`'s into second_out too), each a row of `lanes` partials. One
// pass for both sums: their additions interleave on the CPU, each lane's own still in order (the same
// bits), where two passes each waited on one chain of additions per vector of lanes (BatchNorm's moments
// of 32x64x32x32 on 2 threads: 124 -> 79 us).
template <int count, class First, class Second>
DEVICE void mc_plane_sums(const int p, const int inner, const int lanes, const First& first,
                          const Second& second, real* first_out, real* second_out) {
  if (inner == 1 && lanes == 1) {  // one term, e.g. a plane per element of an (N, C) blob: the same sum,
    INNER_LOOP(l, 1) {             // without the accumulators' loops
      first_out[0] = real(0) + first((size_t)p);
      if (count == 2) second_out[0] = real(0) + second((size_t)p);
    }
    return;
  }
  real acc[MC_LANES], acc2[MC_LANES];
  INNER_LOOP(l, lanes) {
    acc[l] = real(0);
    if (count == 2) acc2[l] = real(0);
  }
  const size_t offset = (size_t)p * inner;
  const int full = inner - inner % lanes;  // whole rows of `lanes` terms
  if (lanes == MC_LANES) {  // the same rows; a constant width keeps acc in vector registers on the CPU
    for (int i = 0; i < full; i += MC_LANES) {
      INNER_LOOP(l, MC_LANES) {
        acc[l] += first(offset + i + l);
        if (count == 2) acc2[l] += second(offset + i + l);
      }
    }
  } else {
    for (int i = 0; i < full; i += lanes) {
      INNER_LOOP(l, lanes) {
        acc[l] += first(offset + i + l);
        if (count == 2) acc2[l] += second(offset + i + l);
      }
    }
  }
  INNER_LOOP(l, inner - full) {
    acc[l] += first(offset + full + l);
    if (count == 2) acc2[l] += second(offset + full + l);
  }
  INNER_LOOP(l, lanes) {
    first_out[l] = acc[l];
    if (count == 2) second_out[l] = acc2[l];
  }
}

template <class Term>
DEVICE void mc_plane_partials(const int p, const int inner, const int lanes, const Term& term,
                              real* partial) {
  mc_plane_sums<1>(p, inner, lanes, term, term, partial + (size_t)p * lanes, partial);
}

// Two sums of plane p = n * dim + c at once, in the (outer, 2 dim, lanes) layout of layers/reduce.py's
// paired_channel_sums: the partials of `first` at row p + n * dim, those of `second` at row
// p + (n + 1) * dim, so that one stage-2 launch over 2 dim "channels" totals both.
template <class First, class Second>
DEVICE void mc_plane_partials_pair(const int p, const int inner, const int lanes, const int dim,
                                   const First& first, const Second& second, real* partial) {
  real* const sums = partial + ((size_t)(p / dim) * dim + p) * lanes;
  mc_plane_sums<2>(p, inner, lanes, first, second, sums, sums + (size_t)dim * lanes);
}
