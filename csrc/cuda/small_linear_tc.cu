// CUDA kernel of hass::small_linear_tc: y[m, n] = S(m, n) + bias[n] for decode-sized M with bf16/fp16 x and weight
// of one dtype, S(m, n) the sum over k of x[m, k] * w[n, k] on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// Row invariance. A row's outputs are the same bits whatever M is and wherever the row lands, because the sequence
// of tensor-core instructions that produces them depends on N and K only:
// - K is cut into kSplit segments of `seg` elements (seg a multiple of 64; kSplit and seg are functions of N and
//   K, chosen by the launcher); within a segment, blocks of 64 k go in increasing order, and each block is four
//   mma steps in a fixed order, each adding 16 products into the same fp32 accumulator;
// - the segments' partial sums are added in segment order, ((p0 + p1) + p2) + ..., then the bias;
// - an mma computes every row of its 16-row tile alike and independently of the other rows, so which tile, which
//   slot of the tile and which group of tiles holds a row does not matter; unused slots repeat the last row and
//   are dropped.
// Within a 64-k block lane (g, q) (g = lane / 4, q = lane % 4) reads the 16 consecutive elements k0 + 16q .. +15
// of its rows with two 16-byte loads, and mma step s takes elements 4s .. 4s + 3 of them. That assigns each k of
// the block to one (step, fragment slot) pair, the same one for x and for the weight, so the block's 64 products
// are all summed, in an order fixed by the layout alone (the fragment layout of m16n8k16: a lane's first register
// pair holds k = 2q, 2q + 1 of the step, its second k = 2q + 8, 2q + 9).
//
// Streaming. A warp owns 16 weight rows (two n8 tiles) and one K segment; a CTA is the kSplit warps of one
// 16-row slab, which reduce through shared memory. Weight bytes are read once, with loads that bypass L1, one
// block ahead of the multiplications; x rows (shared by every CTA) go through L1. M up to 64 is one group of
// four 16-row tiles per warp; more rows take more groups (grid y).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common.cuh"

namespace {

using hass::cuda::Io;
using hass::cuda::load_streaming;
using hass::cuda::mma_16816;

constexpr int kBlockK = 64;    // k per block: four mma steps of 16
constexpr int kMaxSplit = 8;   // warps (K segments) per CTA
constexpr int kTargetWarps = 2048;  // enough warps in flight to stream the weight at HBM speed on an H100/H200

struct Rows16 {  // 16 consecutive elements of one row as two 16-byte words (zeros past K)
  uint4 lo, hi;
};

__device__ __forceinline__ uint32_t word(const Rows16& r, int i) {  // i: 0..7, a compile-time constant when unrolled
  const uint4& u = i < 4 ? r.lo : r.hi;
  const int j = i & 3;
  return j == 0 ? u.x : j == 1 ? u.y : j == 2 ? u.z : u.w;
}

template <bool kStream>
__device__ __forceinline__ Rows16 load_rows16(const void* row, int64_t k, int64_t K) {
  // K % 8 == 0 (checked by the binding), so each 16-byte half is either wholly inside the row or wholly past K.
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const auto* p = static_cast<const uint8_t*>(row) + 2 * k;
  Rows16 r;
  if (kStream) {
    r.lo = k < K ? load_streaming(p) : zero;
    r.hi = k + 8 < K ? load_streaming(p + 16) : zero;
  } else {
    r.lo = k < K ? __ldg(reinterpret_cast<const uint4*>(p)) : zero;
    r.hi = k + 8 < K ? __ldg(reinterpret_cast<const uint4*>(p + 16)) : zero;
  }
  return r;
}

// One CTA: weight rows [16 * blockIdx.x, +16) (two n8 tiles), input rows [64 * blockIdx.y, +16 * MT) (MT m16 tiles),
// warp w summing K segment w. Dynamic shared memory: (kSplit - 1) * 32 lanes * MT * 8 floats (the other warps'
// partial sums, reduced by warp 0).
template <typename T, int MT>
__global__ void __launch_bounds__(kMaxSplit * 32) small_linear_tc_kernel(
    const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw, const float* __restrict__ bias,
    T* __restrict__ y, int64_t M, int64_t N, int64_t K, int64_t seg) {
  extern __shared__ float partial[];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int split = static_cast<int>(threadIdx.x) >> 5;
  const int kSplit = static_cast<int>(blockDim.x) >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 64;

  const T* wrow[2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int64_t n = n0 + nt * 8 + g;
    wrow[nt] = w + (n < N ? n : N - 1) * ldw;
  }
  const T* xrow[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + mt * 16 + h * 8 + g;
      xrow[mt][h] = x + (m < M ? m : M - 1) * ldx;
    }
  }

  float acc[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  const int64_t k_begin = split * seg;
  const int64_t k_end = k_begin + seg < K ? k_begin + seg : K;
  Rows16 wnext[2] = {};
  if (k_begin < k_end) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) wnext[nt] = load_rows16<true>(wrow[nt], k_begin + 16 * q, K);
  }
