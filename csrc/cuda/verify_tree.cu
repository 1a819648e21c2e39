// CUDA kernels of hass::verify_tree (semantics and shared math: csrc/include/hass/verify_tree.h).
//
// 1. node_stats: one block per (batch row, node) streams the node's logits once for max/argmax/finiteness and
//    (T > 0) the online softmax sum; with top-k/top-p it adds 4 radix-select passes per filter (8-bit digits,
//    per-warp shared-memory histograms of 32-bit atomics, summed and scanned once per pass) and one pass for
//    the kept mass. The rows are re-read from L2, and no [n, V]
//    probability matrix is ever written: the output is one 20-byte NodeDist per node.
// 2. walk: one block per batch row. Thread 0 checks the tree and the token ids, then walks the tree on the
//    NodeDists (a child costs one logit load and one uniform). At T > 0 the whole block then draws the final
//    token from the last node's residual by inverse CDF in token-id order, over 2^-40 fixed-point masses
//    (hass::draw_target): every warp sums its contiguous chunk of the vocabulary, one warp locates the chunk
//    that holds the target and finds the token with warp scans. The sums are exact integers, so the token is
//    the CPU kernel's for the same uniform, and a seed gives the same result on every run.
// Uniforms come from the caller (tests) or from Philox4x32-10 keyed by the generator's seed/offset; under CUDA
// graph capture seed and offset are read from device memory, so the launch is capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "hass/verify_tree.h"

namespace {

using hass::cuda::to_float;
using hass::cuda::warp_sum;

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kHistCopies = 16;  // radix histogram copies in shared memory (see SelectSmem)
constexpr unsigned kFull = 0xffffffffu;
using u64 = unsigned long long;

// Calls f(j, x) for the block's share of row[0..V): 16-byte loads when the row is aligned (four in flight per
// thread), each thread visiting its indices in increasing order (the argmax tie rule relies on it).
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* __restrict__ row, int V, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  int start = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15u) == 0) {
    const int nvec = V / kVec, stride = blockDim.x;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    int v = threadIdx.x;
    for (; v + (kUnroll - 1) * stride < nvec; v += kUnroll * stride) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(rv + v + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f((v + u * stride) * kVec + k, to_float(e[k]));
      }
    }
    for (; v < nvec; v += stride) {
      const uint4 raw = __ldg(rv + v);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(v * kVec + k, to_float(e[k]));
    }
    start = nvec * kVec;
  }
  for (int j = start + threadIdx.x; j < V; j += blockDim.x) f(j, to_float(row[j]));
}

// Block-wide sum in a fixed order; red needs kMaxWarps floats. Every thread gets the result.
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? red[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) red[kMaxWarps] = w;
  }
  __syncthreads();
  const float r = red[kMaxWarps];
  __syncthreads();
  return r;
}

__device__ __forceinline__ hass::MaxSum shfl_xor(const hass::MaxSum& a, int o) {
  hass::MaxSum r;
  r.m = __shfl_xor_sync(kFull, a.m, o);
  r.s = __shfl_xor_sync(kFull, a.s, o);
  r.arg = __shfl_xor_sync(kFull, a.arg, o);
  return r;
}

// One radix level's pick by warp 0: lane l owns digits [248 - 8l, 256 - 8l); a warp scan of the lane totals
// (descending digits) finds the lane where the weight from the top reaches target, which finishes with the
// serial hass::radix_pick over its 8 digits. level0_top_p >= 0 derives target from the level-0 total first.
template <typename W>
__device__ void warp_pick(const W* hist, W above, W target, double level0_top_p, int* out_digit, W* out_above,
                          W* out_target) {
  const int lane = threadIdx.x & 31;
  const int hi = hass::kRadixBins - 8 * lane, lo = hi - 8;
  W lsum = 0;
#pragma unroll
  for (int d = lo; d < hi; ++d) lsum += hist[d];
  W incl = lsum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const W v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  if (level0_top_p >= 0.0) target = hass::top_p_target(static_cast<uint64_t>(__shfl_sync(kFull, incl, 31)), level0_top_p);
  const unsigned cross = __ballot_sync(kFull, lsum > 0 && above + incl >= target);
  const unsigned nonempty = __ballot_sync(kFull, lsum > 0);
  const int src = cross ? __ffs(cross) - 1 : (nonempty ? 31 - __clz(nonempty) : -1);
  if (lane == src) {
    W acc = above + (incl - lsum);
    *out_digit = hass::radix_pick<W>(hist, lo, hi, &acc, target);
    *out_above = acc;
    *out_target = target;
  }
}

