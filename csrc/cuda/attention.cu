// CUDA kernels of hass::tree_attention and hass::align_attention (+ backward); semantics and the shared
// math in csrc/include/hass/attention.h.
//
// All kernels are flash-style: a CTA of 4 warps owns 64 query rows (16 per warp) or, in the dk/dv backward, 64
// keys; key (or query) tiles of 64 are staged in shared memory and never form a full score matrix. The warp
// GEMMs use tensor cores (mma.sync m16n8k16, fp32 accumulation) for bf16/fp16 and the same register fragment
// layout computed with FMAs for fp32, so the softmax/mask code is shared by both. Probabilities are staged in
// shared memory in the input dtype for the P*V products (as flash attention does).
//
// Fragment layout of a 16x8 fp32 accumulator tile (PTX m16n8k16): lane = 4*g + t holds rows g and g+8, columns
// 2t and 2t+1; acc[nt][2*h + e] is row g + 8h, column 8*nt + 2t + e. The four lanes of a quad share a row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"
#include "hass/attention.h"
#include "tree_attention_sm90.cuh"

namespace {

using hass::cuda::Io;
using hass::cuda::mma_16816;
using hass::cuda::pack2;
using hass::cuda::quad_max;
using hass::cuda::quad_sum;
using hass::cuda::warp_sum;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBM = 64;  // query rows (or keys, dk/dv backward) per CTA
constexpr int kBN = 64;  // keys (or query rows, dk/dv backward) per tile
constexpr int kNT = kBN / 8;

// Shared-memory row stride: D (or kBN) plus 16 bytes, which spreads the 8 fragment rows over distinct banks.
template <typename T>
constexpr int padded(int cols) {
  return cols + 16 / static_cast<int>(sizeof(T));
}

// A row-major tile in shared memory.
template <typename T>
struct STile {
  T* p;
  int ld;
  __device__ __forceinline__ T& operator()(int r, int c) const { return p[r * ld + c]; }
  __device__ __forceinline__ uint32_t pair(int r, int c) const {  // elements (r, c), (r, c+1); c even
    return *reinterpret_cast<const uint32_t*>(p + r * ld + c);
  }
};

// acc[NT] (a 16 x 8NT tile) += A[16 x K] * B[K x 8NT], K a multiple of 16. A(i, k) = a(i, k). B(k, j) = b(j, k)
// when kBT (B stored transposed, k contiguous), else b(k, j).
template <typename T, int NT, bool kBT>
__device__ __forceinline__ void warp_gemm(float (&acc)[NT][4], const STile<T>& a, const STile<T>& b, int K) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if constexpr (Io<T>::kTensorCore) {
    for (int k0 = 0; k0 < K; k0 += 16) {
      const uint32_t af[4] = {a.pair(g, k0 + 2 * t), a.pair(g + 8, k0 + 2 * t), a.pair(g, k0 + 2 * t + 8),
                              a.pair(g + 8, k0 + 2 * t + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j = nt * 8 + g;
        uint32_t bf[2];
        if constexpr (kBT) {
          bf[0] = b.pair(j, k0 + 2 * t);
          bf[1] = b.pair(j, k0 + 2 * t + 8);
        } else {
          bf[0] = pack2(b(k0 + 2 * t, j), b(k0 + 2 * t + 1, j));
          bf[1] = pack2(b(k0 + 2 * t + 8, j), b(k0 + 2 * t + 9, j));
        }
        mma_16816<T>(acc[nt], af, bf[0], bf[1]);
      }
    }
  } else {
    for (int k = 0; k < K; ++k) {
      const float a0 = Io<T>::to(a(g, k)), a1 = Io<T>::to(a(g + 8, k));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j = nt * 8 + 2 * t;
        const float b0 = Io<T>::to(kBT ? b(j, k) : b(k, j));
        const float b1 = Io<T>::to(kBT ? b(j + 1, k) : b(k, j + 1));
        acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Copies `rows` rows of D elements into a shared tile (16-byte chunks); src(r) gives a row's global address or
// null for a row outside the tensor, which is zero-filled (masked keys then multiply zeros, never garbage).
template <typename T, int D, typename Src>
__device__ __forceinline__ void load_rows(T* dst, int ld, int rows, Src src) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kPerRow = D / kChunk;
  for (int e = threadIdx.x; e < rows * kPerRow; e += blockDim.x) {
    const int r = e / kPerRow, c = (e % kPerRow) * kChunk;
    const T* s = src(r);
    const uint4 v = s ? *reinterpret_cast<const uint4*>(s + c) : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
  }
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const hass::Strided4& x, int64_t b, int64_t h, int64_t s) {
  return static_cast<const T*>(x.p) + b * x.sb + h * x.sh + s * x.ss;
}
template <typename T>
__device__ __forceinline__ T* row_ptr_w(const hass::Strided4& x, int64_t b, int64_t h, int64_t s) {
  return static_cast<T*>(x.p) + b * x.sb + h * x.sh + s * x.ss;
}
template <typename T>
__device__ __forceinline__ const T* level_ptr(const hass::Strided5& x, int i, int64_t b, int64_t h, int64_t s) {
  return static_cast<const T*>(x.p) + i * x.sl + b * x.sb + h * x.sh + s * x.ss;
}
template <typename T>
__device__ __forceinline__ T* level_ptr_w(const hass::Strided5& x, int i, int64_t b, int64_t h, int64_t s) {
  return static_cast<T*>(x.p) + i * x.sl + b * x.sb + h * x.sh + s * x.ss;
}

// Online-softmax step for one tile of scores held in fragments: rescales the output accumulator, turns the
// scores into probabilities (in place) and updates the running max m and lane-partial denominator l.
template <int DT>
__device__ __forceinline__ void online_step(float (&s)[kNT][4], float (&o)[DT][4], float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
    mx = quad_max(mx);
    const float mn = hass::online_max(m[h], mx);
    const float alpha = hass::rescale_factor(m[h], mn);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = hass::softmax_weight(s[nt][2 * h + e], mn);
        s[nt][2 * h + e] = p;
        sum += p;
      }
    l[h] = l[h] * alpha + sum;
    m[h] = mn;
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      o[j][2 * h] *= alpha;
      o[j][2 * h + 1] *= alpha;
    }
  }
}

