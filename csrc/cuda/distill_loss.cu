// CUDA kernels of hass::distill_loss, hass::distill_loss_backward and hass::online_softmax_chunk (semantics
// in csrc/include/hass/distill_loss.h). One CTA per row streams the vocabulary with 16-byte loads (8 columns per
// thread and step). Every thread keeps online softmax statistics; every warp keeps a sorted top-K list spread
// over its lanes (slot j in lane j % 32, register j / 32; K <= 64), fed with the columns that beat the list's
// current K-th entry (rare after the first steps). At the end the statistics are merged across the CTA and the
// warp lists are merged by rank (binary searches in the other sorted lists).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "hass/distill_loss.h"

namespace {

using hass::cuda::Io;
using hass::cuda::warp_max;
using hass::cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kSent = hass::kTopKSentinelIndex;

// Columns c0..c0+7 of a row as fp32; columns past n read as -inf.
template <typename T>
__device__ __forceinline__ void load_group(const T* row, int64_t c0, int64_t n, bool vec_ok, float* o) {
  if (vec_ok && c0 + kVec <= n) {
    Io<T>::load8(row + c0, o);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = c0 + j < n ? Io<T>::to(row[c0 + j]) : -INFINITY;
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* row, int64_t c0, int64_t n, bool vec_ok, const float* v) {
  if (vec_ok && c0 + kVec <= n) {
    Io<T>::store8(row + c0, v);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (c0 + j < n) row[c0 + j] = Io<T>::from(v[j]);
  }
}

__device__ __forceinline__ float max8(const float* v) {
  float m = v[0];
#pragma unroll
  for (int j = 1; j < kVec; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// ---- warp top-K --------------------------------------------------------------------------------------------

// A rank-sorted list of k <= 64 (value, index) pairs spread over a warp. All methods are warp-collective.
struct WarpTopK {
  float v[2];
  int i[2];
  float thr_v;  // the k-th entry: a column must rank before it to enter
  int thr_i;

  __device__ void init() {
    v[0] = v[1] = -INFINITY;
    i[0] = i[1] = kSent;
    thr_v = -INFINITY;
    thr_i = kSent;
  }

  __device__ void refresh_threshold(int k) {
    const int last = k - 1;
    thr_v = __shfl_sync(kFull, last >= 32 ? v[1] : v[0], last & 31);
    thr_i = __shfl_sync(kFull, last >= 32 ? i[1] : i[0], last & 31);
  }

  __device__ bool beats(float cv, int ci) const { return hass::topk_before(cv, ci, thr_v, thr_i); }

  // Inserts the warp-uniform candidate (cv, ci) at its rank, dropping the k-th entry.
  __device__ void insert(float cv, int ci, int k) {
    const int lane = threadIdx.x & 31;
    const bool b0 = lane < k && hass::topk_before(v[0], i[0], cv, ci);
    const bool b1 = lane + 32 < k && hass::topk_before(v[1], i[1], cv, ci);
    const int pos = __popc(__ballot_sync(kFull, b0)) + __popc(__ballot_sync(kFull, b1));
    if (pos >= k) return;
    const float u0 = __shfl_up_sync(kFull, v[0], 1);
    const int ui0 = __shfl_up_sync(kFull, i[0], 1);
    float u1 = __shfl_up_sync(kFull, v[1], 1);
    int ui1 = __shfl_up_sync(kFull, i[1], 1);
    const float w31 = __shfl_sync(kFull, v[0], 31);
    const int wi31 = __shfl_sync(kFull, i[0], 31);
    if (lane == 0) {  // slot 32 takes slot 31
      u1 = w31;
      ui1 = wi31;
    }
    if (lane > pos) { v[0] = u0; i[0] = ui0; } else if (lane == pos) { v[0] = cv; i[0] = ci; }
    if (lane + 32 > pos) { v[1] = u1; i[1] = ui1; } else if (lane + 32 == pos) { v[1] = cv; i[1] = ci; }
    refresh_threshold(k);
  }

  // Offers the 8 columns x[0..7] (indices c0.., or the sentinel past n) of every lane; bmax = max of x.
  __device__ void offer(const float* x, int64_t c0, int64_t n, float bmax, int k) {
    if (!__any_sync(kFull, beats(bmax, static_cast<int>(c0 < n ? c0 : kSent)))) return;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int cj = c0 + j < n ? static_cast<int>(c0 + j) : kSent;
      bool pending = true;
      while (true) {  // re-filter after each insert: the threshold rises
        const unsigned b = __ballot_sync(kFull, pending && beats(x[j], cj));
        if (!b) break;
        const int src = __ffs(b) - 1;
        if ((threadIdx.x & 31) == src) pending = false;
        insert(__shfl_sync(kFull, x[j], src), __shfl_sync(kFull, cj, src), k);
      }
    }
  }
};

struct TopKShared {
  float wv[kWarps * hass::kMaxTopK];
  int wi[kWarps * hass::kMaxTopK];
  float v[hass::kMaxTopK];
  int i[hass::kMaxTopK];
};

// Merges the warp lists of the CTA into sh.v/sh.i (rank order; sentinels where fewer than k entries exist).
// Block-collective; ends with __syncthreads.
__device__ void block_topk(const WarpTopK& top, int k, TopKShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane < k) { sh.wv[warp * k + lane] = top.v[0]; sh.wi[warp * k + lane] = top.i[0]; }
  if (lane + 32 < k) { sh.wv[warp * k + lane + 32] = top.v[1]; sh.wi[warp * k + lane + 32] = top.i[1]; }
  if (threadIdx.x < k) { sh.v[threadIdx.x] = -INFINITY; sh.i[threadIdx.x] = kSent; }
  __syncthreads();
  for (int e = threadIdx.x; e < kWarps * k; e += kThreads) {
    const float v = sh.wv[e];
    const int ix = sh.wi[e];
    if (ix == kSent) continue;
    const int w = e / k;
    int rank = e - w * k;  // its rank within its own list
    for (int w2 = 0; w2 < kWarps; ++w2)
      if (w2 != w) rank += hass::topk_count_before(sh.wv + w2 * k, sh.wi + w2 * k, k, v, ix);
    if (rank < k) { sh.v[rank] = v; sh.i[rank] = ix; }
  }
  __syncthreads();
}

// ---- CTA reductions ------------------------------------------------------------------------------------------

__device__ hass::DistillRowStats warp_merge(hass::DistillRowStats s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    hass::DistillRowStats o;
    o.mt = __shfl_xor_sync(kFull, s.mt, off);
    o.st = __shfl_xor_sync(kFull, s.st, off);
    o.mz = __shfl_xor_sync(kFull, s.mz, off);
    o.sz = __shfl_xor_sync(kFull, s.sz, off);
    o.a = __shfl_xor_sync(kFull, s.a, off);
    s = hass::distill_merge(s, o);
  }
  return s;
}

// Sum (or max) over the CTA, returned to every thread. Block-collective.
template <bool kMax>
__device__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(x) : warp_sum(x);
}

