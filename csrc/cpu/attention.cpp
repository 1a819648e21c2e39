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

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) {
  m.impl("tree_attention", &tree_attention_cpu);
}