// Writes a 16 x kBN fragment tile into a warp's shared tile in dtype T.
template <typename T>
__device__ __forceinline__ void store_frag(const STile<T>& dst, const float (&x)[kNT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      dst(g + 8 * h, nt * 8 + 2 * t) = Io<T>::from(x[nt][2 * h]);
      dst(g + 8 * h, nt * 8 + 2 * t + 1) = Io<T>::from(x[nt][2 * h + 1]);
    }
}

// ==== tree attention ===================================================================================

template <typename T, int D>
struct TreeSmem {
  static constexpr int kLd = padded<T>(D), kLdP = padded<T>(kBN);
  static size_t bytes(int words) {
    return sizeof(uint64_t) * kBM * words + sizeof(T) * (3 * kBM * kLd + kWarps * 16 * kLdP);
  }
};

// One CTA: 64 query rows of one (batch, kv head) group (row r = head-in-group * n + node) over the key tiles
// of its split: first the prefix tiles (no mask), then the tree tiles (ancestor bits).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tree_attention_kernel(hass::TreeAttnParams p) {
  using S = TreeSmem<T, D>;
  constexpr int DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int W = hass::mask_words(p.n);
  uint64_t* s_mask = reinterpret_cast<uint64_t*>(smem);
  T* s_q = reinterpret_cast<T*>(s_mask + kBM * W);
  T* s_k = s_q + kBM * S::kLd;
  T* s_v = s_k + kBM * S::kLd;
  T* s_p = s_v + kBM * S::kLd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int grp = p.Hq / p.Hkv, rows = grp * p.n;
  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
  const int r0 = blockIdx.x * kBM;
  const int tree_start = p.L - p.n;
  int prefix = p.prefix_lens ? static_cast<int>(p.prefix_lens[b]) : tree_start;
  prefix = prefix < 0 ? 0 : (prefix > tree_start ? tree_start : prefix);

  load_rows<T, D>(s_q, S::kLd, kBM, [&](int r) -> const T* {
    const int rr = r0 + r;
    return rr < rows ? row_ptr<T>(p.q, b, hk * grp + rr / p.n, rr % p.n) : nullptr;
  });
  // Pack the ancestor-mask rows of this warp's 16 queries into 64-bit words, 32 bits per ballot.
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {
    const int rr = r0 + r;
    const bool* row = rr < rows ? p.mask + (static_cast<int64_t>(b) * p.n + rr % p.n) * p.n : nullptr;
    for (int w = 0; w < W; ++w) {
      const int j0 = 64 * w + lane, j1 = j0 + 32;
      const unsigned lo = __ballot_sync(0xffffffffu, row && j0 < p.n && row[j0]);
      const unsigned hi = __ballot_sync(0xffffffffu, row && j1 < p.n && row[j1]);
      if (lane == 0) s_mask[r * W + w] = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
    }
  }

  float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  zero(o);
  const int tiles_prefix = (prefix + kBN - 1) / kBN, tiles = tiles_prefix + (p.n + kBN - 1) / kBN;
  int tile_begin, tile_end;
  hass::split_range(tiles, p.splits, blockIdx.z, &tile_begin, &tile_end);
  const STile<T> q_w{s_q + warp * 16 * S::kLd, S::kLd}, k_t{s_k, S::kLd}, v_t{s_v, S::kLd};
  const STile<T> p_w{s_p + warp * 16 * S::kLdP, S::kLdP};

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const bool in_tree = tile >= tiles_prefix;
    const int c0 = in_tree ? tree_start + (tile - tiles_prefix) * kBN : tile * kBN;
    const int cnt = in_tree ? min(kBN, p.L - c0) : min(kBN, prefix - c0);
    __syncthreads();  // the previous tile's K/V are no longer read
    load_rows<T, D>(s_k, S::kLd, kBN, [&](int r) { return r < cnt ? row_ptr<T>(p.k, b, hk, c0 + r) : nullptr; });
    load_rows<T, D>(s_v, S::kLd, kBN, [&](int r) { return r < cnt ? row_ptr<T>(p.v, b, hk, c0 + r) : nullptr; });
    __syncthreads();
    float s[kNT][4];
    zero(s);
    warp_gemm<T, kNT, true>(s, q_w, k_t, D);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = warp * 16 + g + 8 * h, j = nt * 8 + 2 * t + e;
          bool vis = r0 + r < rows && j < cnt;
          if (vis && in_tree) vis = hass::mask_bit(s_mask + r * W, c0 + j - tree_start);
          s[nt][2 * h + e] = vis ? s[nt][2 * h + e] * p.scale : -INFINITY;
        }
    online_step<DT>(s, o, m, l);
    store_frag<T>(p_w, s);
    __syncwarp();
    warp_gemm<T, DT, false>(o, p_w, v_t, kBN);
    __syncwarp();
  }

  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lt = quad_sum(l[h]);
    const int rr = r0 + warp * 16 + g + 8 * h;
    if (rr >= rows) continue;
    const int head = hk * grp + rr / p.n, node = rr % p.n;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    if (p.splits == 1) {
      T* dst = row_ptr_w<T>(p.out, b, head, node);
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        dst[j * 8 + 2 * t] = Io<T>::from(o[j][2 * h] * inv);
        dst[j * 8 + 2 * t + 1] = Io<T>::from(o[j][2 * h + 1] * inv);
      }
    } else {
      const int64_t row_id = (static_cast<int64_t>(b) * p.Hq + head) * p.n + node;
      float* dst = p.o_part + (blockIdx.z * total_rows + row_id) * D;
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        dst[j * 8 + 2 * t] = o[j][2 * h] * inv;
        dst[j * 8 + 2 * t + 1] = o[j][2 * h + 1] * inv;
      }
      if (t == 0) p.lse_part[blockIdx.z * total_rows + row_id] = hass::row_lse(m[h], lt);
    }
  }
}

