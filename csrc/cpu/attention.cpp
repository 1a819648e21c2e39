// CPU kernels of hass::tree_attention and hass::align_attention (+ backward); semantics in
// csrc/include/hass/attention.h.
//
// Flash-style on the CPU: a work item (batch, kv head, block of query rows) walks the visible keys in tiles with an
// online softmax; nothing of size rows x all-keys is formed.
// Tree attention (decode time: a few dozen query rows per kv head) runs register-blocked products
// (hass/small_linear.h) on the cache rows in place, in every cache dtype, and folds each row's keys in a fixed
// order of ranks, so a row's result does not depend on the tree around it (see tree_attention_impl).
// The alignment attention (training: thousands of rows) converts each key tile to fp32 once for all query rows and
// runs the tile products (scores, P*V, the backward's gradient products) as small fp32 GEMMs through ATen's BLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks/align_attention.h"
#include "checks/tree_attention.h"
#include "cpu_dispatch.h"
#include "hass/attention.h"
#include "hass/small_linear.h"

namespace {

constexpr int64_t kRowBlock = 64;  // query rows per work item
constexpr int64_t kKeyTile = 128;  // keys per tile

// A [B, H, S, D] view with a contiguous last dim.
template <typename T>
struct View4 {
  T* p;
  int64_t sb, sh, ss;
  T* row(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// The F levels of a [F, B, H, S, D] tensor as 4-D views.
template <typename T>
std::vector<View4<T>> level_views(const at::Tensor& x) {
  std::vector<View4<T>> out;
  for (int64_t i = 0; i < x.size(0); ++i) out.push_back(view4<T>(x.select(0, i)));
  return out;
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t x = 0; x < d; ++x) s += a[x] * b[x];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

template <typename T>
inline void load_row(const T* __restrict src, int64_t d, float scale, float* __restrict dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

template <typename T>
inline void store_row(const float* __restrict src, int64_t d, float scale, T* __restrict dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(src[i] * scale);
}

// The per-row loops between the GEMMs, compiled once per instruction-set level (cpu_dispatch.h) and picked at
// load time, so they keep pace with the BLAS calls around them. exp is hass::fast_exp (hass/common.h).

HASS_CPU_CLONES float row_max(const float* s, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// s <- exp(s - m) in place; returns the sum.
HASS_CPU_CLONES float exp_shift_sum(float* s, int64_t n, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = hass::fast_exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Backward of one row: p = exp(s - lse), then s <- p (dp - D) (= ds) and dp <- p.
HASS_CPU_CLONES void grad_row(float* s, float* dp, int64_t n, float lse, float D) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = hass::fast_exp(s[j] - lse);
    s[j] = p * (dp[j] - D);
    dp[j] = p;
  }
}

HASS_CPU_CLONES void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Small fp32 GEMMs on row-major buffers through ATen (BLAS); `acc` adds into C instead of overwriting it.
inline at::Tensor fview(const float* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}
// C[M, N] (+)= A[M, K] B[N, K]^T
void mm_abt(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K, bool acc) {
  auto c = fview(C, M, N);
  if (acc) c.addmm_(fview(A, M, K), fview(B, N, K).t());
  else at::mm_out(c, fview(A, M, K), fview(B, N, K).t());
}
// C[M, N] += A[M, K] B[K, N]
void mm_ab_acc(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K) {
  fview(C, M, N).addmm_(fview(A, M, K), fview(B, K, N));
}
// C[M, N] += A[K, M]^T B[K, N]
void mm_atb_acc(float* C, const float* A, const float* B, int64_t M, int64_t N, int64_t K) {
  fview(C, M, N).addmm_(fview(A, K, M).t(), fview(B, K, N));
}

// Converts keys [c0, c0+nk) of one (b, h) into fp32 rows.
template <typename T>
void load_tile(const View4<const T>& x, int64_t b, int64_t h, int64_t c0, int64_t nk, int64_t d, float* dst) {
  for (int64_t j = 0; j < nk; ++j) load_row(x.row(b, h, c0 + j), d, 1.f, dst + j * d);
}

// Online-softmax state of a block of query rows: running max m, denominator l, unnormalised output acc [R, d].
struct RowState {
  int64_t d;
  std::vector<float> q, m, l, acc;
  RowState(int64_t R, int64_t d_) : d(d_), q(R * d_), m(R), l(R), acc(R * d_) {}
  void reset(int64_t r, float m0, float l0) {
    m[r] = m0;
    l[r] = l0;
    std::fill(acc.begin() + r * d, acc.begin() + (r + 1) * d, 0.f);
  }
  // Turns row r of a score tile (-inf where masked) into probabilities under the updated running max,
  // rescaling the row's accumulator; the caller then adds P * V.
  void softmax_row(int64_t r, float* s, int64_t nk) {
    const float bmax = row_max(s, nk);
    if (bmax == -INFINITY) {
      std::fill(s, s + nk, 0.f);
      return;
    }
    const float mn = hass::online_max(m[r], bmax);
    const float alpha = hass::rescale_factor(m[r], mn);
    if (alpha != 1.f) scale_row(acc.data() + r * d, d, alpha);
    l[r] = l[r] * alpha + exp_shift_sum(s, nk, mn);
    m[r] = mn;
  }
  // Folds one key (score s, value row v) into row r: the diagonal keys of the alignment attention.
  void fold_one(int64_t r, float s, const float* v) {
    const float mn = hass::online_max(m[r], s);
    const float alpha = hass::rescale_factor(m[r], mn), p = hass::softmax_weight(s, mn);
    float* a = acc.data() + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) a[i] = a[i] * alpha + p * v[i];
    l[r] = l[r] * alpha + p;
    m[r] = mn;
  }
  float lse(int64_t r) const { return hass::row_lse(m[r], l[r]); }
};

// ---- tree attention's register-blocked products -----------------------------------------------------
constexpr int64_t kSmallRows = 32;  // query rows per work item at most

// W: float, uint16_t holding bf16 or sg_f16 (widened exactly as loaded). Key/value rows are ld elements apart.
template <typename W>
struct SmallProducts {
  // s[R, nk] = q[R, d] k[nk, d]^T
  void (*scores)(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s);
};

// Register blocking per level as in small_linear.cpp (fp16 keys and values through sg_hw_ptr at v3/v4).
template <typename W>
HASS_CPU_V4 void scores_v4(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<2, 4>(q, R, d, hass::sg_hw_ptr(k), ldk, d, nullptr, s, nk, 0, nk);
}
template <typename W>
HASS_CPU_V3 void scores_v3(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<2, 2>(q, R, d, hass::sg_hw_ptr(k), ldk, d, nullptr, s, nk, 0, nk);
}
template <typename W>
void scores_baseline(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<1, 2>(q, R, d, k, ldk, d, nullptr, s, nk, 0, nk);
}

// One tile of a query row's visible keys folded into its online-softmax state (m, l, acc [d]): scores s[0, nk)
// (turned into probabilities in place), value rows by pointer. Sequential sums, the same code for every tile, so
// the result depends on the scores and value rows of the tile only.
template <typename W>
using FoldFn = void (*)(float* s, int64_t nk, const W* const* vrows, int64_t d, float* acc, float* m, float* l);

template <typename W>
HASS_SG_INLINE void fold_tile(float* s, int64_t nk, const W* const* vrows, int64_t d, float* acc, float* m,
                              float* l) {
  float bmax = -INFINITY;
  for (int64_t j = 0; j < nk; ++j) bmax = s[j] > bmax ? s[j] : bmax;
  if (bmax == -INFINITY) return;  // only -inf scores: nothing to add
  const float mn = hass::online_max(*m, bmax);
  const float alpha = hass::rescale_factor(*m, mn);
  if (alpha != 1.f)
    for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
  for (int64_t j = 0; j < nk; ++j) s[j] = hass::fast_exp(s[j] - mn);  // 0 for a -inf score
  float sum = 0.f;
  for (int64_t j = 0; j < nk; ++j) sum += s[j];  // in key order (no reassociation without -ffast-math)
  *l = *l * alpha + sum;
  *m = mn;
  hass::sg_acc_gather(s, nk, vrows, acc, d);
}

template <typename W>
HASS_CPU_V4 void fold_v4(float* s, int64_t nk, const W* const* vrows, int64_t d, float* acc, float* m, float* l) {
  fold_tile(s, nk, hass::sg_hw_ptr(vrows), d, acc, m, l);
}
template <typename W>
HASS_CPU_V3 void fold_v3(float* s, int64_t nk, const W* const* vrows, int64_t d, float* acc, float* m, float* l) {
  fold_tile(s, nk, hass::sg_hw_ptr(vrows), d, acc, m, l);
}
template <typename W>
void fold_baseline(float* s, int64_t nk, const W* const* vrows, int64_t d, float* acc, float* m, float* l) {
  fold_tile(s, nk, vrows, d, acc, m, l);
}

template <typename W>
struct RankProducts {
  SmallProducts<W> products;
  FoldFn<W> fold;
};

template <typename W>
const RankProducts<W>& rank_products() {
  static const RankProducts<W> p =
      hass_cpu::pick(RankProducts<W>{{scores_v4<W>}, fold_v4<W>},
                     RankProducts<W>{{scores_v3<W>}, fold_v3<W>},
                     RankProducts<W>{{scores_baseline<W>}, fold_baseline<W>});
  return p;
}

// The element type the register-blocked products read a cache of type T as: every cache dtype in place.
template <typename T>
struct SmallSource {
  using W = float;
};
template <>
struct SmallSource<at::BFloat16> {
  using W = uint16_t;
};
template <>
struct SmallSource<at::Half> {
  using W = hass::sg_f16;
};

// ---- tree_attention ---------------------------------------------------------------------------------
// Row invariance. A query row's result is a function of its visible keys in rank order only: the prefix keys
// 0 .. prefix-1, then the tree keys its mask row shows, in node order (a node's ancestors, shallowest first, then
// itself). The ranks are cut into tiles of kRankTile; each tile is folded into the row's online softmax with
// fold_tile, and every score is the same dot product (sg_rows) wherever it is computed. So a tree node at depth d
// over a prefix of P keys gets bit for bit what a one-token decode step gets over the P + d committed keys plus
// itself, whatever the tree's size, the node's index and the rows computed beside it: the decode loop runs its
// vanilla steps through this kernel too (a one-node tree), and that is what its losslessness rests on.
constexpr int64_t kRankTile = 128;

// Rows of a work item: r -> (head hk * g + r / n, node r % n).

// Query rows per work item: at most kSmallRows, fewer when that leaves threads idle (a small tree, few kv heads).
inline int64_t tree_row_block(int64_t rows, int64_t groups) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());  // work items wanted
  const int64_t blocks = (rows + kSmallRows - 1) / kSmallRows;
  if (groups * blocks >= want) return kSmallRows;
  const int64_t per_group = std::min(rows, (want + groups - 1) / groups);
  return std::max<int64_t>(1, (rows + per_group - 1) / per_group);
}

template <typename T>
void tree_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                         const int64_t* prefix_lens, at::Tensor& out, double scale) {
  using W = typename SmallSource<T>::W;
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), g = Hq / Hkv;
  const int64_t rows = g * n, rb = tree_row_block(rows, B * Hkv), blocks = (rows + rb - 1) / rb;
  const auto qv = view4<const T>(q), kv = view4<const T>(k), vv = view4<const T>(v);
  const auto ov = view4<T>(out);
  const bool* mp = mask.data_ptr<bool>();
  const RankProducts<W>& fn = rank_products<W>();
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    RowState st(rb, d);
    std::vector<float> s(rb * kRankTile), s_tail(rb * kRankTile), s_tree(rb * n), sb(kRankTile);
    std::vector<const W*> vrows(kRankTile);
    std::vector<int64_t> visible(rb * n), n_visible(rb);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % Hkv, b = w / (blocks * Hkv);
      const int64_t r0 = blk * rb, R = std::min(rb, rows - r0);
      const int64_t prefix = prefix_lens ? prefix_lens[b] : L - n;
      const auto key = [&](int64_t c) { return reinterpret_cast<const W*>(kv.row(b, hk, c)); };
      const auto value = [&](int64_t c) { return reinterpret_cast<const W*>(vv.row(b, hk, c)); };
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * g + (r0 + r) / n, i = (r0 + r) % n;
        load_row(qv.row(b, h, i), d, static_cast<float>(scale), st.q.data() + r * d);
        const bool* row = mp + (b * n + i) * n;
        n_visible[r] = 0;
        for (int64_t j = 0; j < n; ++j)
          if (row[j]) visible[r * n + n_visible[r]++] = j;
        st.reset(r, -INFINITY, 0.f);
      }
      // Whole prefix tiles: the same keys at the same ranks for every row.
      const int64_t full = prefix / kRankTile * kRankTile, tail = prefix - full;
      for (int64_t c0 = 0; c0 < full; c0 += kRankTile) {
        fn.products.scores(st.q.data(), R, d, key(c0), kv.ss, kRankTile, s.data());
        for (int64_t j = 0; j < kRankTile; ++j) vrows[j] = value(c0 + j);
        for (int64_t r = 0; r < R; ++r)
          fn.fold(s.data() + r * kRankTile, kRankTile, vrows.data(), d, st.acc.data() + r * d, &st.m[r], &st.l[r]);
      }
      // The last, partial prefix tile continues with each row's own visible tree keys.
      if (tail > 0) fn.products.scores(st.q.data(), R, d, key(full), kv.ss, tail, s_tail.data());
      fn.products.scores(st.q.data(), R, d, key(L - n), kv.ss, n, s_tree.data());
      for (int64_t r = 0; r < R; ++r) {
        float* acc = st.acc.data() + r * d;
        int64_t cnt = 0;
        const auto push = [&](float score, const W* vrow) {
          sb[cnt] = score;
          vrows[cnt] = vrow;
          if (++cnt == kRankTile) {
            fn.fold(sb.data(), cnt, vrows.data(), d, acc, &st.m[r], &st.l[r]);
            cnt = 0;
          }
        };
        for (int64_t j = 0; j < tail; ++j) push(s_tail[r * tail + j], value(full + j));
        for (int64_t t = 0; t < n_visible[r]; ++t) {
          const int64_t j = visible[r * n + t];
          push(s_tree[r * n + j], value(L - n + j));
        }
        if (cnt > 0) fn.fold(sb.data(), cnt, vrows.data(), d, acc, &st.m[r], &st.l[r]);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * g + (r0 + r) / n, i = (r0 + r) % n;
        store_row(st.acc.data() + r * d, d, st.l[r] > 0.f ? 1.f / st.l[r] : 0.f, ov.row(b, h, i));
      }
    }
  });
}

