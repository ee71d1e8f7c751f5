// shim.h -- lets one kernel source build both as CUDA (NVRTC / nvcc) and as plain C++ for the CPU.
//
// Kernels are written as a loop over "planes" (outer, e.g. n*c) around a loop over a contiguous
// inner index (e.g. h*w). On the GPU the planes map to grid.y and the inner index to grid.x *
// threads, each with a grid-stride loop. On the CPU the same macros become two plain for-loops whose
// inner loop is marked `omp simd`, so the compiler vectorizes it without per-element integer division,
// and whose plane loop is split over OpenMP threads when the launch is large enough (see PLANE_LOOP).
// (Built with -fno-trapping-math so that branches become vector selects; results are unchanged.)
//
// The element type is `real`: the loader compiles each source twice, with MC_REAL=float and =double.
//
// MC_RACECHECK (minicaffe.kernel's race-check build, CPU only, with -fsanitize=thread): the CPU build
// with the GPU's loops instead of the plain ones. mc_launch runs the kernel once per emulated GPU
// thread, each an OS thread with its own blockIdx/threadIdx, so ThreadSanitizer reports any element
// that two GPU threads of one launch touch without both being reads -- a race on the GPU.
#pragma once

#ifndef MC_REAL
#define MC_REAL float
#endif

typedef MC_REAL real;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define KERNEL extern "C" __global__
#define DEVICE __device__ __forceinline__
#define MC_GPU_LOOPS
#else
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
// glibc's vector math library (libmvec, accurate to a few ulp) has SIMD versions of exp/log/pow
// (and tanh from glibc 2.35); declaring them `omp declare simd` lets loops that call them vectorize.
// The loader links -lmvec where it exists and otherwise builds with MC_NO_MVEC. (exp and tanh of a
// float are minicaffe's own: below.)
#if defined(__GLIBC__) && defined(__x86_64__) && !defined(MC_NO_MVEC)
extern "C" {
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
double log(double);
#pragma omp declare simd notinbranch
float powf(float, float);
#pragma omp declare simd notinbranch
double pow(double, double);
#if __GLIBC_PREREQ(2, 35)
#pragma omp declare simd notinbranch
double tanh(double);
#endif
}
#endif
using std::fabs;
using std::fmax;
using std::fmin;
using std::log;
using std::pow;
using std::sqrt;

// exp and tanh of a float, written here rather than taken from libm/libmvec: plain arithmetic that
// vectorizes, faster than libmvec's (8 MB on 2 threads, A/B in one process, medians: Sigmoid 0.57 ->
// 0.49 ms, TanH 0.57 -> 0.40) and as accurate (exp within 1.1 ulp, libmvec's expf 2.6; tanh 2.4;
// tests/test_activations.py). A double's exp and tanh stay libm's (libmvec's vectors). On the GPU,
// CUDA's own.
static inline uint32_t mc_float_bits(const float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}
static inline float mc_bits_float(const uint32_t bits) {
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}
// e^r - 1 for x = k ln 2 + r, |r| <= ln2 / 2, with the integer k (two's complement in `k`). x / ln 2 +
// 1.5 * 2^23 rounds x / ln 2 to k in the low bits of the sum (no float-to-int conversion, which is
// undefined for NaN; a NaN x gives a NaN result); ln 2 in two parts, the first exact times any k here.
// e^r - 1 = r + r^2 p(r), p a minimax polynomial of degree 4 (1.2e-7 relative error).
static inline float mc_expm1_reduced(const float x, uint32_t& k) {
  const float shifter = 12582912.0f;
  const float shifted = fmaf(x, 1.44269504088896341f, shifter);
  const float whole = shifted - shifter;
  float r = fmaf(whole, -0.693145751953125f, x);
  r = fmaf(whole, -1.42860682030941723212e-6f, r);
  float p = 0.001390128512866795f;
  p = fmaf(p, r, 0.008363140746951103f);
  p = fmaf(p, r, 0.04166685417294502f);
  p = fmaf(p, r, 0.16666577756404877f);
  p = fmaf(p, r, 0.5f);
  k = mc_float_bits(shifted) - mc_float_bits(shifter);
  return fmaf(p * r, r, r);
}
// e^x: beyond [-104, 89] it is 0 or inf anyway; 2^k goes in as two powers of 2 that are normal floats,
// so that the product rounds to inf or to a subnormal exactly where e^x does.
static inline float exp(const float x) {
  uint32_t k;
  const float q = mc_expm1_reduced(x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x), k);  // NaN passes
  const uint32_t half = (uint32_t)((int32_t)k >> 1);
  return (1.0f + q) * mc_bits_float((half + 127u) << 23) * mc_bits_float((k - half + 127u) << 23);
}
// tanh x = sign(x) e / (e + 2), e = e^(2|x|) - 1 (no cancellation near 0); |x| >= 9 gives 1.
static inline float tanh(const float x) {
  const float a = fabsf(x) > 9.0f ? 9.0f : fabsf(x);  // NaN passes
  uint32_t k;
  const float q = mc_expm1_reduced(2.0f * a, k);
  const float two_k = mc_bits_float((k + 127u) << 23);
  const float e = fmaf(two_k, q, two_k - 1.0f);
  return copysignf(e / (e + 2.0f), x);
}
#define KERNEL extern "C"
#define DEVICE static inline
#ifdef MC_RACECHECK
#include <thread>
#include <vector>
struct mc_dim3 {
  unsigned x, y, z;
};
static thread_local mc_dim3 blockIdx, threadIdx, blockDim, gridDim;