// Radix-select histograms. Warp w adds to copy w % kHistCopies, so at most two warps (of 32) share a copy;
// within a warp, a thread first sums a run of consecutive equal digits in a
// register (level 0 puts most logits in a few digits) and adds the run with one atomic. Weights are 64-bit
// (top-p masses) but shared-memory atomics are added as two native 32-bit halves: Hopper has no 64-bit shared
// atomic add (it compiles to a compare-and-swap loop), and the carry out of the low half is recovered from the
// value the 32-bit atomic returns. Integer sums are exact, so the order of the additions never matters.
struct SelectSmem {
  uint32_t lo[kHistCopies][hass::kRadixBins];  // counts, or the low 32 bits of masses
  uint32_t hi[kHistCopies][hass::kRadixBins];  // high 32 bits of masses (with the carries of lo)
  u64 total[hass::kRadixBins];                 // the copies summed: what the pick scans
  int digit;
  u64 above, target;
};

template <bool kWide>
__device__ __forceinline__ void hist_add(SelectSmem& sm, int copy, int bin, u64 w) {
  const uint32_t lo = static_cast<uint32_t>(w);
  if constexpr (kWide) {
    const uint32_t old = atomicAdd(&sm.lo[copy][bin], lo);
    const uint32_t hi = static_cast<uint32_t>(w >> 32) + (old + lo < old ? 1u : 0u);
    if (hi) atomicAdd(&sm.hi[copy][bin], hi);
  } else {
    atomicAdd(&sm.lo[copy][bin], lo);
  }
}

// The largest key t with weight{key >= t} >= target, by 4 passes of 8-bit digits (most significant first).
// weight(key, x) is the weight of logit x (0 leaves it out). top_p >= 0 sets target to top_p of the level-0
// total (hass::top_p_target) instead. kWide: weights may exceed 32 bits.
template <bool kWide, typename T, typename Weight>
__device__ uint32_t radix_select(const T* row, int V, u64 target, double top_p, SelectSmem& sm, Weight weight) {
  const int copy = (threadIdx.x >> 5) % kHistCopies;
  constexpr int kWords = kHistCopies * hass::kRadixBins;
  uint32_t prefix = 0;
  u64 above = 0;
  for (int level = 0; level < 4; ++level) {
    for (int i = threadIdx.x; i < kWords / 4; i += blockDim.x) {
      reinterpret_cast<uint4*>(&sm.lo[0][0])[i] = make_uint4(0, 0, 0, 0);
      if (kWide) reinterpret_cast<uint4*>(&sm.hi[0][0])[i] = make_uint4(0, 0, 0, 0);
    }
    if (threadIdx.x == 0) {  // kept if the pick finds no non-empty digit (cannot happen for a valid row)
      sm.digit = 0;
      sm.above = above;
      sm.target = target;
    }
    __syncthreads();
    int run_bin = -1;
    u64 run_w = 0;
    for_each_logit(row, V, [&](int, float x) {
      const uint32_t key = hass::order_key(x);
      if (!hass::radix_in_bucket(key, prefix, level)) return;
      const u64 w = weight(key, x);
      if (w == 0) return;
      const int bin = hass::radix_digit(key, level);
      if (bin != run_bin) {
        if (run_bin >= 0) hist_add<kWide>(sm, copy, run_bin, run_w);
        run_bin = bin;
        run_w = 0;
      }
      run_w += w;
    });
    if (run_bin >= 0) hist_add<kWide>(sm, copy, run_bin, run_w);
    __syncthreads();
    for (int d = threadIdx.x; d < hass::kRadixBins; d += blockDim.x) {
      u64 lo = 0, hi = 0;
#pragma unroll
      for (int c = 0; c < kHistCopies; ++c) {
        lo += sm.lo[c][d];
        if (kWide) hi += sm.hi[c][d];
      }
      sm.total[d] = (hi << 32) + lo;
    }
    __syncthreads();
    if (threadIdx.x < 32)
      warp_pick<u64>(sm.total, above, target, level == 0 ? top_p : -1.0, &sm.digit, &sm.above, &sm.target);
    __syncthreads();
    prefix = hass::radix_extend(prefix, level, sm.digit);
    above = sm.above;
    target = sm.target;
    __syncthreads();  // sm.digit/above/target are reset by the next level
  }
  return prefix;
}

// Largest key t with count{key >= t} >= k (the k-th largest logit).
template <typename T>
__device__ uint32_t select_top_k(const T* row, int V, uint32_t k, SelectSmem& sm) {
  return radix_select<false>(row, V, k, -1.0, sm, [](uint32_t, float) { return u64{1}; });
}