at::Tensor tree_attention_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                              const at::Tensor& tree_mask, const c10::optional<at::Tensor>& prefix_lens,
                              double scale) {
  const hass_check::TreeAttnShape shape = hass_check::tree_attention_args(q_, k_, v_, tree_mask, prefix_lens, scale);
  at::Tensor pl;
  if (prefix_lens.has_value()) {
    pl = prefix_lens->contiguous();
    hass_check::tree_attention_prefix_values(pl, shape);
  }
  const auto q = q_.stride(-1) == 1 ? q_ : q_.contiguous();
  const auto k = k_.stride(-1) == 1 ? k_ : k_.contiguous();
  const auto v = v_.stride(-1) == 1 ? v_ : v_.contiguous();
  const auto mask = tree_mask.contiguous();
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_cpu", [&] {
    tree_attention_impl<scalar_t>(q, k, v, mask, pl.defined() ? pl.data_ptr<int64_t>() : nullptr, out, scale);
  });
  return out;
}

// ---- align_attention ---------------------------------------------------------------------------------
// Rows of a work item are ordered position-major (r -> t = r / g, head hk * g + r % g) so that the rows of one
// position share their level-0 keys; the diagonal keys are single row-wise dot products.

struct AlignGeom {
  int64_t B, Hq, Hkv, g, T, d;
  int F;
  float scale;
};

