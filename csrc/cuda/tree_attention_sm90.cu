// Tree attention for Hopper (built for sm_90a), bf16/fp16, head dim 64 or 128; the split plan and the math are in
// hass/attention.h, the fp32 / other-head-dim fallback and the split merge in attention.cu.
//
// One CTA computes one split of the plan (a chunk of prefix keys, or the tree keys) for up to 256 query rows of
// one (batch, KV head) pair: every tree node of every query head of the GQA group (row r = head-in-group * n +
// node), so each K/V byte of the chunk is read from memory once when grp * n <= 256. 8 warps own 32 rows (two
// m16 tiles) each. K/V arrive in 64-key tiles through cp.async into a 3-stage ring in shared memory (a chunk of
// up to 192 keys is in flight at once); Q is staged once. S = Q K^T and O += P V run on the tensor cores
// (mma.sync m16n8k16, fp32 accumulation): Q and K fragments come through ldmatrix, V through ldmatrix.trans,
// and P never leaves the registers (the accumulator layout of S is the A-operand layout of P V). Scores are
// kept in base 2 (scale * log2 e folded in), so the softmax uses exp2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"
#include "tree_attention_sm90.cuh"

namespace {

using hass::cuda::cp_async_16;
using hass::cuda::cp_async_commit;
using hass::cuda::cp_async_wait;
using hass::cuda::ldmatrix_x4;
using hass::cuda::ldmatrix_x4_trans;
using hass::cuda::mma_16816;
using hass::cuda::pack2f;
using hass::cuda::quad_max;
using hass::cuda::quad_sum;
using hass::cuda::smem_addr;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 32 * kWarps;         // query rows per CTA
constexpr int kKeys = hass::kTreeKeyTile;  // keys per shared-memory tile
constexpr int kStages = 3;                 // K/V tiles in flight
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int D>
struct Layout {
  // Row stride D + 8 elements (16 bytes of padding): the 8 rows one ldmatrix matrix reads start in distinct
  // 16-byte bank groups, so neither ldmatrix nor the cp.async stores conflict.
  static constexpr int kLd = D + 8;
  static constexpr int kQ = kRows * kLd;     // elements of the Q tile
  static constexpr int kTile = kKeys * kLd;  // elements of one K or V tile
  static size_t bytes(int mask_words) {
    return sizeof(uint64_t) * kRows * mask_words + sizeof(T) * (static_cast<size_t>(kQ) + 2 * kStages * kTile);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) tree_attention_sm90_kernel(hass::TreeAttnParams p, int chunk) {
  using Lay = Layout<T, D>;
  constexpr int kLd = Lay::kLd, DT = D / 8, kPieces = D / 8;  // 16-byte pieces per row
  // Keys per score tile held in registers: at head dim 128 the output accumulators take 128 registers a thread,
  // and 32-key score tiles would spill.
  constexpr int kSub = D == 128 ? 16 : 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int W = hass::mask_words(p.n);
  uint64_t* s_mask = reinterpret_cast<uint64_t*>(smem);
  // Shared-memory addresses (32-bit, in bytes) of the Q tile and of the K/V ring (stage s: K tile 2s, V 2s + 1).
  const uint32_t s_q = smem_addr(s_mask + kRows * W);
  const uint32_t s_kv = s_q + sizeof(T) * Lay::kQ;
  constexpr uint32_t kRowBytes = sizeof(T) * kLd, kTileBytes = sizeof(T) * Lay::kTile;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int grp = p.Hq / p.Hkv, rows = grp * p.n;
  const int split = blockIdx.x, r0 = blockIdx.y * kRows;
  const int b = blockIdx.z / p.Hkv, hk = blockIdx.z % p.Hkv;
  const int my_rows = min(kRows, rows - r0);
  const int tree_start = p.L - p.n;
  int prefix = p.prefix_lens ? static_cast<int>(p.prefix_lens[b]) : tree_start;
  prefix = prefix < 0 ? 0 : (prefix > tree_start ? tree_start : prefix);
  const bool tree = split == p.splits - 1;
  const int begin = tree ? tree_start : split * chunk;
  const int end = tree ? p.L : min(begin + chunk, prefix);
  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
  auto row_id = [&](int r) {  // CTA row -> index of (b, head, node) in [B, Hq, n]
    const int rr = r0 + r;
    return (static_cast<int64_t>(b) * p.Hq + hk * grp + rr / p.n) * p.n + rr % p.n;
  };

  if (begin >= end) {  // a chunk past this batch row's prefix: an empty partial, skipped by the merge
    for (int r = tid; r < my_rows; r += kThreads) p.lse_part[split * total_rows + row_id(r)] = -INFINITY;
    return;
  }

  // Q tile (rows past the group's rows are zero-filled).
#pragma unroll
  for (int i = 0; i < kRows * kPieces / kThreads; ++i) {
    const int e = tid + i * kThreads, r = e / kPieces, c = (e % kPieces) * 8, rr = r0 + r;
    const bool ok = rr < rows;
    const T* src = static_cast<const T*>(p.q.p);
    if (ok) src += b * p.q.sb + static_cast<int64_t>(hk * grp + rr / p.n) * p.q.sh + (rr % p.n) * p.q.ss + c;
    cp_async_16(s_q + r * kRowBytes + c * sizeof(T), src, ok ? 16 : 0);
  }
  cp_async_commit();

  const int ntiles = (end - begin + kKeys - 1) / kKeys;
  const T* k_rows = static_cast<const T*>(p.k.p) + b * p.k.sb + hk * p.k.sh;
  const T* v_rows = static_cast<const T*>(p.v.p) + b * p.v.sb + hk * p.v.sh;
  const int64_t k_ss = p.k.ss, v_ss = p.v.ss;
  auto load_tile = [&](int it) {  // K/V tile `it` of the split into its ring slot; keys past the end zero-filled
    const uint32_t sk = s_kv + 2 * (it % kStages) * kTileBytes, sv = sk + kTileBytes;
    const int c0 = begin + it * kKeys, cnt = min(kKeys, end - c0);
#pragma unroll
    for (int i = 0; i < kKeys * kPieces / kThreads; ++i) {
      const int e = tid + i * kThreads, r = e / kPieces, c = (e % kPieces) * 8;
      const bool ok = r < cnt;
      const int64_t key = c0 + r;
      const T* k = ok ? k_rows + key * k_ss + c : k_rows;
      const T* v = ok ? v_rows + key * v_ss + c : v_rows;
      cp_async_16(sk + r * kRowBytes + c * sizeof(T), k, ok ? 16 : 0);
      cp_async_16(sv + r * kRowBytes + c * sizeof(T), v, ok ? 16 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();  // one group per stage, empty or not, so the wait count below stays fixed
  }

  // The ancestor-mask rows of the CTA's queries as 64-bit words (tree split only): one word a thread at a time,
  // its 64 byte loads independent so that they are all in flight together. Read after the loop's first barrier.
  if (tree)
    for (int e = tid; e < kRows * W; e += kThreads) {
      const int r = e / W, w = e % W, rr = r0 + r;
      uint64_t bits = 0;
      if (rr < rows) {
        const bool* row = p.mask + (static_cast<int64_t>(b) * p.n + rr % p.n) * p.n + 64 * w;
        const int cnt = min(64, p.n - 64 * w);
#pragma unroll
        for (int j = 0; j < 64; ++j)
          if (j < cnt && row[j]) bits |= uint64_t{1} << j;
      }
      s_mask[e] = bits;
    }

  float o[2][DT][4], m[2][2], l[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int j = 0; j < DT; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  const float scale2 = p.scale * kLog2e;
  const bool active = warp * 32 < my_rows;  // warp-uniform: a warp with no real row only helps to copy
  // Each lane's ldmatrix row addresses, relative to the tile: Q (A operand: lanes 0-15 rows at k, 16-31 at k+8),
  // K (B operand, non-transposed: matrices = keys 0-7 / 8-15 x dims k / k+8) and V (B, transposed: keys 0-7 /
  // 8-15 x dims n / n+8).
  const uint32_t q_lane = s_q + (warp * 32 + (lane & 15)) * kRowBytes + (lane >> 4) * 16;
  const uint32_t k_lane = ((lane >> 4) * 8 + (lane & 7)) * kRowBytes + ((lane >> 3) & 1) * 16;
  const uint32_t v_lane = (((lane >> 3) & 1) * 8 + (lane & 7)) * kRowBytes + (lane >> 4) * 16;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 1>();  // this thread's copies of Q and of tile `it` have landed ...
    __syncthreads();               // ... and everyone else's
    const uint32_t sk = s_kv + 2 * (it % kStages) * kTileBytes + k_lane;
    const uint32_t sv = s_kv + (2 * (it % kStages) + 1) * kTileBytes + v_lane;
    const int c0 = begin + it * kKeys, cnt = min(kKeys, end - c0);
#pragma unroll
    for (int sub = 0; sub < kKeys / kSub; ++sub) {
      if (!active || sub * kSub >= cnt) break;
      float s[2][kSub / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSub / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
      // S = Q K^T: A = Q rows (ldmatrix x4: lanes 0-15 rows at k, lanes 16-31 rows at k + 8); B = K rows, which
      // are the B operand's columns (x4: 16 keys x 16 dims = two n8 tiles).
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(a[mt], q_lane + mt * 16 * kRowBytes + kk * 32);
#pragma unroll
        for (int np = 0; np < kSub / 16; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, sk + (sub * kSub + np * 16) * kRowBytes + kk * 32);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<T>(s[mt][2 * np], a[mt], kb[0], kb[1]);
            mma_16816<T>(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
          }
        }
      }
      // Visibility, then the online softmax step per row (a row's 4 lanes form a quad).
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = warp * 32 + mt * 16 + g + 8 * h;
          const bool row_ok = r < my_rows;
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kSub / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = sub * kSub + nt * 8 + 2 * t + e;
              bool vis = row_ok && j < cnt;
              if (tree && vis) vis = hass::mask_bit(s_mask + r * W, c0 + j - tree_start);
              float& x = s[mt][nt][2 * h + e];
              x = vis ? x * scale2 : -INFINITY;
              mx = fmaxf(mx, x);
            }
          const float mn = fmaxf(m[mt][h], quad_max(mx));
          const float alpha = m[mt][h] == -INFINITY ? 0.f : exp2f(m[mt][h] - mn);
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kSub / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[mt][nt][2 * h + e];
              x = x == -INFINITY ? 0.f : exp2f(x - mn);
              sum += x;
            }
          l[mt][h] = l[mt][h] * alpha + sum;
          m[mt][h] = mn;
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            o[mt][j][2 * h] *= alpha;
            o[mt][j][2 * h + 1] *= alpha;
          }
        }
      // O += P V: P's A fragments from the S accumulators (n8 tiles 2kk, 2kk+1 = keys 16kk .. 16kk+15); V rows
      // are the B operand's k index (ldmatrix.trans x4: 16 keys x 16 dims = two n8 tiles of O).
#pragma unroll
      for (int kk = 0; kk < kSub / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          a[mt][0] = pack2f<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = pack2f<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = pack2f<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = pack2f<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sv + (sub * kSub + kk * 16) * kRowBytes + dp * 32);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<T>(o[mt][2 * dp], a[mt], vb[0], vb[1]);
            mma_16816<T>(o[mt][2 * dp + 1], a[mt], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this slot before it is refilled
    if (it + kStages < ntiles) load_tile(it + kStages);
    cp_async_commit();
  }
  cp_async_wait<0>();

