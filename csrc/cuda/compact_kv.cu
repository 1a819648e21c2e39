// CUDA kernel of hass::compact_kv: one block per cache row (lead, b, h). The block stages a column tile of
// all n source entries in shared memory before writing, because sources and destinations overlap.
#include <cuda_runtime.h>

#include "hass/compact_kv.h"

namespace {

constexpr int kThreads = 256;
constexpr int kSmemBytes = 32 * 1024;

template <typename T>
__global__ void compact_kv_kernel(T* cache, hass::CacheGeom g, const int64_t* __restrict__ src,
                                  const int64_t* __restrict__ dst, int64_t m, int* status) {
  extern __shared__ unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  int64_t l, b, h;
  hass::split_row(g, blockIdx.x, &l, &b, &h);
  const int64_t* s = src + b * m;
  if (hass::compact_check_row(s, m, dst[b], g.S) != hass::kOk) {  // never write out of bounds
    if (threadIdx.x == 0) atomicExch(status, hass::kBadIndex);
    return;
  }
  const int64_t n = hass::compact_count(s, m);
  if (n == 0) return;
  int64_t cols = kSmemBytes / static_cast<int64_t>(sizeof(T)) / n;
  cols = cols < 1 ? 1 : (cols > g.D ? g.D : cols);
  for (int64_t c0 = 0; c0 < g.D; c0 += cols) {
    const int64_t w = (g.D - c0) < cols ? (g.D - c0) : cols;
    for (int64_t e = threadIdx.x; e < n * w; e += blockDim.x)
      tile[e] = cache[hass::cache_offset(g, l, b, h, s[e / w]) + c0 + e % w];
    __syncthreads();
    for (int64_t e = threadIdx.x; e < n * w; e += blockDim.x)
      cache[hass::cache_offset(g, l, b, h, dst[b] + e / w) + c0 + e % w] = tile[e];
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch(void* cache, const hass::CacheGeom& g, const int64_t* src, const int64_t* dst, int64_t m,
                   int* status, cudaStream_t stream) {
  const int64_t rows = g.lead * g.B * g.H;
  if (rows == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(kSmemBytes);
  compact_kv_kernel<T><<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(static_cast<T*>(cache), g, src,
                                                                               dst, m, status);
  return cudaGetLastError();
}

}  // namespace

// C interface used by csrc/cuda_ops.cpp. elem_bytes selects the copy type (the copy is dtype-agnostic).
extern "C" cudaError_t hass_compact_kv_cuda(void* cache, int elem_bytes, hass::CacheGeom g, const int64_t* src,
                                            const int64_t* dst, int64_t m, int* status, cudaStream_t stream) {
  if (m * elem_bytes > kSmemBytes) return cudaErrorInvalidValue;  // one column of n entries must fit
  switch (elem_bytes) {
    case 1: return launch<uint8_t>(cache, g, src, dst, m, status, stream);
    case 2: return launch<uint16_t>(cache, g, src, dst, m, status, stream);
    case 4: return launch<uint32_t>(cache, g, src, dst, m, status, stream);
    case 8: return launch<uint64_t>(cache, g, src, dst, m, status, stream);
    default: return cudaErrorInvalidValue;
  }
}
