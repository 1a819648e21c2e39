// CUDA kernel of hass::small_linear: y[m, n] = S(m, n) + bias[n] for decode-sized M (a one-token step: M = 1; a
// tree verification: M = tree size), S(m, n) the fp32 sum over k of x[m, k] * w[n, k].
//
// Row invariance: every output is the same sum in the same order whatever M is and wherever the row lands. K is
// cut into chunks of 8 (chunk c: k = 8c .. 8c + 7); chunk c belongs to lane c % 32 of the warp computing the
// output, which adds its chunks in increasing c, each chunk's 8 products in increasing k, into one fp32
// accumulator (fused multiply-add); the 32 lane sums are then reduced by a fixed xor-butterfly (16, 8, 4, 2, 1),
// which leaves the same bits in every lane. Nothing in that order depends on M, on m, on N, on which CTA/warp or
// M-tile computed the output, nor on whether the chunks were read with 16-byte or with scalar loads: the tile
// sizes below only decide how many accumulators a warp keeps at once. No atomics, no split-K across warps.
//
// Streaming: a warp owns a few weight rows and one tile of MT input rows; each lane reads its weight chunks with
// 16-byte loads that bypass L1 (the weight is read once), the next steps' chunks in flight while the current
// ones are multiplied (Tile<MT> below). The x rows are small and shared by every CTA: plain 16-byte loads
// through L1. The CTAs of one weight slab and its M-tiles are adjacent in the grid, so for M > MT the slab is
// read from HBM about once and served to the other tiles by L2.
//
// Arithmetic: one fp32 FMA per weight element and input row, so past about a dozen rows the FMA units, not
// HBM, set the time (bench/bench_small_linear.py --device cuda measures where).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace {

using hass::cuda::Io;
using hass::cuda::load_streaming;

constexpr int kWarps = 4;  // per CTA
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 8;  // k per chunk: 16 bytes of a 16-bit dtype, 32 of fp32

// A warp's tile: MT input rows x kRows weight rows, with kDepth steps (32 chunks each) of its weight in flight.
// A small M has few accumulators and little arithmetic per byte, so it keeps more weight loads in flight; a
// larger M shares each x chunk (loaded and widened once) among more weight rows.
template <int MT>
struct Tile {
  static constexpr int kRows = MT <= 2 ? 2 : 4;
  static constexpr int kDepth = MT <= 2 ? 4 : 2;
  static constexpr int kRowsPerCta = kWarps * kRows;
};

// 8 consecutive elements of T as raw 16-byte words (one for a 16-bit dtype, two for fp32).
template <typename T>
struct Chunk {
  static constexpr int kWords = static_cast<int>(sizeof(T)) / 2;
  uint4 u[kWords];
};

template <typename T>
__device__ __forceinline__ Chunk<T> load_weight_chunk(const T* p) {
  Chunk<T> c;
#pragma unroll
  for (int q = 0; q < Chunk<T>::kWords; ++q) c.u[q] = load_streaming(reinterpret_cast<const uint4*>(p) + q);
  return c;
}

template <typename T>
__device__ __forceinline__ Chunk<T> load_x_chunk(const T* p) {
  Chunk<T> c;
#pragma unroll
  for (int q = 0; q < Chunk<T>::kWords; ++q) c.u[q] = __ldg(reinterpret_cast<const uint4*>(p) + q);
  return c;
}

__device__ __forceinline__ uint32_t word(const uint4& u, int i) {  // i is a compile-time constant after unrolling
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// Element j (0..7, compile-time) of a chunk, widened to fp32 (exact for all three dtypes).
template <typename T>
__device__ __forceinline__ float element(const Chunk<T>& c, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(word(c.u[j / 4], j % 4));
  } else {
    const uint32_t pair = word(c.u[0], j / 2);
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      return __uint_as_float(j % 2 == 0 ? pair << 16 : pair & 0xffff0000u);  // bf16 is fp32's high half
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(j % 2 == 0 ? pair : pair >> 16)));
    }
  }
}

template <typename T>
__device__ __forceinline__ float scalar(const T* p) {
  return Io<T>::to(*p);
}