  if (!active) return;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lt = quad_sum(l[mt][h]);
      const int r = warp * 32 + mt * 16 + g + 8 * h;
      if (r >= my_rows) continue;
      const int64_t id = row_id(r);
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      if (p.splits == 1) {
        const int rr = r0 + r;
        T* dst = static_cast<T*>(p.out.p) + b * p.out.sb + static_cast<int64_t>(hk * grp + rr / p.n) * p.out.sh +
                 (rr % p.n) * p.out.ss;
#pragma unroll
        for (int j = 0; j < DT; ++j)
          *reinterpret_cast<uint32_t*>(dst + j * 8 + 2 * t) =
              pack2f<T>(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
      } else {
        float* dst = p.o_part + (split * total_rows + id) * D;
#pragma unroll
        for (int j = 0; j < DT; ++j)
          *reinterpret_cast<float2*>(dst + j * 8 + 2 * t) = make_float2(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
        if (t == 0) p.lse_part[split * total_rows + id] = lt > 0.f ? m[mt][h] * kLn2 + logf(lt) : -INFINITY;
      }
    }
}

template <typename T, int D>
cudaError_t launch(const hass::TreeAttnParams& p, int chunk, cudaStream_t stream) {
  const int rows = (p.Hq / p.Hkv) * p.n;
  const dim3 grid(p.splits, (rows + kRows - 1) / kRows, p.B * p.Hkv);
  const size_t smem = Layout<T, D>::bytes(hass::mask_words(p.n));
  cudaError_t err = cudaFuncSetAttribute(tree_attention_sm90_kernel<T, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  tree_attention_sm90_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, chunk);
  return cudaGetLastError();
}

}  // namespace

namespace hass {
namespace cuda {

bool tree_attention_sm90_covers(int dtype, int D) {
  if ((dtype != kAttnBF16 && dtype != kAttnF16) || (D != 64 && D != 128)) return false;
  int device = 0, major = 0, smem = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const size_t need = D == 64 ? Layout<__half, 64>::bytes(mask_words(kMaxTreeNodes))
                              : Layout<__half, 128>::bytes(mask_words(kMaxTreeNodes));
  return major >= 9 && static_cast<size_t>(smem) >= need;
}

cudaError_t tree_attention_sm90(const TreeAttnParams& p, int dtype, int chunk, cudaStream_t stream) {
  if (!tree_attention_sm90_covers(dtype, p.D)) return cudaErrorNotSupported;
  if (dtype == kAttnBF16) return p.D == 64 ? launch<__nv_bfloat16, 64>(p, chunk, stream)
                                           : launch<__nv_bfloat16, 128>(p, chunk, stream);
  return p.D == 64 ? launch<__half, 64>(p, chunk, stream) : launch<__half, 128>(p, chunk, stream);
}

}  // namespace cuda
}  // namespace hass
