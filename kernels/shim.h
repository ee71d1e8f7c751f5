// shim.h -- lets one kernel source build both as CUDA (NVRTC / nvcc) and as plain C++ for the CPU.
//
// Kernels are written as a loop over "planes" (outer, e.g. n*c) around a loop over a contiguous
// inner index (e.g. h*w). On the GPU the planes map to grid.y and the inner index to grid.x *
// threads, each with a grid-stride loop. On the CPU the same macros become two plain for-loops whose
// inner loop is marked `omp simd`, so the compiler vectorizes it without per-element integer division.
// (Built with -fno-trapping-math so that branches become vector selects; results are unchanged.)
//
// The element type is `real`: the loader compiles each source twice, with MC_REAL=float and =double.
#pragma once

#ifndef MC_REAL
#define MC_REAL float
#endif

typedef MC_REAL real;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define KERNEL extern "C" __global__
#define DEVICE __device__ __forceinline__
#define PLANE_LOOP(p, n) for (int p = blockIdx.y; p < (n); p += gridDim.y)
#define INNER_LOOP(j, n) \
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < (n); j += blockDim.x * gridDim.x)
#else
#include <cmath>
#include <cstddef>
// glibc's vector math library (libmvec, accurate to a few ulp) has SIMD versions of exp/log/pow
// (and tanh from glibc 2.35); declaring them `omp declare simd` lets loops that call them vectorize.
// The loader links -lmvec where it exists and otherwise builds with MC_NO_MVEC.
#if defined(__GLIBC__) && defined(__x86_64__) && !defined(MC_NO_MVEC)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
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
float tanhf(float);
#pragma omp declare simd notinbranch
double tanh(double);
#endif
}
#endif
using std::exp;
using std::fabs;
using std::fmax;
using std::fmin;
using std::log;
using std::pow;
using std::sqrt;
using std::tanh;
#define KERNEL extern "C"
#define DEVICE static inline
#define PLANE_LOOP(p, n) for (int p = 0; p < (n); ++p)
#define INNER_LOOP(j, n) _Pragma("omp simd") for (int j = 0; j < (n); ++j)
#endif

// max/min as plain selects: std::fmax/fmin block GCC's vectorizer (they handle NaN specially).
DEVICE real rmax(real a, real b) { return a > b ? a : b; }
DEVICE real rmin(real a, real b) { return a < b ? a : b; }