// One CTA: weight rows [slab * kRowsPerCta, +kRowsPerCta) (kRows per warp) against input rows [tile * MT, +MT).
// A partial last tile (or slab) repeats the last valid row in the unused slots: the extra sums are computed and
// dropped, and every slot has its own accumulator, so they cannot change a kept one.
// kVec: rows of x and w start 16-byte aligned, so whole chunks are read with 16-byte loads (the partial last chunk,
// K % 8 elements, with scalar loads); otherwise every chunk is read with scalar loads, in the same order.
template <typename TX, typename TW, int MT, bool kVec>
__global__ void __launch_bounds__(kThreads) small_linear_kernel(const TX* __restrict__ x, int64_t ldx,
                                                               const TW* __restrict__ w, int64_t ldw,
                                                               const float* __restrict__ bias, TX* __restrict__ y,
                                                               int64_t M, int64_t N, int64_t K, int64_t tiles) {
  constexpr int kRows = Tile<MT>::kRows;
  constexpr int kDepth = Tile<MT>::kDepth;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t slab = blockIdx.x / tiles;
  const int64_t n0 = (slab * kWarps + warp) * kRows;
  if (n0 >= N) return;  // the whole warp: nothing below synchronizes across warps
  const int64_t m0 = tile * MT;

  // x rows as 32-bit offsets from the tile's first row (the launcher checks MT * ldx fits): one multiply-add per row
  // and step for the address, instead of a 64-bit pointer per row that the compiler would recompute each step.
  const TX* xt = x + m0 * ldx;
  int xoff[MT];
  const TW* wr[kRows];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    xoff[i] = static_cast<int>((m0 + i < M ? i : M - 1 - m0) * ldx);
    asm("" : "+r"(xoff[i]));  // opaque: kept in a register, not recomputed from the clamp every step
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) wr[r] = w + (n0 + r < N ? n0 + r : N - 1) * ldw;

  float acc[MT][kRows];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[i][r] = 0.0f;

  int64_t c = lane;  // this lane's chunks: c, c + 32, c + 64, ... (one per step)
  if constexpr (kVec) {
    const int64_t whole = K / kChunk;
    // A ring of kDepth steps: step s of each group of kDepth uses slot s, which is refilled with the chunk
    // kDepth steps later as soon as it has been multiplied.
    Chunk<TW> ring[kDepth][kRows];
#pragma unroll
    for (int s = 0; s < kDepth; ++s) {
      if (c + 32 * s < whole) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) ring[s][r] = load_weight_chunk(wr[r] + (c + 32 * s) * kChunk);
      }
    }
#pragma unroll 1
    for (; c < whole; c += 32 * kDepth) {
#pragma unroll
      for (int s = 0; s < kDepth; ++s) {
        const int64_t cs = c + 32 * s;
        if (cs < whole) {
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const Chunk<TX> xc = load_x_chunk(xt + cs * kChunk + xoff[i]);
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              const float xv = element(xc, j);
#pragma unroll
              for (int r = 0; r < kRows; ++r) acc[i][r] = fmaf(xv, element(ring[s][r], j), acc[i][r]);
            }
          }
          const int64_t ahead = cs + 32 * kDepth;
          if (ahead < whole) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) ring[s][r] = load_weight_chunk(wr[r] + ahead * kChunk);
          }
        }
      }
    }
    c = whole + ((lane - whole) % 32 + 32) % 32;  // this lane's first chunk at or past `whole`
  }
  // Scalar loads: every chunk when !kVec; the partial last chunk otherwise (chunk K / 8 when K % 8 != 0).
#pragma unroll 1
  for (; c * kChunk < K; c += 32) {
    const int64_t k0 = c * kChunk;
    const int n = K - k0 < kChunk ? static_cast<int>(K - k0) : kChunk;
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      float wv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[r] = scalar(wr[r] + k0 + j);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const float xv = scalar(xt + k0 + j + xoff[i]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[i][r] = fmaf(xv, wv[r], acc[i][r]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float s = hass::cuda::warp_sum(acc[i][r]);  // xor-butterfly: the same bits in every lane
      const int64_t m = m0 + i, n = n0 + r;
      if (lane == i * kRows + r && m < M && n < N) y[m * N + n] = Io<TX>::from(bias ? s + bias[n] : s);
    }
  }
}