// ---- rank-order tree attention (the row-invariant path; the rule in hass/attention.h) -------------------
//
// A CTA: kRankRows query rows of one (batch, KV head) group (row r = head-in-group * n + node), kRankRows / 4 per
// warp, over one chunk of ranks (blockIdx.z). Per tile of 32 ranks the CTA stages the prefix keys and values of the
// tile in shared memory as fp32 (every row of the group sees them at the same ranks); a row's tree keys are read from
// global memory. For one row, lane j computes the score of the tile's key j as one fma chain over d = 0 .. D-1; the
// tile's max and sum are xor butterflies over the lanes; then each lane adds the tile's keys in rank order into its
// output dims (d = 32 e + lane). Every step is a function of the row's rank list, so the row's bits are too.
constexpr int kRankRows = 16;
constexpr int kRankRowsPerWarp = kRankRows / kWarps;

template <int D>
struct RankSmem {
  float k[hass::kRankTile][D + 1];  // +1: lane j reads row j, column d: 32 distinct banks
  float v[hass::kRankTile][D];
  float q[kRankRows][D];
  int16_t nodes[kRankRows][hass::kRankMaxNodes];  // each row's visible tree nodes, in node order
  int ranks[kRankRows];                           // each row's rank count (0: no row)
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tree_attention_rank_kernel(hass::TreeAttnParams p) {
  constexpr int DL = D / 32;
  __shared__ RankSmem<D> sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = p.Hq / p.Hkv, rows = grp * p.n;
  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
  const int tree_start = p.L - p.n;
  int prefix = p.prefix_lens ? static_cast<int>(p.prefix_lens[b]) : tree_start;
  prefix = prefix < 0 ? 0 : (prefix > tree_start ? tree_start : prefix);

  // Each warp: its rows' q (fp32) and visible tree nodes.
  for (int i = 0; i < kRankRowsPerWarp; ++i) {
    const int r = warp * kRankRowsPerWarp + i, rr = blockIdx.x * kRankRows + r;
    if (rr >= rows) {
      if (lane == 0) sm.ranks[r] = 0;
      continue;
    }
    const int head = hk * grp + rr / p.n, node = rr % p.n;
    const T* qr = row_ptr<T>(p.q, b, head, node);
    for (int d = lane; d < D; d += 32) sm.q[r][d] = Io<T>::to(qr[d]);
    const bool* mrow = p.mask + (static_cast<int64_t>(b) * p.n + node) * p.n;
    int nv = 0;
    for (int j0 = 0; j0 < p.n; j0 += 32) {
      const bool vis = j0 + lane < p.n && mrow[j0 + lane];
      const unsigned bal = __ballot_sync(hass::cuda::kFullMask, vis);
      if (vis) sm.nodes[r][nv + __popc(bal & ((1u << lane) - 1u))] = static_cast<int16_t>(j0 + lane);
      nv += __popc(bal);
    }
    if (lane == 0) sm.ranks[r] = prefix + nv;
  }
  __syncthreads();
  int most = 0;
  for (int r = 0; r < kRankRows; ++r) most = max(most, sm.ranks[r]);
  const int c_begin = blockIdx.z * hass::kRankChunk, c_end = min(most, c_begin + hass::kRankChunk);

  float acc[kRankRowsPerWarp][DL], m[kRankRowsPerWarp], l[kRankRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRankRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < DL; ++e) acc[i][e] = 0.f;
  }
  // The runtime-bounded loops here and in tree_combine_kernel are kept rolled: an unrolled body and its remainder
  // copy may contract a * b + c differently, and which copy handles a tile would depend on the trip count, i.e. on
  // the other rows of the CTA and on the split count (the tree size). One copy: a row's bits depend on it alone.
#pragma unroll 1
  for (int r0 = c_begin; r0 < c_end; r0 += hass::kRankTile) {
    const int staged = max(0, min(hass::kRankTile, prefix - r0));  // prefix keys of this tile
    __syncthreads();  // the previous tile is no longer read
    for (int x = threadIdx.x; x < staged * D; x += kThreads) {
      const int j = x / D, d = x % D;
      sm.k[j][d] = Io<T>::to(row_ptr<T>(p.k, b, hk, r0 + j)[d]);
      sm.v[j][d] = Io<T>::to(row_ptr<T>(p.v, b, hk, r0 + j)[d]);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRankRowsPerWarp; ++i) {
      const int r = warp * kRankRowsPerWarp + i;
      const int cnt = min(hass::kRankTile, min(sm.ranks[r], c_begin + hass::kRankChunk) - r0);
      if (cnt <= 0) continue;  // warp-uniform
      float sc = -INFINITY;  // lane j: the score of rank r0 + j
      if (lane < cnt) {
        float dot = 0.f;
        if (lane < staged) {
#pragma unroll 8
          for (int d = 0; d < D; ++d) dot = fmaf(sm.q[r][d], sm.k[lane][d], dot);
        } else {
          const T* kr = row_ptr<T>(p.k, b, hk, tree_start + sm.nodes[r][r0 + lane - prefix]);
#pragma unroll 8
          for (int d = 0; d < D; ++d) dot = fmaf(sm.q[r][d], Io<T>::to(kr[d]), dot);
        }
        sc = dot * p.scale;
      }
      const float mn = hass::online_max(m[i], hass::cuda::warp_max(sc));
      if (mn == -INFINITY) continue;  // only -inf scores so far: nothing to add
      const float alpha = hass::rescale_factor(m[i], mn), pr = hass::softmax_weight(sc, mn);
      l[i] = l[i] * alpha + warp_sum(pr);
      m[i] = mn;
#pragma unroll
      for (int e = 0; e < DL; ++e) acc[i][e] *= alpha;
#pragma unroll 1
      for (int j = 0; j < cnt; ++j) {
        const float pj = __shfl_sync(hass::cuda::kFullMask, pr, j);
        if (j < staged) {
#pragma unroll
          for (int e = 0; e < DL; ++e) acc[i][e] = fmaf(pj, sm.v[j][32 * e + lane], acc[i][e]);
        } else {
          const T* vr = row_ptr<T>(p.v, b, hk, tree_start + sm.nodes[r][r0 + j - prefix]);
#pragma unroll
          for (int e = 0; e < DL; ++e) acc[i][e] = fmaf(pj, Io<T>::to(vr[32 * e + lane]), acc[i][e]);
        }
      }
    }
  }

  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
#pragma unroll
  for (int i = 0; i < kRankRowsPerWarp; ++i) {
    const int rr = blockIdx.x * kRankRows + warp * kRankRowsPerWarp + i;
    if (rr >= rows) continue;
    const int head = hk * grp + rr / p.n, node = rr % p.n;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    if (gridDim.z == 1) {
      T* dst = row_ptr_w<T>(p.out, b, head, node);
#pragma unroll
      for (int e = 0; e < DL; ++e) dst[32 * e + lane] = Io<T>::from(acc[i][e] * inv);
    } else {
      const int64_t row_id = (static_cast<int64_t>(b) * p.Hq + head) * p.n + node;
      float* dst = p.o_part + (blockIdx.z * total_rows + row_id) * D;
#pragma unroll
      for (int e = 0; e < DL; ++e) dst[32 * e + lane] = acc[i][e] * inv;
      if (lane == 0) p.lse_part[blockIdx.z * total_rows + row_id] = hass::row_lse(m[i], l[i]);
    }
  }
}

