// CPU kernels of hass::tree_attention and hass::align_attention (+ backward); semantics in
// csrc/include/hass/attention.h. Work items are (batch, kv head, block of query rows); the query rows of all
// heads sharing a kv head are processed together so every key tile, converted to fp32 once, serves them all.
// Accumulation is fp32 throughout; bf16/fp16 inputs are converted on load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "hass/attention.h"

namespace {

constexpr int64_t kRowBlock = 32;  // query rows per work item
constexpr int64_t kKeyTile = 64;   // keys per tile

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

inline void scale_row(float a, float* y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] *= a;
}

template <typename T>
inline void load_row(const T* src, int64_t d, float scale, float* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

template <typename T>
inline void store_row(const float* src, int64_t d, float scale, T* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(src[i] * scale);
}

// Online-softmax state of a block of query rows: running max m, denominator l, unnormalised output acc.
struct RowState {
  int64_t R, d;
  std::vector<float> q, m, l, acc;
  RowState(int64_t R_, int64_t d_) : R(R_), d(d_), q(R_ * d_), m(R_), l(R_), acc(R_ * d_) {}
  void reset(int64_t r, float m0, float l0) {
    m[r] = m0;
    l[r] = l0;
    std::fill(acc.begin() + r * d, acc.begin() + (r + 1) * d, 0.f);
  }
  // Folds keys [0, nk) of a tile (scores already in s, -inf where masked) into row r.
  void fold(int64_t r, const float* s, const float* vt, int64_t nk) {
    float bmax = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) bmax = std::max(bmax, s[j]);
    if (bmax == -INFINITY) return;
    const float mn = hass::online_max(m[r], bmax);
    const float alpha = hass::rescale_factor(m[r], mn);
    float* a = acc.data() + r * d;
    if (alpha != 1.f) scale_row(alpha, a, d);
    float sum = 0.f;
    for (int64_t j = 0; j < nk; ++j) {
      const float p = hass::softmax_weight(s[j], mn);
      if (p != 0.f) axpy(p, vt + j * d, a, d);
      sum += p;
    }
    l[r] = l[r] * alpha + sum;
    m[r] = mn;
  }
  float lse(int64_t r) const { return hass::row_lse(m[r], l[r]); }
};

// Converts keys [c0, c0+nk) of one (b, h) into fp32 rows.
template <typename T>
void load_tile(const View4<const T>& x, int64_t b, int64_t h, int64_t c0, int64_t nk, int64_t d, float* dst) {
  for (int64_t j = 0; j < nk; ++j) load_row(x.row(b, h, c0 + j), d, 1.f, dst + j * d);
}

// ---- tree_attention ---------------------------------------------------------------------------------