// ---- forward ---------------------------------------------------------------------------------------------------

template <typename TZ, typename TT>
__global__ void __launch_bounds__(kThreads) distill_fwd_kernel(const TZ* __restrict__ z, const TT* __restrict__ t,
                                                               const float* __restrict__ mask, int64_t V, int k,
                                                               bool vec_ok, float* __restrict__ stats,
                                                               int64_t* __restrict__ topk_idx,
                                                               float* __restrict__ rows) {
  __shared__ TopKShared sh;
  __shared__ hass::DistillRowStats wstats[kWarps];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float m = mask[row];
  if (m == 0.0f) {  // masked rows are never read
    if (threadIdx.x < 5) stats[row * 5 + threadIdx.x] = 0.0f;
    if (threadIdx.x < 2) rows[row * 2 + threadIdx.x] = 0.0f;
    if (threadIdx.x < k) topk_idx[row * k + threadIdx.x] = -1;
    return;
  }
  const TZ* zr = z + row * V;
  const TT* tr = t + row * V;
  hass::DistillRowStats s = hass::distill_empty();
  WarpTopK top;
  top.init();
  const int64_t groups = (V + kVec - 1) / kVec;
  // The loop bound is uniform per warp (warp-collective top-K); lanes past the end see -inf columns.
  for (int64_t g0 = static_cast<int64_t>(warp) * 32; g0 < groups; g0 += kThreads) {
    const int64_t c0 = (g0 + lane) * kVec;
    float tv[kVec], zv[kVec];
    load_group(tr, c0, V, vec_ok, tv);
    load_group(zr, c0, V, vec_ok, zv);
    const float bt = max8(tv), bz = max8(zv);
    if (bt > s.mt || bz > s.mz) s = hass::distill_rescale(s, bt > s.mt ? bt : s.mt, bz > s.mz ? bz : s.mz);
    hass::distill_accumulate_n(s, tv, zv, kVec);
    top.offer(tv, c0, V, bt, k);
  }
  s = warp_merge(s);
  if (lane == 0) wstats[warp] = s;
  block_topk(top, k, sh);  // synchronises, so wstats is visible below
  if (warp != 0) return;
  s = warp_merge(lane < kWarps ? wstats[lane] : hass::distill_empty());
  const hass::DistillRowOut o = hass::distill_finish(s);
  float tk = 0.0f, pk = 0.0f;
  for (int j = lane; j < k; j += 32) {
    const int ix = sh.i[j];
    topk_idx[row * k + j] = ix == kSent ? -1 : ix;
    if (ix == kSent) continue;
    float p;
    tk += hass::distill_topk_entry(o, Io<TT>::to(tr[ix]), Io<TZ>::to(zr[ix]), &p);
    pk += p;
  }
  tk = warp_sum(tk);
  pk = warp_sum(pk);
  if (lane == 0) {
    float* st = stats + row * 5;
    st[0] = o.mz; st[1] = o.lz; st[2] = o.mt; st[3] = o.lt; st[4] = pk;
    rows[row * 2] = m * o.ce;
    rows[row * 2 + 1] = m * tk;
  }
}