// Merges the per-split partial outputs of each row by their log-sum-exp; one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) tree_combine_kernel(hass::TreeAttnParams p) {
  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= total_rows) return;
  float total = -INFINITY;
#pragma unroll 1  // rolled, as in the rank kernel: the same instructions for every split whatever p.splits is
  for (int s = 0; s < p.splits; ++s) total = hass::lse_merge(total, p.lse_part[s * total_rows + row]);
  float acc[D / 32];
#pragma unroll
  for (int j = 0; j < D / 32; ++j) acc[j] = 0.f;
  bool first = true;  // the first contributing split sets acc (no 0 + x): one split alone passes through exactly
  if (total != -INFINITY)
#pragma unroll 1
    for (int s = 0; s < p.splits; ++s) {
      const float w = hass::lse_weight(p.lse_part[s * total_rows + row], total);
      if (w == 0.f) continue;
      const float* src = p.o_part + (s * total_rows + row) * D;
#pragma unroll
      for (int j = 0; j < D / 32; ++j) acc[j] = first ? w * src[j * 32 + lane] : acc[j] + w * src[j * 32 + lane];
      first = false;
    }
  const int node = static_cast<int>(row % p.n), head = static_cast<int>((row / p.n) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.n) * p.Hq));
  T* dst = row_ptr_w<T>(p.out, b, head, node);
#pragma unroll
  for (int j = 0; j < D / 32; ++j) dst[j * 32 + lane] = Io<T>::from(acc[j]);
}

// ==== alignment attention: forward =====================================================================

template <typename T, int D>
struct AlignFwdSmem {
  static constexpr int kLd = padded<T>(D), kLdP = padded<T>(kBN);
  static size_t bytes() { return sizeof(T) * (3 * kBM * kLd + kWarps * 16 * kLdP); }
};

// Dot product of a row's q (or dO) columns owned by this lane with a global row, summed over the quad:
// columns 8j + 2t + {0, 1} of the D/8 fragment tiles, i.e. the columns of this lane's output accumulators.
template <typename T, int D>
__device__ __forceinline__ float quad_row_dot(const STile<T>& x, int r, const T* y) {
  const int t = threadIdx.x & 3;
  float s = 0.f;
  if (y)
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) s += Io<T>::to(x(r, j * 8 + 2 * t + e)) * Io<T>::to(y[j * 8 + 2 * t + e]);
  return quad_sum(s);
}