template <typename T>
void tree_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                         const int64_t* prefix_lens, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), g = Hq / Hkv;
  const int64_t rows = g * n, blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int W = hass::mask_words(static_cast<int>(n));
  const auto qv = view4<const T>(q), kv = view4<const T>(k), vv = view4<const T>(v);
  const auto ov = view4<T>(out);
  const bool* mp = mask.data_ptr<bool>();
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    RowState st(kRowBlock, d);
    std::vector<uint64_t> words(kRowBlock * W);
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), s(kKeyTile);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % Hkv, b = w / (blocks * Hkv);
      const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
      const int64_t prefix = prefix_lens ? prefix_lens[b] : L - n;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * g + (r0 + r) / n, i = (r0 + r) % n;
        load_row(qv.row(b, h, i), d, static_cast<float>(scale), st.q.data() + r * d);
        hass::mask_pack_row(mp + (b * n + i) * n, static_cast<int>(n), words.data() + r * W);
        st.reset(r, -INFINITY, 0.f);
      }
      // The prefix (no mask) and then the tree block; the padding gap between them is never read.
      for (int part = 0; part < 2; ++part) {
        const int64_t lo = part == 0 ? 0 : L - n, hi = part == 0 ? prefix : L;
        for (int64_t c0 = lo; c0 < hi; c0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, hi - c0);
          load_tile(kv, b, hk, c0, nk, d, kt.data());
          load_tile(vv, b, hk, c0, nk, d, vt.data());
          for (int64_t r = 0; r < R; ++r) {
            const uint64_t* wr = words.data() + r * W;
            for (int64_t j = 0; j < nk; ++j)
              s[j] = (part == 0 || hass::tree_key_visible(c0 + j, prefix, L, static_cast<int>(n), wr))
                         ? dot(st.q.data() + r * d, kt.data() + j * d, d)
                         : -INFINITY;
            st.fold(r, s.data(), vt.data(), nk);
          }
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
  auto q = q_.stride(-1) == 1 ? q_ : q_.contiguous();
  auto k = k_.stride(-1) == 1 ? k_ : k_.contiguous();
  auto v = v_.stride(-1) == 1 ? v_ : v_.contiguous();
  const auto mask = tree_mask.contiguous();
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "tree_attention: bad ranks");
  const int64_t B = q.size(0), n = q.size(2), L = k.size(2);
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "tree_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(n <= L && n <= hass::kMaxTreeNodes, "tree_attention: need n <= L and n <= ", hass::kMaxTreeNodes);
  at::Tensor pl;
  if (prefix_lens.has_value()) {
    pl = prefix_lens->contiguous();
    TORCH_CHECK(pl.numel() == B, "tree_attention: prefix_lens must have one entry per batch row");
    const int64_t* p = pl.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(p[b] >= 0 && p[b] <= L - n, "tree_attention: prefix_lens[", b, "] = ", p[b],
                  " is outside [0, L - n] = [0, ", L - n, "]");
  }
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_cpu", [&] {
    tree_attention_impl<scalar_t>(q, k, v, mask, pl.defined() ? pl.data_ptr<int64_t>() : nullptr, out, scale);
  });
  return out;
}

// ---- align_attention ---------------------------------------------------------------------------------
//
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

template <typename T>
std::vector<View4<const T>> level_views(const at::Tensor& x) {
  std::vector<View4<const T>> out;
  for (int64_t i = 0; i < x.size(0); ++i) {
    const auto xi = x.select(0, i);
    out.push_back({static_cast<const T*>(xi.data_ptr()), xi.stride(0), xi.stride(1), xi.stride(2)});
  }
  return out;
}

