// CPU kernels of hass::tree_attention and hass::align_attention (+ backward); semantics in
// csrc/include/hass/attention.h.
//
// Flash-style on the CPU: a work item (batch, kv head, block of query rows) walks the visible keys in tiles,
// converting each tile to fp32 once for all query rows of the heads sharing that kv head. The tile products
// (scores, P*V and the backward's gradient products) run as small fp32 GEMMs through ATen's BLAS; the masking
// and online softmax between them are plain vectorisable loops. Nothing of size rows x all-keys is formed.
// A decode-time tree gives a kv head only a few dozen query rows: there the products run as register-blocked
// loops (hass/small_linear.h) on the cache rows in place, since a BLAS call and a tile copy cost more than the work.
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

// ---- small row blocks: register-blocked products instead of BLAS calls -------------------------------
constexpr int64_t kSmallRows = 32;  // work items with at most this many query rows take these

// W: float, or uint16_t holding bf16 (widened exactly as loaded). Key/value rows are ld elements apart.
template <typename W>
struct SmallProducts {
  // s[R, nk] = q[R, d] k[nk, d]^T
  void (*scores)(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s);
  // acc[R, d] += p[R, nk] v[nk, d]
  void (*accumulate)(const float* p, int64_t R, int64_t nk, const W* v, int64_t ldv, int64_t d, float* acc);
};

// Register blocking per level as in small_linear.cpp (a 16-lane vector: 1 zmm, 2 ymm or 4 xmm registers).
template <typename W>
HASS_CPU_V4 void scores_v4(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<4, 4>(q, R, d, k, ldk, d, nullptr, s, nk, 0, nk);
}
template <typename W>
HASS_CPU_V4 void accumulate_v4(const float* p, int64_t R, int64_t nk, const W* v, int64_t ldv, int64_t d, float* acc) {
  hass::sg_acc_rows<8>(p, R, nk, v, ldv, nk, acc, d, d);
}
template <typename W>
HASS_CPU_V3 void scores_v3(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<2, 2>(q, R, d, k, ldk, d, nullptr, s, nk, 0, nk);
}
template <typename W>
HASS_CPU_V3 void accumulate_v3(const float* p, int64_t R, int64_t nk, const W* v, int64_t ldv, int64_t d, float* acc) {
  hass::sg_acc_rows<4>(p, R, nk, v, ldv, nk, acc, d, d);
}
template <typename W>
void scores_baseline(const float* q, int64_t R, int64_t d, const W* k, int64_t ldk, int64_t nk, float* s) {
  hass::sg_rows<1, 2>(q, R, d, k, ldk, d, nullptr, s, nk, 0, nk);
}
template <typename W>
void accumulate_baseline(const float* p, int64_t R, int64_t nk, const W* v, int64_t ldv, int64_t d, float* acc) {
  hass::sg_acc_rows<2>(p, R, nk, v, ldv, nk, acc, d, d);
}

template <typename W>
const SmallProducts<W>& small_products() {
  static const SmallProducts<W> p = hass_cpu::pick(SmallProducts<W>{scores_v4<W>, accumulate_v4<W>},
                                                   SmallProducts<W>{scores_v3<W>, accumulate_v3<W>},
                                                   SmallProducts<W>{scores_baseline<W>, accumulate_baseline<W>});
  return p;
}

// How the small path reads a cache of element type T: fp32 and bf16 rows in place, fp16 through an fp32 tile.
template <typename T>
struct SmallSource {
  using W = float;
  static constexpr bool in_place = std::is_same_v<T, float>;
};
template <>
struct SmallSource<at::BFloat16> {
  using W = uint16_t;
  static constexpr bool in_place = true;
};

// ---- tree_attention ---------------------------------------------------------------------------------
// Rows of a work item: r -> (head hk * g + r / n, node r % n).