// ---- backward --------------------------------------------------------------------------------------------------

template <typename TZ, typename TT>
__global__ void __launch_bounds__(kThreads) distill_bwd_kernel(
    const TZ* __restrict__ z, const TT* __restrict__ t, const float* __restrict__ mask,
    const float* __restrict__ stats, const int64_t* __restrict__ topk_idx, int k, const float* __restrict__ g_ce,
    const float* __restrict__ g_topk, const float* __restrict__ S, int64_t V, bool vec_ok, TZ* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const float m = mask[row];
  TZ* gr = grad + row * V;
  const int64_t groups = (V + kVec - 1) / kVec;
  if (m == 0.0f) {
    const float zero[kVec] = {};
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) store_group(gr, g * kVec, V, vec_ok, zero);
    return;
  }
  const float* st = stats + row * 5;
  hass::DistillRowOut o;
  o.mz = st[0]; o.lz = st[1]; o.mt = st[2]; o.lt = st[3]; o.ce = 0.0f;
  const hass::DistillGradCoef c = hass::distill_grad_coef(m / *S, *g_ce, *g_topk, st[4]);
  const TZ* zr = z + row * V;
  const TT* tr = t + row * V;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    float tv[kVec], zv[kVec], gv[kVec];
    load_group(tr, g * kVec, V, vec_ok, tv);
    load_group(zr, g * kVec, V, vec_ok, zv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) gv[j] = hass::distill_grad(o, c, zv[j], tv[j], false);
    store_group(gr, g * kVec, V, vec_ok, gv);
  }
  __syncthreads();  // the top-K columns are rewritten with their extra term after the streaming writes
  if (threadIdx.x < k) {
    const int64_t ix = topk_idx[row * k + threadIdx.x];
    if (ix >= 0 && ix < V)
      gr[ix] = Io<TZ>::from(hass::distill_grad(o, c, Io<TZ>::to(zr[ix]), Io<TT>::to(tr[ix]), true));
  }
}

// ---- online softmax over one vocabulary chunk ------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_chunk_kernel(const T* __restrict__ x, int64_t C,
                                                                 float* __restrict__ state, float* __restrict__ alpha,
                                                                 float* __restrict__ topk_val,
                                                                 int64_t* __restrict__ topk_idx, int k, int64_t col0,
                                                                 bool vec_ok, T* __restrict__ e_out) {
  __shared__ TopKShared sh;
  __shared__ float scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* xr = x + row * C;
  const int64_t groups = (C + kVec - 1) / kVec;
  WarpTopK top;
  top.init();
  if (k > 0 && warp == 0) {  // the running list enters through warp 0 only (no duplicates across warps)
    float* pv = topk_val + row * k;
    const int64_t* pi = topk_idx + row * k;
    if (lane < k && pi[lane] >= 0) { top.v[0] = pv[lane]; top.i[0] = static_cast<int>(pi[lane]); }
    if (lane + 32 < k && pi[lane + 32] >= 0) { top.v[1] = pv[lane + 32]; top.i[1] = static_cast<int>(pi[lane + 32]); }
    top.refresh_threshold(k);
  }
  // Pass 1: maximum and top-K of the chunk.
  float cm = -INFINITY;
  for (int64_t g0 = static_cast<int64_t>(warp) * 32; g0 < groups; g0 += kThreads) {
    const int64_t c = (g0 + lane) * kVec;
    float xv[kVec];
    load_group(xr, c, C, vec_ok, xv);
    const float b = max8(xv);
    cm = b > cm ? b : cm;
    if (k > 0) top.offer(xv, col0 + c, col0 + C, b, k);  // global column indices; past C: sentinels
  }
  cm = block_reduce<true>(cm, scratch);
  if (k > 0) {
    block_topk(top, k, sh);
    if (threadIdx.x < k) {
      topk_val[row * k + threadIdx.x] = sh.v[threadIdx.x];
      topk_idx[row * k + threadIdx.x] = sh.i[threadIdx.x] == kSent ? -1 : sh.i[threadIdx.x];
    }
  }
  const float m_old = state[row * 2];
  const float mnew = cm > m_old ? cm : m_old;
  const float shift = hass::safe_max(mnew);
  // Pass 2: exp(x - max) and its sum (the chunk was just read: this pass hits L2).
  float sum = 0.0f;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    float xv[kVec], ev[kVec];
    load_group(xr, g * kVec, C, vec_ok, xv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      ev[j] = hass::fast_exp(xv[j] - shift);
      sum += ev[j];
    }
    if (e_out) store_group(e_out + row * C, g * kVec, C, vec_ok, ev);
  }
  sum = block_reduce<false>(sum, scratch);
  if (threadIdx.x == 0) {
    const float a = expf(m_old - shift);
    alpha[row] = a;
    state[row * 2] = mnew;
    state[row * 2 + 1] = state[row * 2 + 1] * a + sum;
  }
}