template <typename T>
void align_forward_impl(const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl, bool leaky,
                        const AlignGeom& a, at::Tensor& out, at::Tensor& lse) {
  const int64_t rows = a.T * a.g, blocks = (rows + kRowBlock - 1) / kRowBlock, d = a.d;
  const auto qv = view4<const T>(q);
  const auto ks = level_views<T>(kl), vs = level_views<T>(vl);
  const auto ov = view4<T>(out);
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, a.B * a.Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    RowState st(kRowBlock, d);
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), s(kKeyTile);
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
        for (int64_t r = 0; r < R; ++r) {
          const int64_t lim = hass::align_level0_last((r0 + r) / a.g, a.F);
          if (lim < c0) continue;
          for (int64_t j = 0; j < nk; ++j)
            s[j] = c0 + j <= lim ? dot(st.q.data() + r * d, kt.data() + j * d, d) : -INFINITY;
          st.fold(r, s.data(), vt.data(), nk);
        }
      }
      // Levels 1..F-1: one key each, c = t - (F-1) + i.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / a.g;
        for (int i = 1; i < a.F; ++i) {
          const int64_t c = hass::align_diag_col(t, a.F, i);
          if (c < 0) continue;
          load_row(ks[i].row(b, hk, c), d, 1.f, kt.data());
          load_row(vs[i].row(b, hk, c), d, 1.f, vt.data());
          s[0] = dot(st.q.data() + r * d, kt.data(), d);
          st.fold(r, s.data(), vt.data(), 1);
        }
        const int64_t h = hk * a.g + (r0 + r) % a.g;
        store_row(st.acc.data() + r * d, d, st.l[r] > 0.f ? 1.f / st.l[r] : 0.f, ov.row(b, h, t));
        lp[(b * a.Hq + h) * a.T + t] = st.lse(r);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> align_attention_cpu(const at::Tensor& q_, const at::Tensor& k_levels,
                                            const at::Tensor& v_levels, double scale, bool leaky) {
  const auto q = q_.stride(-1) == 1 ? q_ : q_.contiguous();
  const auto kl = k_levels.stride(-1) == 1 ? k_levels : k_levels.contiguous();
  const auto vl = v_levels.stride(-1) == 1 ? v_levels : v_levels.contiguous();
  TORCH_CHECK(q.dim() == 4 && kl.dim() == 5 && vl.dim() == 5 && kl.size(0) >= 1, "align_attention: bad ranks");
  TORCH_CHECK(kl.size(2) > 0 && q.size(1) % kl.size(2) == 0, "align_attention: Hq must be a multiple of Hkv");
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
// ds = p (dp - D); dq = scale * sum ds k, dk = scale * sum ds q, dv = sum p dO. Three passes write
// disjoint outputs, so no accumulation races: dq by query rows, level-0 dk/dv by key blocks, and the
// diagonal levels' dk/dv by key.
template <typename T>
void align_backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl,
                         const at::Tensor& out, const at::Tensor& lse, const AlignGeom& a, at::Tensor& dq,
                         at::Tensor& dkl, at::Tensor& dvl) {
  const int64_t d = a.d, T_ = a.T, g = a.g;
  const auto qv = view4<const T>(q), gv = view4<const T>(dout), ov = view4<const T>(out);
  const auto ks = level_views<T>(kl), vs = level_views<T>(vl);
  const auto dqv = view4<T>(dq);
  const float* lp = lse.data_ptr<float>();
  // D = rowsum(dO * O) in fp32.
  auto Dt = at::empty({a.B, a.Hq, T_}, lse.options());
  float* Dp = Dt.data_ptr<float>();
  at::parallel_for(0, a.B * a.Hq, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> x(d), y(d);
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t t = 0; t < T_; ++t) {
        load_row(gv.row(w / a.Hq, w % a.Hq, t), d, 1.f, x.data());
        load_row(ov.row(w / a.Hq, w % a.Hq, t), d, 1.f, y.data());
        Dp[w * T_ + t] = dot(x.data(), y.data(), d);
      }
  });
  auto row_index = [&](int64_t b, int64_t h, int64_t t) { return (b * a.Hq + h) * T_ + t; };
  // ds for one (row, key) pair given the row's scaled query qs, its dO, and the key's k, v.
  auto grad_pair = [&](const float* qs, const float* go, int64_t ri, const float* kk, const float* vv, float* p) {
    const float s = dot(qs, kk, d);
    *p = lp[ri] == -INFINITY ? 0.f : std::exp(s - lp[ri]);
    return *p * (dot(go, vv, d) - Dp[ri]);
  };

  // Pass 1: dq, by blocks of query rows (position-major as in the forward).
  const int64_t rows = T_ * g, blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, a.B * a.Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qs(kRowBlock * d), go(kRowBlock * d), acc(kRowBlock * d);
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w % blocks, hk = (w / blocks) % a.Hkv, b = w / (blocks * a.Hkv);
      const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / g, h = hk * g + (r0 + r) % g;
        load_row(qv.row(b, h, t), d, a.scale, qs.data() + r * d);
        load_row(gv.row(b, h, t), d, 1.f, go.data() + r * d);
        std::fill(acc.begin() + r * d, acc.begin() + (r + 1) * d, 0.f);
      }
      const int64_t last = hass::align_level0_last((r0 + R - 1) / g, a.F);
      for (int64_t c0 = 0; c0 <= last; c0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, last + 1 - c0);
        load_tile(ks[0], b, hk, c0, nk, d, kt.data());
        load_tile(vs[0], b, hk, c0, nk, d, vt.data());
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t = (r0 + r) / g, h = hk * g + (r0 + r) % g, ri = row_index(b, h, t);
          const int64_t lim = std::min(hass::align_level0_last(t, a.F), c0 + nk - 1);
          for (int64_t c = c0; c <= lim; ++c) {
            float p;
            const float ds = grad_pair(qs.data() + r * d, go.data() + r * d, ri, kt.data() + (c - c0) * d,
                                       vt.data() + (c - c0) * d, &p);
            axpy(ds, kt.data() + (c - c0) * d, acc.data() + r * d, d);
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r0 + r) / g, h = hk * g + (r0 + r) % g, ri = row_index(b, h, t);
        for (int i = 1; i < a.F; ++i) {
          const int64_t c = hass::align_diag_col(t, a.F, i);
          if (c < 0) continue;
          load_row(ks[i].row(b, hk, c), d, 1.f, kt.data());
          load_row(vs[i].row(b, hk, c), d, 1.f, vt.data());
          float p;
          const float ds = grad_pair(qs.data() + r * d, go.data() + r * d, ri, kt.data(), vt.data(), &p);
          axpy(ds, kt.data(), acc.data() + r * d, d);
        }
        store_row(acc.data() + r * d, d, a.scale, dqv.row(b, h, t));
      }
    }
  });

  // Pass 2: level-0 dk/dv, by blocks of keys; key c is seen by the rows t >= c + F - 1 of every group head.
  const int64_t kblocks = (T_ + kKeyTile - 1) / kKeyTile;
  auto dk0 = dkl.select(0, 0), dv0 = dvl.select(0, 0);
  const auto dkv = view4<T>(dk0), dvv = view4<T>(dv0);
  at::parallel_for(0, a.B * a.Hkv * kblocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> kt(kKeyTile * d), vt(kKeyTile * d), dk(kKeyTile * d), dv(kKeyTile * d);
    std::vector<float> qs(d), go(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t kb = w % kblocks, hk = (w / kblocks) % a.Hkv, b = w / (kblocks * a.Hkv);
      const int64_t c0 = kb * kKeyTile, nk = std::min(kKeyTile, T_ - c0);
      load_tile(ks[0], b, hk, c0, nk, d, kt.data());
      load_tile(vs[0], b, hk, c0, nk, d, vt.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t t = c0 + a.F - 1; t < T_; ++t) {
        const int64_t cmax = std::min(hass::align_level0_last(t, a.F), c0 + nk - 1);
        for (int64_t hh = 0; hh < g; ++hh) {
          const int64_t h = hk * g + hh, ri = row_index(b, h, t);
          load_row(qv.row(b, h, t), d, a.scale, qs.data());
          load_row(gv.row(b, h, t), d, 1.f, go.data());
          for (int64_t c = c0; c <= cmax; ++c) {
            float p;
            const float ds = grad_pair(qs.data(), go.data(), ri, kt.data() + (c - c0) * d,
                                       vt.data() + (c - c0) * d, &p);
            axpy(p, go.data(), dv.data() + (c - c0) * d, d);
            axpy(ds, qs.data(), dk.data() + (c - c0) * d, d);
          }
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        store_row(dk.data() + j * d, d, 1.f, dkv.row(b, hk, c0 + j));
        store_row(dv.data() + j * d, d, 1.f, dvv.row(b, hk, c0 + j));
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
        auto dki = dkl.select(0, i), dvi = dvl.select(0, i);
        const auto dkv_i = view4<T>(dki), dvv_i = view4<T>(dvi);
        for (int64_t c = 0; c < T_; ++c) {
          std::fill(dk.begin(), dk.end(), 0.f);
          std::fill(dv.begin(), dv.end(), 0.f);
          const int64_t t = hass::align_diag_row(c, a.F, i, T_);
          if (t >= 0) {
            load_row(ks[i].row(b, hk, c), d, 1.f, kk.data());
            load_row(vs[i].row(b, hk, c), d, 1.f, vv.data());
            for (int64_t hh = 0; hh < g; ++hh) {
              const int64_t h = hk * g + hh, ri = row_index(b, h, t);
              load_row(qv.row(b, h, t), d, a.scale, qs.data());
              load_row(gv.row(b, h, t), d, 1.f, go.data());
              float p;
              const float ds = grad_pair(qs.data(), go.data(), ri, kk.data(), vv.data(), &p);
              axpy(p, go.data(), dv.data(), d);
              axpy(ds, qs.data(), dk.data(), d);
            }
          }
          store_row(dk.data(), d, 1.f, dkv_i.row(b, hk, c));
          store_row(dv.data(), d, 1.f, dvv_i.row(b, hk, c));
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_attention_backward_cpu(const at::Tensor& dout_, const at::Tensor& q_,
                                                     const at::Tensor& k_levels, const at::Tensor& v_levels,
                                                     const at::Tensor& out_, const at::Tensor& lse_, double scale) {
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