bool aligned16(const void* p, int64_t row_stride_bytes, int64_t rows) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (rows <= 1 || row_stride_bytes % 16 == 0);
}

template <typename TX, typename TW, int MT>
cudaError_t launch(const void* x, int64_t ldx, const void* w, int64_t ldw, const float* bias, void* y, int64_t M,
                   int64_t N, int64_t K, cudaStream_t stream) {
  static_assert(MT * Tile<MT>::kRows <= 32, "one lane writes each output of a warp");
  if (ldx > INT_MAX / MT) return cudaErrorInvalidValue;  // the kernel's 32-bit row offsets within a tile
  const int64_t tiles = (M + MT - 1) / MT;
  const int64_t blocks = (N + Tile<MT>::kRowsPerCta - 1) / Tile<MT>::kRowsPerCta * tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const bool vec = aligned16(x, ldx * static_cast<int64_t>(sizeof(TX)), M) &&
                   aligned16(w, ldw * static_cast<int64_t>(sizeof(TW)), N);
  const auto* xp = static_cast<const TX*>(x);
  const auto* wp = static_cast<const TW*>(w);
  auto* yp = static_cast<TX*>(y);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (vec) {
    small_linear_kernel<TX, TW, MT, true><<<grid, kThreads, 0, stream>>>(xp, ldx, wp, ldw, bias, yp, M, N, K, tiles);
  } else {
    small_linear_kernel<TX, TW, MT, false><<<grid, kThreads, 0, stream>>>(xp, ldx, wp, ldw, bias, yp, M, N, K, tiles);
  }
  return cudaGetLastError();
}

// The M-tile: as many rows as a warp can keep accumulators for (8 x 4), fewer for a small M so that no
// launch multiplies many repeated rows. It changes which outputs a warp computes together, never their order.
template <typename TX, typename TW>
cudaError_t launch_tiles(const void* x, int64_t ldx, const void* w, int64_t ldw, const float* bias, void* y,
                         int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M <= 1) return launch<TX, TW, 1>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  if (M <= 2) return launch<TX, TW, 2>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  if (M <= 4) return launch<TX, TW, 4>(x, ldx, w, ldw, bias, y, M, N, K, stream);
  return launch<TX, TW, 8>(x, ldx, w, ldw, bias, y, M, N, K, stream);
}

template <typename TX>
cudaError_t dispatch_w(int w_dtype, const void* x, int64_t ldx, const void* w, int64_t ldw, const float* bias,
                       void* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  switch (w_dtype) {
    case 0: return launch_tiles<TX, float>(x, ldx, w, ldw, bias, y, M, N, K, stream);
    case 1: return launch_tiles<TX, __nv_bfloat16>(x, ldx, w, ldw, bias, y, M, N, K, stream);
    case 2: return launch_tiles<TX, __half>(x, ldx, w, ldw, bias, y, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// C interface used by small_linear_ops.cpp. Dtypes: 0 float32, 1 bfloat16, 2 float16. x [M, K] (row stride ldx,
// elements), w [N, K] (row stride ldw), bias [N] fp32 or null, y [M, N] contiguous in x's dtype. M, N, K >= 1.
extern "C" cudaError_t hass_small_linear_cuda(const void* x, int x_dtype, int64_t ldx, const void* w, int w_dtype,
                                              int64_t ldw, const float* bias, void* y, int64_t M, int64_t N,
                                              int64_t K, cudaStream_t stream) {
  if (M < 1 || N < 1 || K < 1) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case 0: return dispatch_w<float>(w_dtype, x, ldx, w, ldw, bias, y, M, N, K, stream);
    case 1: return dispatch_w<__nv_bfloat16>(w_dtype, x, ldx, w, ldw, bias, y, M, N, K, stream);
    case 2: return dispatch_w<__half>(w_dtype, x, ldx, w, ldw, bias, y, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}