AlignGeom align_geom(const at::Tensor& q, const at::Tensor& kl, double scale) {
  AlignGeom a;
  a.B = q.size(0); a.Hq = q.size(1); a.T = q.size(2); a.d = q.size(3);
  a.F = static_cast<int>(kl.size(0)); a.Hkv = kl.size(2); a.g = a.Hq / a.Hkv;
  a.scale = static_cast<float>(scale);
  return a;
}

// Masks a level-0 score tile (rows r0.., keys c0..) to c <= t - (F-1).
inline void mask_level0(float* s, int64_t R, int64_t nk, int64_t c0, const AlignGeom& a, int64_t r0) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t lim = hass::align_level0_last((r0 + r) / a.g, a.F);
    for (int64_t j = std::max<int64_t>(0, lim - c0 + 1); j < nk; ++j) s[r * nk + j] = -INFINITY;
  }
}

template <typename T>
void align_forward_impl(const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl, bool leaky,
                        const AlignGeom& a, at::Tensor& out, at::Tensor& lse) {
  const int64_t rows = a.T * a.g, blocks = (rows + kRowBlock - 1) / kRowBlock, d = a.d;
  const auto qv = view4<const T>(q);
  const auto ks = level_views<const T>(kl), vs = level_views<const T>(vl);
  const auto ov = view4<T>(out);
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, a.B * a.Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    RowState st(kRowBlock, d);
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), s(kRowBlock * kKeyTile);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % a.Hkv, b = w / (blocks * a.Hkv);
      const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / a.g, h = hk * a.g + (r0 + r) % a.g;
        load_row(qv.row(b, h, t), d, a.scale, st.q.data() + r * d);
        float m0, l0;
        hass::align_initial_state(t, a.T, leaky, &m0, &l0);
        st.reset(r, m0, l0);
      }
      // Level 0: keys c <= t - (F-1), a causal block shifted by F-1.
      const int64_t last = hass::align_level0_last((r0 + R - 1) / a.g, a.F);
      for (int64_t c0 = 0; c0 <= last; c0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, last + 1 - c0);
        load_tile(ks[0], b, hk, c0, nk, d, kt.data());
        load_tile(vs[0], b, hk, c0, nk, d, vt.data());
        mm_abt(s.data(), st.q.data(), kt.data(), R, nk, d, false);
        mask_level0(s.data(), R, nk, c0, a, r0);
        for (int64_t r = 0; r < R; ++r) st.softmax_row(r, s.data() + r * nk, nk);
        mm_ab_acc(st.acc.data(), s.data(), vt.data(), R, d, nk);
      }
      // Levels 1..F-1: one key each, c = t - (F-1) + i.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / a.g, h = hk * a.g + (r0 + r) % a.g;
        for (int i = 1; i < a.F; ++i) {
          const int64_t c = hass::align_diag_col(t, a.F, i);
          if (c < 0) continue;
          load_row(ks[i].row(b, hk, c), d, 1.f, kt.data());
          load_row(vs[i].row(b, hk, c), d, 1.f, vt.data());
          st.fold_one(r, dot(st.q.data() + r * d, kt.data(), d), vt.data());
        }
        store_row(st.acc.data() + r * d, d, st.l[r] > 0.f ? 1.f / st.l[r] : 0.f, ov.row(b, h, t));
        lp[(b * a.Hq + h) * a.T + t] = st.lse(r);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> align_attention_cpu(const at::Tensor& q_, const at::Tensor& k_levels,
                                                       const at::Tensor& v_levels, double scale, bool leaky) {
  hass_check::align_attention_forward_args(q_, k_levels, v_levels, scale);
  const auto q = q_.stride(-1) == 1 ? q_ : q_.contiguous();
  const auto kl = k_levels.stride(-1) == 1 ? k_levels : k_levels.contiguous();
  const auto vl = v_levels.stride(-1) == 1 ? v_levels : v_levels.contiguous();
  const AlignGeom a = align_geom(q, kl, scale);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({a.B, a.Hq, a.T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "align_attention_cpu", [&] {
    align_forward_impl<scalar_t>(q, kl, vl, leaky, a, out, lse);
  });
  return {out, lse};
}

// Backward (flash-style, from the saved log-sum-exp): with p = exp(s - lse), dp = dO.v and D = dO.O,
// ds = p (dp - D); dq = scale * sum ds k, dk = scale * sum ds q, dv = sum p dO. Three passes write disjoint
// outputs, so there are no accumulation races: dq by query rows, level-0 dk/dv by key blocks, and the
// diagonal levels' dk/dv by key.
template <typename T>
void align_backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl,
                         const at::Tensor& out, const at::Tensor& lse, const AlignGeom& a, at::Tensor& dq,
                         at::Tensor& dkl, at::Tensor& dvl) {
  const int64_t d = a.d, T_ = a.T, g = a.g;
  const auto qv = view4<const T>(q), gv = view4<const T>(dout), ov = view4<const T>(out);
  const auto ks = level_views<const T>(kl), vs = level_views<const T>(vl);
  const auto dks = level_views<T>(dkl), dvs = level_views<T>(dvl);
  const auto dqv = view4<T>(dq);
  const float* lp = lse.data_ptr<float>();
  auto delta = at::empty({a.B, a.Hq, T_}, lse.options());
  float* Dp = delta.data_ptr<float>();
  at::parallel_for(0, a.B * a.Hq, 1, [&](int64_t w0, int64_t w1) {  // D = rowsum(dO * O)
    std::vector<float> x(d), y(d);
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t t = 0; t < T_; ++t) {
        load_row(gv.row(w / a.Hq, w % a.Hq, t), d, 1.f, x.data());
        load_row(ov.row(w / a.Hq, w % a.Hq, t), d, 1.f, y.data());
        Dp[w * T_ + t] = dot(x.data(), y.data(), d);
      }
  });
  auto row_index = [&](int64_t b, int64_t h, int64_t t) { return (b * a.Hq + h) * T_ + t; };
  // s (scores, -inf where masked) and dp tiles -> ds in place of s, p in place of dp (when wanted).
  auto grad_tile = [&](float* s, float* dp, int64_t R, int64_t nk, const float* row_lse, const float* row_D) {
    for (int64_t r = 0; r < R; ++r) {
      if (row_lse[r] == -INFINITY) {  // cannot happen for a real row (its own key is always visible)
        std::fill(s + r * nk, s + (r + 1) * nk, 0.f);
        std::fill(dp + r * nk, dp + (r + 1) * nk, 0.f);
      } else {
        grad_row(s + r * nk, dp + r * nk, nk, row_lse[r], row_D[r]);
      }
    }
  };
  // One (row, single key) pair of a diagonal level: returns ds, sets p.
  auto grad_pair = [&](const float* qs, const float* go, int64_t ri, const float* kk, const float* vv, float* p) {
    *p = hass::softmax_weight(dot(qs, kk, d), lp[ri]);
    return *p * (dot(go, vv, d) - Dp[ri]);
  };

  // Pass 1: dq, by blocks of query rows (position-major as in the forward).
  const int64_t rows = T_ * g, blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, a.B * a.Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qs(kRowBlock * d), go(kRowBlock * d), acc(kRowBlock * d), rl(kRowBlock), rd(kRowBlock);
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), s(kRowBlock * kKeyTile), dp(kRowBlock * kKeyTile);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % a.Hkv, b = w / (blocks * a.Hkv);
      const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / g, h = hk * g + (r0 + r) % g;
        load_row(qv.row(b, h, t), d, a.scale, qs.data() + r * d);
        load_row(gv.row(b, h, t), d, 1.f, go.data() + r * d);
        std::fill(acc.begin() + r * d, acc.begin() + (r + 1) * d, 0.f);
        rl[r] = lp[row_index(b, h, t)];
        rd[r] = Dp[row_index(b, h, t)];
      }
      const int64_t last = hass::align_level0_last((r0 + R - 1) / g, a.F);
      for (int64_t c0 = 0; c0 <= last; c0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, last + 1 - c0);
        load_tile(ks[0], b, hk, c0, nk, d, kt.data());
        load_tile(vs[0], b, hk, c0, nk, d, vt.data());
        mm_abt(s.data(), qs.data(), kt.data(), R, nk, d, false);
        mm_abt(dp.data(), go.data(), vt.data(), R, nk, d, false);
        mask_level0(s.data(), R, nk, c0, a, r0);
        grad_tile(s.data(), dp.data(), R, nk, rl.data(), rd.data());
        mm_ab_acc(acc.data(), s.data(), kt.data(), R, d, nk);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / g, h = hk * g + (r0 + r) % g, ri = row_index(b, h, t);
        for (int i = 1; i < a.F; ++i) {
          const int64_t c = hass::align_diag_col(t, a.F, i);
          if (c < 0) continue;
          load_row(ks[i].row(b, hk, c), d, 1.f, kt.data());
          load_row(vs[i].row(b, hk, c), d, 1.f, vt.data());
          float p;
          axpy(grad_pair(qs.data() + r * d, go.data() + r * d, ri, kt.data(), vt.data(), &p), kt.data(),
               acc.data() + r * d, d);
        }
        store_row(acc.data() + r * d, d, a.scale, dqv.row(b, h, t));
      }
    }
  });

  // Pass 2: level-0 dk/dv, by blocks of keys; key c is seen by the rows t >= c + F - 1 of every group head.
  const int64_t kblocks = (T_ + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, a.B * a.Hkv * kblocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), dk(kKeyTile * d), dv(kKeyTile * d);
    std::vector<float> qs(kRowBlock * d), go(kRowBlock * d), rl(kRowBlock), rd(kRowBlock);
    std::vector<float> s(kRowBlock * kKeyTile), dp(kRowBlock * kKeyTile);
    const AlignGeom one = [&] { AlignGeom x = a; x.g = 1; return x; }();  // rows of one head: r -> t
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t kb = w % kblocks, hk = (w / kblocks) % a.Hkv, b = w / (kblocks * a.Hkv);
      const int64_t c0 = kb * kKeyTile, nk = std::min(kKeyTile, T_ - c0);
      load_tile(ks[0], b, hk, c0, nk, d, kt.data());
      load_tile(vs[0], b, hk, c0, nk, d, vt.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t hh = 0; hh < g; ++hh) {
        const int64_t h = hk * g + hh;
        for (int64_t t0 = c0 + a.F - 1; t0 < T_; t0 += kRowBlock) {
          const int64_t R = std::min(kRowBlock, T_ - t0);
          for (int64_t r = 0; r < R; ++r) {
            load_row(qv.row(b, h, t0 + r), d, a.scale, qs.data() + r * d);
            load_row(gv.row(b, h, t0 + r), d, 1.f, go.data() + r * d);
            rl[r] = lp[row_index(b, h, t0 + r)];
            rd[r] = Dp[row_index(b, h, t0 + r)];
          }
          mm_abt(s.data(), qs.data(), kt.data(), R, nk, d, false);
          mm_abt(dp.data(), go.data(), vt.data(), R, nk, d, false);
          mask_level0(s.data(), R, nk, c0, one, t0);
          grad_tile(s.data(), dp.data(), R, nk, rl.data(), rd.data());
          mm_atb_acc(dv.data(), dp.data(), go.data(), nk, d, R);  // dv += p^T dO
          mm_atb_acc(dk.data(), s.data(), qs.data(), nk, d, R);   // dk += ds^T (scale q)
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        store_row(dk.data() + j * d, d, 1.f, dks[0].row(b, hk, c0 + j));
        store_row(dv.data() + j * d, d, 1.f, dvs[0].row(b, hk, c0 + j));
      }
    }
  });

  // Pass 3: diagonal levels i >= 1; key c of level i is seen by row t = c + (F-1) - i only.
  if (a.F > 1) {
    at::parallel_for(0, a.B * a.Hkv * (a.F - 1), 1, [&](int64_t w0, int64_t w1) {
      std::vector<float> kk(d), vv(d), qs(d), go(d), dk(d), dv(d);
      for (int64_t w = w0; w < w1; ++w) {
        const int i = static_cast<int>(w % (a.F - 1)) + 1;
        const int64_t hk = (w / (a.F - 1)) % a.Hkv, b = w / ((a.F - 1) * a.Hkv);
        for (int64_t c = 0; c < T_; ++c) {
          std::fill(dk.begin(), dk.end(), 0.f);
          std::fill(dv.begin(), dv.end(), 0.f);
          const int64_t t = hass::align_diag_row(c, a.F, i, T_);
          if (t >= 0) {
            load_row(ks[i].row(b, hk, c), d, 1.f, kk.data());
            load_row(vs[i].row(b, hk, c), d, 1.f, vv.data());
            for (int64_t hh = 0; hh < g; ++hh) {
              const int64_t h = hk * g + hh;
              load_row(qv.row(b, h, t), d, a.scale, qs.data());
              load_row(gv.row(b, h, t), d, 1.f, go.data());
              float p;
              const float ds = grad_pair(qs.data(), go.data(), row_index(b, h, t), kk.data(), vv.data(), &p);
              axpy(p, go.data(), dv.data(), d);
              axpy(ds, qs.data(), dk.data(), d);
            }
          }
          store_row(dk.data(), d, 1.f, dks[i].row(b, hk, c));
          store_row(dv.data(), d, 1.f, dvs[i].row(b, hk, c));
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_attention_backward_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_levels, const at::Tensor& v_levels,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  hass_check::align_attention_backward_args(dout_, q_, k_levels, v_levels, out_, lse_, scale);
  const auto dout = dout_.stride(-1) == 1 ? dout_ : dout_.contiguous();
  const auto q = q_.stride(-1) == 1 ? q_ : q_.contiguous();
  const auto kl = k_levels.stride(-1) == 1 ? k_levels : k_levels.contiguous();
  const auto vl = v_levels.stride(-1) == 1 ? v_levels : v_levels.contiguous();
  const auto out = out_.stride(-1) == 1 ? out_ : out_.contiguous();
  const auto lse = lse_.contiguous();
  const AlignGeom a = align_geom(q, kl, scale);
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dkl = at::empty(kl.sizes(), kl.options().memory_format(at::MemoryFormat::Contiguous));
  auto dvl = at::empty(vl.sizes(), vl.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return {dq, dkl.zero_(), dvl.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "align_attention_backward_cpu", [&] {
    align_backward_impl<scalar_t>(dout, q, kl, vl, out, lse, a, dq, dkl, dvl);
  });
  return {dq, dkl, dvl};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) {
  m.impl("tree_attention", &tree_attention_cpu);
  m.impl("align_attention", &align_attention_cpu);
  m.impl("align_attention_backward", &align_attention_backward_cpu);
}