// Largest kept key t whose mass from the top reaches top_p of the kept mass (2^-40 fixed point, exact sums).
template <typename T>
__device__ uint32_t select_top_p(const T* row, int V, const hass::NodeDist& d, float inv_t, double top_p,
                                 SelectSmem& sm) {
  return radix_select<true>(row, V, 0, top_p, sm, [&](uint32_t key, float x) -> u64 {
    return key < d.thr ? 0 : hass::mass_fixed(hass::scaled_exp(x, d.xmax, inv_t));
  });
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    node_stats_kernel(const T* __restrict__ logits, int64_t s_b, int64_t s_n, int64_t n, int V, float inv_t,
                      int greedy, uint32_t top_k, double top_p, hass::NodeDist* __restrict__ out) {
  __shared__ SelectSmem sm;
  __shared__ hass::MaxSum red[kMaxWarps];
  __shared__ float fred[kMaxWarps + 1];
  __shared__ int bad_any;
  const int64_t b = blockIdx.x / n, node = blockIdx.x % n;
  const T* row = logits + b * s_b + node * s_n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (threadIdx.x == 0) bad_any = 0;
  __syncthreads();

  hass::MaxSum acc{-INFINITY, 0.f, INT_MAX};
  bool bad = false;
  for_each_logit(row, V, [&](int j, float x) {
    if (hass::bad_logit(x)) {
      bad = true;
      return;
    }
    hass::maxsum_add(&acc, x, j, inv_t, !greedy);
  });
  if (bad) bad_any = 1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = hass::maxsum_merge(acc, shfl_xor(acc, o), inv_t);
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    hass::MaxSum w = lane < nwarps ? red[lane] : hass::MaxSum{-INFINITY, 0.f, INT_MAX};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = hass::maxsum_merge(w, shfl_xor(w, o), inv_t);
    if (lane == 0) red[0] = w;
  }
  __syncthreads();
  acc = red[0];

  hass::NodeDist d;
  d.xmax = acc.m;
  d.thr = 0u;
  d.sum = acc.s;
  d.argmax = acc.arg;
  d.status = (bad_any || acc.arg == INT_MAX) ? hass::kNonFinite : hass::kOk;
  if (d.status == hass::kOk && !greedy) {
    bool filtered = false;
    if (top_k > 0 && top_k < static_cast<uint32_t>(V)) {
      d.thr = select_top_k(row, V, top_k, sm);
      filtered = true;
    }
    if (top_p < 1.0) {
      d.thr = select_top_p(row, V, d, inv_t, top_p, sm);
      filtered = true;
    }
    if (filtered) {
      float part = 0.f;
      for_each_logit(row, V, [&](int, float x) { part += hass::kept_mass(d, x, inv_t); });
      d.sum = block_sum(part, fred);
    }
  }
  if (threadIdx.x == 0) out[blockIdx.x] = d;
}

__device__ __forceinline__ void fail_row(int64_t* acc_row, int64_t n, int64_t* accept_len, int64_t* next_token,
                                         int64_t b, int* status, int code) {
  for (int64_t i = 0; i < n; ++i) acc_row[i] = -1;
  accept_len[b] = -1;
  next_token[b] = -1;
  atomicCAS(status, hass::kOk, code);
}

// Loads 8 consecutive logits starting at j0 (a multiple of 8) as floats; entries at or past V read as -inf.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int j0, int V, bool aligned, float out[8]) {
  if (aligned && j0 + 8 <= V) {
    const uint4* p = reinterpret_cast<const uint4*>(row + j0);
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < 8 / kVec; ++v) {
      const uint4 raw = __ldg(p + v);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[v * kVec + k] = to_float(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = j0 + k < V ? to_float(row[j0 + k]) : -INFINITY;
  }
}