#pragma unroll 1
  for (int64_t kb = k_begin; kb < k_end; kb += kBlockK) {
    const int64_t k = kb + 16 * q;
    Rows16 wcur[2] = {wnext[0], wnext[1]};
    if (kb + kBlockK < k_end) {  // the next block's weight in flight while this one is multiplied
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) wnext[nt] = load_rows16<true>(wrow[nt], k + kBlockK, K);
    }
    Rows16 xv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) xv[mt][h] = load_rows16<false>(xrow[mt][h], k, K);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t a[4] = {word(xv[mt][0], 2 * s), word(xv[mt][1], 2 * s), word(xv[mt][0], 2 * s + 1),
                               word(xv[mt][1], 2 * s + 1)};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) mma_16816<T>(acc[mt][nt], a, word(wcur[nt], 2 * s), word(wcur[nt], 2 * s + 1));
      }
    }
  }

  // The segments' sums in segment order: warps 1.. park theirs in shared memory, warp 0 adds them to its own.
  constexpr int kPer = MT * 8;  // accumulators per lane
  if (split > 0) {
    float* dst = partial + ((split - 1) * 32 + lane) * kPer;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[(mt * 2 + nt) * 4 + i] = acc[mt][nt][i];
  }
  if (kSplit > 1) __syncthreads();
  if (split > 0) return;
  for (int sp = 1; sp < kSplit; ++sp) {
    const float* src = partial + ((sp - 1) * 32 + lane) * kPer;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] += src[(mt * 2 + nt) * 4 + i];
  }
  // Accumulator (mt, nt, i): row m0 + 16 mt + g (+ 8 for i >= 2), column n0 + 8 nt + 2q + (i & 1).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + mt * 16 + g + (i >= 2 ? 8 : 0);
        const int64_t n = n0 + nt * 8 + 2 * q + (i & 1);
        if (m < M && n < N) {
          const float v = acc[mt][nt][i];
          y[m * N + n] = Io<T>::from(bias ? v + bias[n] : v);
        }
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The K split: up to kMaxSplit segments (a power of two) so that about kTargetWarps warps stream the weight, each
// segment a whole number of 64-k blocks. A function of N and K only: every call with this weight sums alike.
void plan_split(int64_t N, int64_t K, int* split, int64_t* seg) {
  const int64_t slabs = ceil_div(N, 16), blocks = ceil_div(K, kBlockK);
  int s = 1;
  while (s < kMaxSplit && slabs * s < kTargetWarps && 2 * s <= blocks) s *= 2;
  *seg = ceil_div(blocks, s) * kBlockK;
  *split = static_cast<int>(ceil_div(K, *seg));  // the last segments may be empty after rounding: drop them
}

template <typename T, int MT>
cudaError_t launch(const void* x, int64_t ldx, const void* w, int64_t ldw, const float* bias, void* y, int64_t M,
                   int64_t N, int64_t K, cudaStream_t stream) {
  int split;
  int64_t seg;
  plan_split(N, K, &split, &seg);
  const int64_t slabs = ceil_div(N, 16), groups = ceil_div(M, 64);
  if (slabs > INT_MAX || groups > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(split - 1) * 32 * MT * 8 * sizeof(float);
  const dim3 grid(static_cast<unsigned>(slabs), static_cast<unsigned>(groups));
  small_linear_tc_kernel<T, MT><<<grid, split * 32, smem, stream>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw, bias, static_cast<T*>(y), M, N, K, seg);
  return cudaGetLastError();
}

// MT m16 tiles per warp: as few as M needs up to 64 rows (fewer multiplications of repeated rows); more rows take
// more groups of four. Which tile count runs never changes a row's sums (file comment).
template <typename T>
cudaError_t launch_tiles(const void* x, int64_t ldx, const void* w, int64_t ldw, const float* bias, void* y,
                         int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M <= 16) return launch<T, 1>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  if (M <= 32) return launch<T, 2>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  if (M <= 48) return launch<T, 3>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  return launch<T, 4>(x, ldx, w, ldw, bias, y, M, N, K, stream);
}

}  // namespace

// C interface used by small_linear_ops.cpp. dtype: 1 bfloat16, 2 float16 (x, weight and y alike). x [M, K] (row
// stride ldx), w [N, K] (row stride ldw): rows 16-byte aligned, K % 8 == 0; bias [N] fp32 or null; y [M, N]
// contiguous. M, N, K >= 1.
extern "C" cudaError_t hass_small_linear_tc_cuda(const void* x, int dtype, int64_t ldx, const void* w, int64_t ldw,
                                                 const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                                                 cudaStream_t stream) {
  if (M < 1 || N < 1 || K < 1 || K % 8 != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case 1: return launch_tiles<__nv_bfloat16>(x, ldx, w, ldw, bias, y, M, N, K, stream);
    case 2: return launch_tiles<__half>(x, ldx, w, ldw, bias, y, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}