// One CTA: 64 positions of one query head. Level-0 key tiles (causal with offset F-1), then the F-1 diagonal
// keys of each row folded in one at a time.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) align_fwd_kernel(hass::AlignParams p) {
  using S = AlignFwdSmem<T, D>;
  constexpr int DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kBM * S::kLd;
  T* s_v = s_k + kBM * S::kLd;
  T* s_p = s_v + kBM * S::kLd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int t0 = blockIdx.x * kBM;
  load_rows<T, D>(s_q, S::kLd, kBM, [&](int r) { return t0 + r < p.T ? row_ptr<T>(p.q, b, h, t0 + r) : nullptr; });
  // Rows of s_q are written by every warp and read per warp below; the level-0 loop's barriers are not enough:
  // it has no iteration when no row of this tile sees a level-0 key (T < F, or t0 + 63 < F - 1).
  __syncthreads();

  float o[DT][4], m[2], l[2];
  zero(o);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {  // the leaky sink sits in one lane of the quad (l is summed over the quad)
    hass::align_initial_state(t0 + warp * 16 + g + 8 * hh, p.T, p.leaky, &m[hh], &l[hh]);
    if (t != 0) l[hh] = 0.f;
  }
  const STile<T> q_w{s_q + warp * 16 * S::kLd, S::kLd}, k_t{s_k, S::kLd}, v_t{s_v, S::kLd};
  const STile<T> p_w{s_p + warp * 16 * S::kLdP, S::kLdP};
  const int last = static_cast<int>(hass::align_level0_last(min(t0 + kBM, p.T) - 1, p.F));
  for (int c0 = 0; c0 <= last; c0 += kBN) {
    __syncthreads();
    load_rows<T, D>(s_k, S::kLd, kBN, [&](int r) { return c0 + r <= last ? level_ptr<T>(p.k, 0, b, hk, c0 + r) : nullptr; });
    load_rows<T, D>(s_v, S::kLd, kBN, [&](int r) { return c0 + r <= last ? level_ptr<T>(p.v, 0, b, hk, c0 + r) : nullptr; });
    __syncthreads();
    float s[kNT][4];
    zero(s);
    warp_gemm<T, kNT, true>(s, q_w, k_t, D);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = t0 + warp * 16 + g + 8 * hh, c = c0 + nt * 8 + 2 * t + e;
          const bool vis = row < p.T && c <= hass::align_level0_last(row, p.F);
          s[nt][2 * hh + e] = vis ? s[nt][2 * hh + e] * p.scale : -INFINITY;
        }
    online_step<DT>(s, o, m, l);
    store_frag<T>(p_w, s);
    __syncwarp();
    warp_gemm<T, DT, false>(o, p_w, v_t, kBN);
    __syncwarp();
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] = quad_sum(l[hh]);
    const int r = warp * 16 + g + 8 * hh, row = t0 + r;
    for (int i = 1; i < p.F; ++i) {  // uniform over the warp: the quad reductions need every lane
      const int64_t c = row < p.T ? hass::align_diag_col(row, p.F, i) : -1;
      const T* kr = c >= 0 ? level_ptr<T>(p.k, i, b, hk, c) : nullptr;
      const float s = quad_row_dot<T, D>(q_w, g + 8 * hh, kr) * p.scale;
      if (!kr) continue;
      const T* vr = level_ptr<T>(p.v, i, b, hk, c);
      const float mn = hass::online_max(m[hh], s);
      const float alpha = hass::rescale_factor(m[hh], mn), pr = hass::softmax_weight(s, mn);
#pragma unroll
      for (int j = 0; j < DT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          o[j][2 * hh + e] = o[j][2 * hh + e] * alpha + pr * Io<T>::to(vr[j * 8 + 2 * t + e]);
      l[hh] = l[hh] * alpha + pr;
      m[hh] = mn;
    }
    if (row >= p.T) continue;
    const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
    T* dst = row_ptr_w<T>(p.out, b, h, row);
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) dst[j * 8 + 2 * t + e] = Io<T>::from(o[j][2 * hh + e] * inv);
    if (t == 0) p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.T + row] = hass::row_lse(m[hh], l[hh]);
  }
}

// ==== alignment attention: backward ====================================================================

// delta = rowsum(dO * O), one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) align_delta_kernel(hass::AlignParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.T) return;
  const int tt = static_cast<int>(row % p.T), h = static_cast<int>((row / p.T) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.T) * p.Hq));
  const T* go = row_ptr<T>(p.dout, b, h, tt);
  const T* o = row_ptr<T>(p.out, b, h, tt);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < D / 32; ++j) s += Io<T>::to(go[j * 32 + lane]) * Io<T>::to(o[j * 32 + lane]);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s;
}

template <typename T, int D>
struct AlignDqSmem {
  static constexpr int kLd = padded<T>(D), kLdP = padded<T>(kBN);
  static size_t bytes() { return sizeof(T) * (4 * kBM * kLd + kWarps * 16 * kLdP); }
};