// Query rows per work item: kRowBlock, or fewer when that leaves threads idle (a small tree over few kv heads).
inline int64_t tree_row_block(int64_t rows, int64_t groups) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());  // work items wanted
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  if (groups * blocks >= want) return kRowBlock;
  const int64_t per_group = std::min(rows, (want + groups - 1) / groups);
  return std::max<int64_t>(1, (rows + per_group - 1) / per_group);
}

template <typename T>
void tree_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                         const int64_t* prefix_lens, at::Tensor& out, double scale) {
  using Src = SmallSource<T>;
  using W = typename Src::W;
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), g = Hq / Hkv;
  const int64_t rows = g * n, rb = tree_row_block(rows, B * Hkv), blocks = (rows + rb - 1) / rb;
  const int W_ = hass::mask_words(static_cast<int>(n));
  const auto qv = view4<const T>(q), kv = view4<const T>(k), vv = view4<const T>(v);
  const auto ov = view4<T>(out);
  const bool* mp = mask.data_ptr<bool>();
  const SmallProducts<W>& small = small_products<W>();
  // Every work item has at most rb rows: with rb <= kSmallRows over an fp32/bf16 cache none needs fp32 tiles.
  const bool tiles = !(Src::in_place && rb <= kSmallRows);
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    RowState st(rb, d);
    std::vector<uint64_t> words(rb * W_);
    std::vector<float> kt(tiles ? kKeyTile * d : 0), vt(tiles ? kKeyTile * d : 0), s(rb * kKeyTile);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % Hkv, b = w / (blocks * Hkv);
      const int64_t r0 = blk * rb, R = std::min(rb, rows - r0);
      const int64_t prefix = prefix_lens ? prefix_lens[b] : L - n;
      const bool in_place = Src::in_place && R <= kSmallRows;  // always so when !tiles
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * g + (r0 + r) / n, i = (r0 + r) % n;
        load_row(qv.row(b, h, i), d, static_cast<float>(scale), st.q.data() + r * d);
        hass::mask_pack_row(mp + (b * n + i) * n, static_cast<int>(n), words.data() + r * W_);
        st.reset(r, -INFINITY, 0.f);
      }
      // The prefix (no mask) and then the tree block; the padding gap between them is never read.
      for (int part = 0; part < 2; ++part) {
        const int64_t lo = part == 0 ? 0 : L - n, hi = part == 0 ? prefix : L;
        for (int64_t c0 = lo; c0 < hi; c0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, hi - c0);
          // the small products read W rows (in place, or the fp32 tile when W is float); BLAS reads the tile
          const W* kp;
          const W* vp;
          int64_t ldk = d, ldv = d;
          if (in_place) {
            kp = reinterpret_cast<const W*>(kv.row(b, hk, c0));
            vp = reinterpret_cast<const W*>(vv.row(b, hk, c0));
            ldk = kv.ss;
            ldv = vv.ss;
          } else {
            load_tile(kv, b, hk, c0, nk, d, kt.data());
            load_tile(vv, b, hk, c0, nk, d, vt.data());
            kp = reinterpret_cast<const W*>(kt.data());  // read by the small products only when W is float
            vp = reinterpret_cast<const W*>(vt.data());  // (a bf16 cache goes through tiles only for BLAS)
          }
          if (R <= kSmallRows) small.scores(st.q.data(), R, d, kp, ldk, nk, s.data());
          else mm_abt(s.data(), st.q.data(), kt.data(), R, nk, d, false);
          for (int64_t r = 0; r < R; ++r) {
            float* sr = s.data() + r * nk;
            if (part == 1) {
              const uint64_t* wr = words.data() + r * W_;
              for (int64_t j = 0; j < nk; ++j)
                if (!hass::mask_bit(wr, static_cast<int>(c0 + j - lo))) sr[j] = -INFINITY;
            }
            st.softmax_row(r, sr, nk);
          }
          if (R <= kSmallRows) small.accumulate(s.data(), R, nk, vp, ldv, d, st.acc.data());
          else mm_ab_acc(st.acc.data(), s.data(), vt.data(), R, d, nk);
        }
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