// Runs `kernel` as a grid of (grid_x, grid_y) blocks of block_x threads, one OS thread per GPU thread,
// all started before any is joined: nothing orders one GPU thread's accesses before another's.
template <typename... Params, typename... Args>
static void mc_launch(void (*kernel)(Params...), const int grid_x, const int grid_y, const int block_x,
                      Args... args) {
  std::vector<std::thread> threads;
  for (int by = 0; by < grid_y; ++by)
    for (int bx = 0; bx < grid_x; ++bx)
      for (int tx = 0; tx < block_x; ++tx)
        threads.emplace_back([=] {
          gridDim = {unsigned(grid_x), unsigned(grid_y), 1u};
          blockDim = {unsigned(block_x), 1u, 1u};
          blockIdx = {unsigned(bx), unsigned(by), 0u};
          threadIdx = {unsigned(tx), 0u, 0u};
          kernel(args...);
        });
  for (std::thread& thread : threads) thread.join();
}
#define MC_GPU_LOOPS
#else
// Threads for the plane loops of this launch: 1 unless the launcher says otherwise. minicaffe.kernel
// calls each kernel NAME through a wrapper mc_cpu_NAME(threads, args...) that sets it for the call; it
// passes 1 for a launch too small to repay waking the other threads (see kernel.PARALLEL_MIN_WORK), so
// the macro needs no argument beyond the planes. thread_local: two Python threads may launch at once.
static thread_local int mc_threads = 1;
// Planes are split over the threads in contiguous blocks (static schedule). This is race-free and
// deterministic for every kernel because of the contract that tests/test_race.py checks on the GPU:
// no two iterations (plane, j) of one launch write the same element (or one writes what another
// reads). Each plane, all its inner loops included, runs on one thread exactly as in the serial
// loop, so results are the same bits for every thread count. (A plane loop body must not `break`
// or `return`: OpenMP forbids leaving the loop early.)
#define PLANE_LOOP(p, n)                                                                    \
  _Pragma("omp parallel for schedule(static) num_threads(mc_threads) if(mc_threads > 1)") \
  for (int p = 0; p < (n); ++p)