// dq for 64 positions of one query head: ds = p (dp - delta) over the level-0 tiles and the diagonal keys.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) align_dq_kernel(hass::AlignParams p) {
  using S = AlignDqSmem<T, D>;
  constexpr int DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kBM * S::kLd;
  T* s_k = s_do + kBM * S::kLd;
  T* s_v = s_k + kBM * S::kLd;
  T* s_ds = s_v + kBM * S::kLd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int t0 = blockIdx.x * kBM;
  const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.T;
  load_rows<T, D>(s_q, S::kLd, kBM, [&](int r) { return t0 + r < p.T ? row_ptr<T>(p.q, b, h, t0 + r) : nullptr; });
  load_rows<T, D>(s_do, S::kLd, kBM, [&](int r) { return t0 + r < p.T ? row_ptr<T>(p.dout, b, h, t0 + r) : nullptr; });
  __syncthreads();  // s_q / s_do are read per warp below, also when the level-0 loop has no iteration
  float lse[2], dl[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = t0 + warp * 16 + g + 8 * hh;
    lse[hh] = row < p.T ? p.lse[row_base + row] : -INFINITY;
    dl[hh] = row < p.T ? p.delta[row_base + row] : 0.f;
  }
  float dq[DT][4];
  zero(dq);
  const STile<T> q_w{s_q + warp * 16 * S::kLd, S::kLd}, do_w{s_do + warp * 16 * S::kLd, S::kLd};
  const STile<T> k_t{s_k, S::kLd}, v_t{s_v, S::kLd}, ds_w{s_ds + warp * 16 * S::kLdP, S::kLdP};
  const int last = static_cast<int>(hass::align_level0_last(min(t0 + kBM, p.T) - 1, p.F));
  for (int c0 = 0; c0 <= last; c0 += kBN) {
    __syncthreads();
    load_rows<T, D>(s_k, S::kLd, kBN, [&](int r) { return c0 + r <= last ? level_ptr<T>(p.k, 0, b, hk, c0 + r) : nullptr; });
    load_rows<T, D>(s_v, S::kLd, kBN, [&](int r) { return c0 + r <= last ? level_ptr<T>(p.v, 0, b, hk, c0 + r) : nullptr; });
    __syncthreads();
    float s[kNT][4], dp[kNT][4];
    zero(s);
    zero(dp);
    warp_gemm<T, kNT, true>(s, q_w, k_t, D);
    warp_gemm<T, kNT, true>(dp, do_w, v_t, D);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = t0 + warp * 16 + g + 8 * hh, c = c0 + nt * 8 + 2 * t + e;
          const bool vis = row < p.T && c <= hass::align_level0_last(row, p.F);
          const float pr = vis ? hass::softmax_weight(s[nt][2 * hh + e] * p.scale, lse[hh]) : 0.f;
          s[nt][2 * hh + e] = pr * (dp[nt][2 * hh + e] - dl[hh]);
        }
    store_frag<T>(ds_w, s);
    __syncwarp();
    warp_gemm<T, DT, false>(dq, ds_w, k_t, kBN);
    __syncwarp();
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = g + 8 * hh, row = t0 + warp * 16 + r;
    for (int i = 1; i < p.F; ++i) {  // uniform over the warp (quad reductions)
      const int64_t c = row < p.T ? hass::align_diag_col(row, p.F, i) : -1;
      const T* kr = c >= 0 ? level_ptr<T>(p.k, i, b, hk, c) : nullptr;
      const T* vr = c >= 0 ? level_ptr<T>(p.v, i, b, hk, c) : nullptr;
      const float s = quad_row_dot<T, D>(q_w, r, kr) * p.scale;
      const float dpv = quad_row_dot<T, D>(do_w, r, vr);
      if (!kr) continue;
      const float ds = hass::softmax_weight(s, lse[hh]) * (dpv - dl[hh]);
#pragma unroll
      for (int j = 0; j < DT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) dq[j][2 * hh + e] += ds * Io<T>::to(kr[j * 8 + 2 * t + e]);
    }
    if (row >= p.T) continue;
    T* dst = row_ptr_w<T>(p.dq, b, h, row);
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) dst[j * 8 + 2 * t + e] = Io<T>::from(dq[j][2 * hh + e] * p.scale);
  }
}

template <typename T, int D>
struct AlignDkvSmem {
  static constexpr int kLd = padded<T>(D), kLdP = padded<T>(kBN);
  static size_t bytes() { return sizeof(T) * (4 * kBM * kLd + kWarps * 16 * kLdP) + sizeof(float) * 2 * kBN; }
};

// Level-0 dk/dv for 64 keys of one kv head (16 per warp), looping over the query tiles of every head in the
// group that see them (rows t >= c + F - 1). Works on transposed scores: s^T = K Q^T.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) align_dkv_kernel(hass::AlignParams p) {
  using S = AlignDkvSmem<T, D>;
  constexpr int DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  float* s_lse = reinterpret_cast<float*>(smem);
  float* s_dl = s_lse + kBN;
  T* s_k = reinterpret_cast<T*>(s_dl + kBN);
  T* s_v = s_k + kBM * S::kLd;
  T* s_q = s_v + kBM * S::kLd;
  T* s_do = s_q + kBN * S::kLd;
  T* s_pt = s_do + kBN * S::kLd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv, grp = p.Hq / p.Hkv;
  const int c0 = blockIdx.x * kBM;
  load_rows<T, D>(s_k, S::kLd, kBM, [&](int r) { return c0 + r < p.T ? level_ptr<T>(p.k, 0, b, hk, c0 + r) : nullptr; });
  load_rows<T, D>(s_v, S::kLd, kBM, [&](int r) { return c0 + r < p.T ? level_ptr<T>(p.v, 0, b, hk, c0 + r) : nullptr; });
  float dk[DT][4], dv[DT][4];
  zero(dk);
  zero(dv);
  const STile<T> k_w{s_k + warp * 16 * S::kLd, S::kLd}, v_w{s_v + warp * 16 * S::kLd, S::kLd};
  const STile<T> q_t{s_q, S::kLd}, do_t{s_do, S::kLd}, pt_w{s_pt + warp * 16 * S::kLdP, S::kLdP};
  const int first = ((c0 + p.F - 1) / kBN) * kBN;  // first query tile holding a row that sees key c0
  for (int hh = 0; hh < grp; ++hh) {
    const int h = hk * grp + hh;
    const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.T;
    for (int t0 = first; t0 < p.T; t0 += kBN) {
      __syncthreads();
      load_rows<T, D>(s_q, S::kLd, kBN, [&](int r) { return t0 + r < p.T ? row_ptr<T>(p.q, b, h, t0 + r) : nullptr; });
      load_rows<T, D>(s_do, S::kLd, kBN, [&](int r) { return t0 + r < p.T ? row_ptr<T>(p.dout, b, h, t0 + r) : nullptr; });
      for (int r = threadIdx.x; r < kBN; r += blockDim.x) {
        s_lse[r] = t0 + r < p.T ? p.lse[row_base + t0 + r] : -INFINITY;
        s_dl[r] = t0 + r < p.T ? p.delta[row_base + t0 + r] : 0.f;
      }
      __syncthreads();
      float st[kNT][4], dpt[kNT][4];
      zero(st);
      zero(dpt);
      warp_gemm<T, kNT, true>(st, k_w, q_t, D);
      warp_gemm<T, kNT, true>(dpt, v_w, do_t, D);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = c0 + warp * 16 + g + 8 * kh, r = nt * 8 + 2 * t + e, row = t0 + r;
            const bool vis = c < p.T && row < p.T && c <= hass::align_level0_last(row, p.F);
            st[nt][2 * kh + e] = vis ? hass::softmax_weight(st[nt][2 * kh + e] * p.scale, s_lse[r]) : 0.f;
            dpt[nt][2 * kh + e] = st[nt][2 * kh + e] * (dpt[nt][2 * kh + e] - s_dl[r]);
          }
      store_frag<T>(pt_w, st);
      __syncwarp();
      warp_gemm<T, DT, false>(dv, pt_w, do_t, kBN);
      __syncwarp();
      store_frag<T>(pt_w, dpt);
      __syncwarp();
      warp_gemm<T, DT, false>(dk, pt_w, q_t, kBN);
      __syncwarp();
    }
  }
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    const int c = c0 + warp * 16 + g + 8 * kh;
    if (c >= p.T) continue;
    T* dkr = level_ptr_w<T>(p.dk, 0, b, hk, c);
    T* dvr = level_ptr_w<T>(p.dv, 0, b, hk, c);
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        dkr[j * 8 + 2 * t + e] = Io<T>::from(dk[j][2 * kh + e] * p.scale);
        dvr[j * 8 + 2 * t + e] = Io<T>::from(dv[j][2 * kh + e]);
      }
  }
}