// ---- launchers -------------------------------------------------------------------------------------------------

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename F>
cudaError_t dispatch(int code, F&& f) {
  switch (code) {
    case 0: return f(static_cast<float*>(nullptr));
    case 1: return f(static_cast<__nv_bfloat16*>(nullptr));
    case 2: return f(static_cast<__half*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// C interface used by csrc/cuda_ops.cpp. dtype codes: 0 float32, 1 bfloat16, 2 float16. Tensors are contiguous.
extern "C" cudaError_t hass_distill_loss_fwd_cuda(const void* z, int z_dtype, const void* t, int t_dtype,
                                                  const float* mask, int64_t N, int64_t V, int k, float* stats,
                                                  int64_t* topk_idx, float* rows, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (k < 1 || k > hass::kMaxTopK || V < k || V >= kSent) return cudaErrorInvalidValue;
  const bool vec_ok = V % kVec == 0 && aligned16(z) && aligned16(t);
  return dispatch(z_dtype, [&](auto* zt) {
    using TZ = std::remove_pointer_t<decltype(zt)>;
    return dispatch(t_dtype, [&](auto* tt) {
      using TT = std::remove_pointer_t<decltype(tt)>;
      distill_fwd_kernel<TZ, TT><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          static_cast<const TZ*>(z), static_cast<const TT*>(t), mask, V, k, vec_ok, stats, topk_idx, rows);
      return cudaGetLastError();
    });
  });
}

extern "C" cudaError_t hass_distill_loss_bwd_cuda(const void* z, int z_dtype, const void* t, int t_dtype,
                                                  const float* mask, const float* stats, const int64_t* topk_idx,
                                                  int k, const float* g_ce, const float* g_topk, const float* S,
                                                  int64_t N, int64_t V, void* grad, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (k < 1 || k > kThreads) return cudaErrorInvalidValue;
  const bool vec_ok = V % kVec == 0 && aligned16(z) && aligned16(t) && aligned16(grad);
  return dispatch(z_dtype, [&](auto* zt) {
    using TZ = std::remove_pointer_t<decltype(zt)>;
    return dispatch(t_dtype, [&](auto* tt) {
      using TT = std::remove_pointer_t<decltype(tt)>;
      distill_bwd_kernel<TZ, TT><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          static_cast<const TZ*>(z), static_cast<const TT*>(t), mask, stats, topk_idx, k, g_ce, g_topk, S, V,
          vec_ok, static_cast<TZ*>(grad));
      return cudaGetLastError();
    });
  });
}

extern "C" cudaError_t hass_online_softmax_chunk_cuda(const void* x, int dtype, int64_t N, int64_t C, float* state,
                                                      float* alpha, float* topk_val, int64_t* topk_idx, int k,
                                                      int64_t col0, void* e_out, cudaStream_t stream) {
  if (N == 0 || C == 0) return cudaSuccess;
  if (k < 0 || k > hass::kMaxTopK || col0 < 0 || col0 + C >= kSent) return cudaErrorInvalidValue;
  const bool vec_ok = C % kVec == 0 && aligned16(x) && (e_out == nullptr || aligned16(e_out));
  return dispatch(dtype, [&](auto* xt) {
    using T = std::remove_pointer_t<decltype(xt)>;
    softmax_chunk_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const T*>(x), C, state, alpha, topk_val, topk_idx, k, col0, vec_ok, static_cast<T*>(e_out));
    return cudaGetLastError();
  });
}