#define INNER_LOOP(j, n) _Pragma("omp simd") for (int j = 0; j < (n); ++j)
// An inner loop of a few iterations (a row of Winograd tiles, 8 for a 32-wide image): 8 SIMD lanes, so
// that 8 to 15 iterations are whole vector steps rather than the epilogue of a 16-lane loop. Measured per
// kernel, one thread: Winograd's input transform took 2-26% less at 8, 14, 7 and 28 tiles a row; its
// output transforms, 5-20% more at some of them, so they keep INNER_LOOP. On the GPU, INNER_LOOP.
#define INNER_LOOP_8(j, n) _Pragma("omp simd simdlen(8)") for (int j = 0; j < (n); ++j)
// part(0), ..., part(parts - 1) at the same time, each on one thread of the team the plane loops use
// (the caller's runs part 0): minicaffe.kernel.run_parts hands its parts (a GEMM cut into row or column
// ranges, a batch of images) to these threads rather than to a second pool. Fewer `workers` than parts
// (threads.working_threads(), while other processes keep cores busy) take the parts in turn: the same
// parts, so the same results. Threads of one pool are awake (spinning, GOMP_SPINCOUNT) for the kernel
// launches that follow a GEMM; a second pool's would sleep while this one's fell asleep, and each
// hand-off woke one (2-7% of a zoo net's step). Every CPU library has it; minicaffe.kernel calls one.
// Without OpenMP the parts run one after the other.
extern "C" void mc_run_parts(const int parts, const int workers, void (*part)(int)) {
  _Pragma("omp parallel for schedule(static, 1) num_threads(workers)")
  for (int p = 0; p < parts; ++p) part(p);
}
// One product c = alpha op(a) op(b) + beta c, cut into `parts` ranges of c's rows (by_rows) or columns,
// one BLAS call per range on `workers` of the same threads, all in C: no Python and no GIL between the
// parts, which through mc_run_parts cost ~0.1 ms per product (minicaffe.blas.Cblas.gemm). Or a stack of
// `count` > 1 such products (a_i = a + i stride_a, likewise b_i and c_i: a Winograd convolution's 36), cut
// into ranges of whole products. `gemm` is numpy's OpenBLAS cblas_sgemm or cblas_dgemm (this build's real),
// row-major, with 32- or 64-bit indices (index_bits). Each element of c is computed by one call, as in
// the whole product.
#define MC_CBLAS_NO_TRANS 111
template <class Index>
static void mc_gemm_call(void* gemm, const int ta, const int tb, const long long m, const long long n,
                         const long long k, const real alpha, const real* a, const long long lda,
                         const real* b, const long long ldb, const real beta, real* c, const long long ldc) {
  typedef void (*Gemm)(int, int, int, Index, Index, Index, real, const real*, Index, const real*, Index,
                       real, real*, Index);
  ((Gemm)gemm)(101, ta, tb, Index(m), Index(n), Index(k), alpha, a, Index(lda), b, Index(ldb), beta, c,
               Index(ldc));  // 101: CblasRowMajor
}
static void mc_gemm_call(void* gemm, const int index_bits, const int ta, const int tb, const long long m,
                         const long long n, const long long k, const real alpha, const real* a,
                         const long long lda, const real* b, const long long ldb, const real beta, real* c,
                         const long long ldc) {
  if (index_bits == 64) {
    mc_gemm_call<long long>(gemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    mc_gemm_call<int>(gemm, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}
extern "C" void mc_gemm_parts(const int parts, const int workers, void* gemm, const int index_bits,
                              const int by_rows, const int count, const long long stride_a,
                              const long long stride_b, const long long stride_c, const int ta,
                              const int tb, const long long m, const long long n, const long long k,
                              const real alpha, const real* a, const long long lda, const real* b,
                              const long long ldb, const real beta, real* c, const long long ldc) {
  _Pragma("omp parallel for schedule(static, 1) num_threads(workers)")
  for (int p = 0; p < parts; ++p) {
    if (count > 1) {  // products count * p / parts .. count * (p + 1) / parts, each whole
      for (long long i = (long long)count * p / parts; i < (long long)count * (p + 1) / parts; ++i) {
        mc_gemm_call(gemm, index_bits, ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb,
                     beta, c + i * stride_c, ldc);
      }
    } else {
      const long long length = by_rows ? m : n;
      const long long lo = length * p / parts, hi = length * (p + 1) / parts;
      // rows lo.. of op(a) and c, or columns lo.. of op(b) and c (row-major: a transposed a's rows are
      // its columns)
      const real* ap = by_rows ? a + lo * (ta == MC_CBLAS_NO_TRANS ? lda : 1) : a;
      const real* bp = by_rows ? b : b + lo * (tb == MC_CBLAS_NO_TRANS ? 1 : ldb);
      real* cp = by_rows ? c + lo * ldc : c + lo;
      const long long rows = by_rows ? hi - lo : m, cols = by_rows ? n : hi - lo;
      mc_gemm_call(gemm, index_bits, ta, tb, rows, cols, k, alpha, ap, lda, bp, ldb, beta, cp, ldc);
    }
  }
}
// An element-wise kernel is one loop over independent elements. On the CPU the elements go in blocks
// of MC_ELEMENT_BLOCK, each block a vectorized loop, and the blocks are split over the threads like
// planes. The blocks do not depend on the thread count, so neither does any result: an element meets
// the same code (a vector lane, or the scalar tail of its block) on any number of threads. (Vector and
// scalar exp/log from libmvec and libm may differ in the last bit.) minicaffe.kernel gives threads to a
// launch of a kernel whose body uses ELEMENT_LOOP, although it is launched as one plane.
#define MC_ELEMENT_BLOCK 4096
DEVICE int mc_element_block_end(const int n, const int block) {
  return n - block * MC_ELEMENT_BLOCK < MC_ELEMENT_BLOCK ? n : (block + 1) * MC_ELEMENT_BLOCK;
}
#define ELEMENT_LOOP(i, n)                                                            \
  PLANE_LOOP(mc_block, (n) / MC_ELEMENT_BLOCK + ((n) % MC_ELEMENT_BLOCK != 0))        \
  _Pragma("omp simd") for (int i = mc_block * MC_ELEMENT_BLOCK;                       \
                           i < mc_element_block_end((n), mc_block); ++i)
#endif
#endif

#ifdef MC_GPU_LOOPS
// Grid-stride loops. The step is taken in 64 bits and clamped to n: j + stride can pass 2^31 - 1
// when n is near it, and an int would wrap to a negative index that is still < n.
DEVICE int mc_next_index(const int j, const long long stride, const long long n) {
  const long long next = j + stride;
  return next < n ? int(next) : int(n);
}
#define PLANE_LOOP(p, n) \
  for (int p = blockIdx.y; p < (n); p = mc_next_index(p, gridDim.y, (n)))
#define INNER_LOOP(j, n)                                                      \
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < (n);                 \
       j = mc_next_index(j, (long long)blockDim.x * gridDim.x, (n)))
#define INNER_LOOP_8(j, n) INNER_LOOP(j, n)
// Element-wise: one plane (launched with extents (1, n)).
#define ELEMENT_LOOP(i, n) PLANE_LOOP(mc_plane, 1) INNER_LOOP(i, n)
#endif

// EACHn(M): M(0) M(1) ... M(n - 1), the macro M expanded for each constant. A loop of a fixed small count
// (one axis of a 6-point transform) written out this way can name its values by token pasting (x##i),
// so they are scalars: an inner loop whose body holds a local array (or takes a local's address) does
// not vectorize on the CPU -- GCC gives each SIMD lane its own copy of the array in memory.
#define EACH3(M) M(0) M(1) M(2)
#define EACH4(M) EACH3(M) M(3)
#define EACH6(M) EACH4(M) M(4) M(5)

// max/min as plain selects: std::fmax/fmin block GCC's vectorizer (they handle NaN specially).
DEVICE real rmax(real a, real b) { return a > b ? a : b; }
DEVICE real rmin(real a, real b) { return a < b ? a : b; }