// dk/dv of the diagonal levels i >= 1: key c of level i is seen by row c + (F-1) - i of each group head only.
// One warp per (b, kv head, level, key).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) align_dkv_diag_kernel(hass::AlignParams p) {
  const int levels = p.F - 1, grp = p.Hq / p.Hkv, lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (w >= static_cast<int64_t>(p.B) * p.Hkv * levels * p.T) return;
  const int c = static_cast<int>(w % p.T);
  const int i = static_cast<int>((w / p.T) % levels) + 1;
  const int hk = static_cast<int>((w / (static_cast<int64_t>(p.T) * levels)) % p.Hkv);
  const int b = static_cast<int>(w / (static_cast<int64_t>(p.T) * levels * p.Hkv));
  constexpr int J = D / 32;
  float kk[J], vv[J], dk[J], dv[J];
  const T* kr = level_ptr<T>(p.k, i, b, hk, c);
  const T* vr = level_ptr<T>(p.v, i, b, hk, c);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    kk[j] = Io<T>::to(kr[j * 32 + lane]);
    vv[j] = Io<T>::to(vr[j * 32 + lane]);
    dk[j] = dv[j] = 0.f;
  }
  const int64_t row = hass::align_diag_row(c, p.F, i, p.T);
  if (row >= 0)
    for (int hh = 0; hh < grp; ++hh) {
      const int h = hk * grp + hh;
      const T* qr = row_ptr<T>(p.q, b, h, row);
      const T* gr = row_ptr<T>(p.dout, b, h, row);
      float qv[J], gv[J], s = 0.f, dp = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        qv[j] = Io<T>::to(qr[j * 32 + lane]);
        gv[j] = Io<T>::to(gr[j * 32 + lane]);
        s += qv[j] * kk[j];
        dp += gv[j] * vv[j];
      }
      s = warp_sum(s) * p.scale;
      dp = warp_sum(dp);
      const int64_t ri = (static_cast<int64_t>(b) * p.Hq + h) * p.T + row;
      const float pr = hass::softmax_weight(s, p.lse[ri]);
      const float ds = pr * (dp - p.delta[ri]);
#pragma unroll
      for (int j = 0; j < J; ++j) {
        dv[j] += pr * gv[j];
        dk[j] += ds * qv[j];
      }
    }
  T* dkr = level_ptr_w<T>(p.dk, i, b, hk, c);
  T* dvr = level_ptr_w<T>(p.dv, i, b, hk, c);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    dkr[j * 32 + lane] = Io<T>::from(dk[j] * p.scale);
    dvr[j * 32 + lane] = Io<T>::from(dv[j]);
  }
}

// ==== launchers ==========================================================================================