// Shared-memory layout of walk_kernel for n nodes (n <= kMaxNodes): everything the walk reads is staged by
// the whole block first, so thread 0 walks without touching global memory.
constexpr int kMaxNodes = 1024;
__host__ __device__ constexpr size_t walk_smem_bytes(int64_t n) {
  return static_cast<size_t>(n) * (sizeof(hass::NodeDist) + 3 * sizeof(int32_t) + 2 * sizeof(float));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    walk_kernel(const T* __restrict__ logits, int64_t s_b, int64_t s_n, const int64_t* __restrict__ tokens,
                const int64_t* __restrict__ parents, int64_t n, int V, float inv_t, int greedy,
                const hass::NodeDist* __restrict__ dists, const float* __restrict__ uniforms, hass::Philox rng,
                int64_t* __restrict__ accepted, int64_t* __restrict__ accept_len, int64_t* __restrict__ next_token,
                int* status) {
  extern __shared__ __align__(16) unsigned char walk_smem[];
  hass::NodeDist* dist = reinterpret_cast<hass::NodeDist*>(walk_smem);
  int32_t* par = reinterpret_cast<int32_t*>(dist + n);
  int32_t* tok = par + n;
  int32_t* rejected = tok + n;
  float* clogit = reinterpret_cast<float*>(rejected + n);  // logit of child c's token at its parent
  float* unif = clogit + n;
  __shared__ int64_t s_last;
  __shared__ int s_bad, s_nrej, s_go, s_warp, s_pick;
  __shared__ unsigned long long s_before, s_target;
  __shared__ unsigned long long wsum[kMaxWarps];
  const int64_t b = blockIdx.x;
  int64_t* acc_row = accepted + b * n;
  const T* rows = logits + b * s_b;

  // Stage the row's tree, validating it; the node distributions; the uniforms.
  if (threadIdx.x == 0) {
    s_bad = hass::kOk;
    s_go = 0;
  }
  __syncthreads();
  uint64_t seed = rng.seed, offset = rng.offset;
  if (!greedy && !uniforms && rng.captured) {
    seed = static_cast<uint64_t>(*rng.seed_ptr);
    offset = static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_extra;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t p = parents[b * n + i], t = tokens[b * n + i];
    if (!hass::tree_entry_ok(i, p)) atomicCAS(&s_bad, hass::kOk, hass::kBadTree);
    else if (!hass::token_ok(i, t, V)) atomicCAS(&s_bad, hass::kOk, hass::kBadIndex);
    par[i] = static_cast<int32_t>(p);
    tok[i] = static_cast<int32_t>(t);
    dist[i] = dists[b * n + i];
    if (!greedy) unif[i] = uniforms ? uniforms[b * n + i] : hass::philox_uniform(seed, offset, b, i);
  }
  __syncthreads();
  if (s_bad != hass::kOk) {
    if (threadIdx.x == 0) fail_row(acc_row, n, accept_len, next_token, b, status, s_bad);
    return;
  }
  if (!greedy)
    for (int64_t c = 1 + threadIdx.x; c < n; c += blockDim.x) clogit[c] = to_float(rows[par[c] * s_n + tok[c]]);
  __syncthreads();

  if (threadIdx.x == 0) {
    const hass::WalkOut w = hass::verify_walk(
        n, par, tok, greedy != 0, [&](int64_t node) { return dist[node]; },
        [&](int64_t node, int64_t c) { return hass::kept_mass(dist[node], clogit[c], inv_t); },
        [&](int64_t c) { return unif[c]; }, acc_row, rejected);
    if (w.status != hass::kOk) {
      fail_row(acc_row, n, accept_len, next_token, b, status, w.status);
    } else {
      accept_len[b] = w.accept_len;
      if (greedy) {
        next_token[b] = dist[w.last].argmax;
      } else {
        hass::sort_tokens(rejected, w.nrej);
        s_last = w.last;
        s_nrej = w.nrej;
        s_go = 1;
      }
    }
  }
  __syncthreads();
  if (!s_go) return;
  const float u0 = unif[0];

  // Residual draw at the last node: warp w owns tokens [w * chunk, (w + 1) * chunk), chunk a multiple of 256.
  const hass::NodeDist d = dist[s_last];
  const T* row = rows + s_last * s_n;
  const int nrej = s_nrej;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int chunk = ((V + nwarps - 1) / nwarps + 255) / 256 * 256;
  const bool aligned = (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
  const int w_lo = warp * chunk, w_hi = min(V, w_lo + chunk);
  {
    unsigned long long part = 0;
    int cur = 0;
    for (int base = w_lo; base < w_hi; base += 256) {
      const int j0 = base + 8 * lane;
      float x[8];
      load8(row, j0, w_hi, aligned, x);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (j0 + k < w_hi) part += hass::mass_fixed(hass::residual_mass(d, x[k], inv_t, j0 + k, rejected, nrej, &cur));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(kFull, part, o);  // exact: any order
    if (lane == 0) wsum[warp] = part;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int w = 0; w < nwarps; ++w) total += wsum[w];
    s_warp = -1;
    s_pick = d.argmax;  // no token with a fixed-point mass left: degenerate, keep a valid token
    if (total > 0) {
      const unsigned long long target = hass::draw_target(total, u0);
      unsigned long long before = 0;
      for (int w = 0; w < nwarps && s_warp < 0; ++w) {
        if (before + wsum[w] > target) s_warp = w;
        else before += wsum[w];
      }
      s_before = before;
      s_target = target;
    }
  }
  __syncthreads();
  if (warp == s_warp) {  // the chunk that holds the target (target < total: one does)
    const int c_lo = warp * chunk, c_hi = min(V, c_lo + chunk);
    unsigned long long running = s_before;
    const unsigned long long target = s_target;
    int cur = 0;
    for (int base = c_lo; base < c_hi; base += 256) {
      const int j0 = base + 8 * lane;
      float x[8];
      unsigned long long e[8];
      load8(row, j0, c_hi, aligned, x);
      unsigned long long lsum = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        e[k] = j0 + k < c_hi ? hass::mass_fixed(hass::residual_mass(d, x[k], inv_t, j0 + k, rejected, nrej, &cur)) : 0;
        lsum += e[k];
      }
      unsigned long long incl = lsum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long v = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned cross = __ballot_sync(kFull, running + incl > target);
      if (cross) {
        const int src = __ffs(cross) - 1;
        if (lane == src) {
          unsigned long long c = running + (incl - lsum);
          int pick = -1;
          for (int k = 0; k < 8 && pick < 0; ++k) {
            c += e[k];
            if (c > target) pick = j0 + k;
          }
          s_pick = pick;
        }
        break;  // warp-uniform
      }
      running += __shfl_sync(kFull, incl, 31);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) next_token[b] = s_pick;
}

template <typename T>
cudaError_t launch(const void* logits, int64_t B, int64_t n, int64_t V, int64_t s_b, int64_t s_n,
                   const int64_t* tokens, const int64_t* parents, float inv_t, int greedy, int64_t top_k,
                   double top_p, const float* uniforms, hass::Philox rng, hass::NodeDist* dists,
                   int64_t* accepted, int64_t* accept_len, int64_t* next_token, int* status, cudaStream_t stream) {
  const T* lg = static_cast<const T*>(logits);
  const int threads = V >= 16384 ? kMaxThreads : (V >= 2048 ? 256 : 128);
  const uint32_t k = (top_k > 0 && top_k < V) ? static_cast<uint32_t>(top_k) : 0u;
  node_stats_kernel<T><<<static_cast<unsigned>(B * n), threads, 0, stream>>>(lg, s_b, s_n, n, static_cast<int>(V),
                                                                              inv_t, greedy, k, top_p, dists);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  walk_kernel<T><<<static_cast<unsigned>(B), threads, walk_smem_bytes(n), stream>>>(
      lg, s_b, s_n, tokens, parents, n, static_cast<int>(V), inv_t, greedy, dists, uniforms, rng, accepted,
      accept_len, next_token, status);
  return cudaGetLastError();
}

}  // namespace

// C interface used by csrc/cuda_ops.cpp. dtype: 0 float32, 1 bfloat16, 2 float16. dists: B * n NodeDists of
// scratch. status: one int, kOk on entry; a failing row leaves its code there and -1 in its outputs.
extern "C" cudaError_t hass_verify_tree_cuda(const void* logits, int dtype, int64_t B, int64_t n, int64_t V,
                                             int64_t s_b, int64_t s_n, const int64_t* tokens,
                                             const int64_t* parents, float inv_t, int greedy, int64_t top_k,
                                             double top_p, const float* uniforms, hass::Philox rng,
                                             hass::NodeDist* dists, int64_t* accepted, int64_t* accept_len,
                                             int64_t* next_token, int* status, cudaStream_t stream) {
  if (B <= 0 || n <= 0 || V <= 0 || V >= (int64_t{1} << 31) - 256 || n > kMaxNodes || B * n > INT_MAX)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch<float>(logits, B, n, V, s_b, s_n, tokens, parents, inv_t, greedy, top_k, top_p, uniforms,
                                 rng, dists, accepted, accept_len, next_token, status, stream);
    case 1: return launch<__nv_bfloat16>(logits, B, n, V, s_b, s_n, tokens, parents, inv_t, greedy, top_k, top_p,
                                         uniforms, rng, dists, accepted, accept_len, next_token, status, stream);
    case 2: return launch<__half>(logits, B, n, V, s_b, s_n, tokens, parents, inv_t, greedy, top_k, top_p, uniforms,
                                  rng, dists, accepted, accept_len, next_token, status, stream);
    default: return cudaErrorInvalidValue;
  }
}