// Kernels with more than 48 KiB of dynamic shared memory must opt in before their launch.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// Merges the splits' partial outputs (p.splits > 1).
template <typename T, int D>
cudaError_t tree_combine_launch(const hass::TreeAttnParams& p, cudaStream_t stream) {
  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
  if (total_rows == 0) return cudaSuccess;
  tree_combine_kernel<T, D><<<static_cast<unsigned>((total_rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The fallback tree-attention kernel (any dtype, head dim 64/128): the splits deal the key tiles out evenly.
template <typename T, int D>
cudaError_t tree_launch(const hass::TreeAttnParams& p, cudaStream_t stream) {
  const int rows = (p.Hq / p.Hkv) * p.n;
  const dim3 grid((rows + kBM - 1) / kBM, p.B * p.Hkv, p.splits);
  const size_t smem = TreeSmem<T, D>::bytes(hass::mask_words(p.n));
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  cudaError_t err = allow_smem(tree_attention_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  tree_attention_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess || p.splits == 1) return err;
  return tree_combine_launch<T, D>(p, stream);
}

// The rank-order kernel: kRankRows rows of a (batch, KV head) group per CTA, one split per chunk of ranks
// (p.splits = rank_chunks(L)).
template <typename T, int D>
cudaError_t tree_rank_launch(const hass::TreeAttnParams& p, cudaStream_t stream) {
  const int rows = (p.Hq / p.Hkv) * p.n;
  const dim3 grid((rows + kRankRows - 1) / kRankRows, p.B * p.Hkv, p.splits);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  tree_attention_rank_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  return tree_combine_launch<T, D>(p, stream);
}

template <typename T, int D>
cudaError_t align_fwd_launch(const hass::AlignParams& p, cudaStream_t stream) {
  const dim3 grid((p.T + kBM - 1) / kBM, p.B * p.Hq);
  const size_t smem = AlignFwdSmem<T, D>::bytes();
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  cudaError_t err = allow_smem(align_fwd_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  align_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t align_bwd_launch(const hass::AlignParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.T;
  if (rows == 0) return cudaSuccess;
  align_delta_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 gq((p.T + kBM - 1) / kBM, p.B * p.Hq);
  const size_t smem_q = AlignDqSmem<T, D>::bytes();
  if ((err = allow_smem(align_dq_kernel<T, D>, smem_q)) != cudaSuccess) return err;
  align_dq_kernel<T, D><<<gq, kThreads, smem_q, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const dim3 gk((p.T + kBM - 1) / kBM, p.B * p.Hkv);
  const size_t smem_k = AlignDkvSmem<T, D>::bytes();
  if ((err = allow_smem(align_dkv_kernel<T, D>, smem_k)) != cudaSuccess) return err;
  align_dkv_kernel<T, D><<<gk, kThreads, smem_k, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.F > 1) {
    const int64_t warps = static_cast<int64_t>(p.B) * p.Hkv * (p.F - 1) * p.T;
    align_dkv_diag_kernel<T, D><<<static_cast<unsigned>((warps + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

// Dispatch over dtype and head dim (64, 128).
#define HASS_ATTN_DISPATCH(dtype, D, FN, ...)                                         \
  do {                                                                                \
    if ((D) != 64 && (D) != 128) return cudaErrorInvalidValue;                        \
    switch (dtype) {                                                                  \
      case hass::kAttnF32:                                                            \
        return (D) == 64 ? FN<float, 64>(__VA_ARGS__) : FN<float, 128>(__VA_ARGS__); \
      case hass::kAttnBF16:                                                           \
        return (D) == 64 ? FN<__nv_bfloat16, 64>(__VA_ARGS__)                         \
                         : FN<__nv_bfloat16, 128>(__VA_ARGS__);                       \
      case hass::kAttnF16:                                                            \
        return (D) == 64 ? FN<__half, 64>(__VA_ARGS__) : FN<__half, 128>(__VA_ARGS__); \
      default:                                                                        \
        return cudaErrorInvalidValue;                                                 \
    }                                                                                 \
  } while (0)

}  // namespace

namespace {

int sm_count() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// Prefix keys per split under the plan of hass/attention.h.
int tree_chunk(const hass::TreeAttnParams& p) {
  return hass::tree_chunk_keys(p.L - p.n, p.B * p.Hkv, sm_count());
}

}  // namespace

// Number of splits of a tree-attention launch: for trees of up to kRankMaxNodes nodes the rank chunks of the
// rank-order kernel; above, the prefix chunks of the split plan in hass/attention.h plus the tree split. The
// partial outputs need p->o_part [splits, B*Hq*n, D] and p->lse_part [splits, B*Hq*n] (fp32) when it
// is above 1.
extern "C" int hass_tree_attention_splits_cuda(const hass::TreeAttnParams* p) {
  if (p->n <= hass::kRankMaxNodes) return hass::rank_chunks(p->L);
  return hass::tree_prefix_chunks(p->L - p->n, tree_chunk(*p)) + 1;
}

// Up to kRankMaxNodes tree nodes: the rank-order kernel (row-invariant). Larger trees (a prefill through the
// kernel): bf16/fp16 on Hopper the sm90 kernel (tree_attention_sm90.cu); otherwise the fallback kernel above,
// which takes any p->splits.
extern "C" cudaError_t hass_tree_attention_cuda(const hass::TreeAttnParams* p, int dtype, cudaStream_t stream) {
  if (p->n > hass::kMaxTreeNodes || p->splits < 1) return cudaErrorInvalidValue;
  // Trees of up to kRankMaxNodes nodes (decode steps, verification trees): the rank-order kernel, row-invariant.
  if (p->n <= hass::kRankMaxNodes) {
    if (p->splits != hass::rank_chunks(p->L)) return cudaErrorInvalidValue;
    HASS_ATTN_DISPATCH(dtype, p->D, tree_rank_launch, *p, stream);
  }
  if (hass::cuda::tree_attention_sm90_covers(dtype, p->D) && p->splits == hass_tree_attention_splits_cuda(p)) {
    const cudaError_t err = hass::cuda::tree_attention_sm90(*p, dtype, tree_chunk(*p), stream);
    if (err != cudaSuccess || p->splits == 1) return err;
    HASS_ATTN_DISPATCH(dtype, p->D, tree_combine_launch, *p, stream);
  }
  HASS_ATTN_DISPATCH(dtype, p->D, tree_launch, *p, stream);
}

extern "C" cudaError_t hass_align_attention_fwd_cuda(const hass::AlignParams* p, int dtype, cudaStream_t stream) {
  HASS_ATTN_DISPATCH(dtype, p->D, align_fwd_launch, *p, stream);
}

extern "C" cudaError_t hass_align_attention_bwd_cuda(const hass::AlignParams* p, int dtype, cudaStream_t stream) {
  HASS_ATTN_DISPATCH(dtype, p->D, align_bwd_launch, *p, stream);
}
