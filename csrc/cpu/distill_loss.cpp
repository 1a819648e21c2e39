// CPU kernels of hass::distill_loss, hass::distill_loss_backward and hass::online_softmax_chunk
// (semantics in csrc/include/hass/distill_loss.h).
//
// Each row is streamed in blocks of kBlock columns converted to fp32. Inside a block kLanes independent
// accumulators share the row's running maxima, so the exp/sum loops vectorise without reassociating
// floating-point sums; the lanes are summed once at the end of the row. The row loops are compiled once per
// instruction-set level of cpu_dispatch.h and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks/distill_loss.h"
#include "checks/online_softmax_chunk.h"
#include "cpu_dispatch.h"
#include "hass/distill_loss.h"

#define HASS_INLINE inline __attribute__((always_inline))

namespace {

constexpr int kLanes = 16;
constexpr int kBlock = 512;  // multiple of kLanes

enum class Dt { F32, BF16, F16 };

Dt dt_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kBFloat16: return Dt::BF16;
    case at::kHalf: return Dt::F16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

template <typename T>
HASS_INLINE float to_f32(T x) { return static_cast<float>(x); }

// Converts n <= kBlock elements of row[c0..] to fp32; pads the block to a multiple of kLanes with -inf.
template <typename T>
HASS_INLINE int load_block_t(const T* row, int64_t c0, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = to_f32(row[c0 + i]);
  const int padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int i = n; i < padded; ++i) dst[i] = -INFINITY;
  return padded;
}

HASS_INLINE int load_block(const void* row, Dt dt, int64_t c0, int n, float* dst) {
  switch (dt) {
    case Dt::F32: return load_block_t(static_cast<const float*>(row), c0, n, dst);
    case Dt::BF16: return load_block_t(static_cast<const c10::BFloat16*>(row), c0, n, dst);
    default: return load_block_t(static_cast<const c10::Half*>(row), c0, n, dst);
  }
}

HASS_INLINE float load_one(const void* row, Dt dt, int64_t c) {
  switch (dt) {
    case Dt::F32: return static_cast<const float*>(row)[c];
    case Dt::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(row)[c]);
    default: return static_cast<float>(static_cast<const c10::Half*>(row)[c]);
  }
}

template <typename T>
HASS_INLINE void store_block_t(T* row, int64_t c0, int n, const float* src) {
  for (int i = 0; i < n; ++i) row[c0 + i] = static_cast<T>(src[i]);
}

HASS_INLINE void store_block(void* row, Dt dt, int64_t c0, int n, const float* src) {
  switch (dt) {
    case Dt::F32: return store_block_t(static_cast<float*>(row), c0, n, src);
    case Dt::BF16: return store_block_t(static_cast<c10::BFloat16*>(row), c0, n, src);
    default: return store_block_t(static_cast<c10::Half*>(row), c0, n, src);
  }
}

HASS_INLINE void store_one(void* row, Dt dt, int64_t c, float v) {
  float tmp[1] = {v};
  store_block(row, dt, c, 1, tmp);
}

HASS_INLINE float lane_max(const float* x) {
  float m = x[0];
  for (int j = 1; j < kLanes; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Running top-K of a row: candidates that beat the current threshold are buffered; when the buffer is full a
// selection keeps the best k and raises the threshold. Amortised O(1) per candidate even for adversarial
// (e.g. ascending) rows, where inserting into a sorted list would cost O(k) per element.
class TopK {
 public:
  explicit TopK(int k) : k_(k), cap_(std::max(4 * k, 64)) {}

  void push(float v, int i) {
    if (!hass::topk_before(v, i, thr_v_, thr_i_)) return;
    buf_[n_++] = {v, i};
    if (n_ == cap_) shrink();
  }

  // Scans a block whose maximum is bmax and whose first column is c0 (skipped when nothing in it can enter).
  HASS_INLINE void scan(const float* x, int n, int64_t c0, float bmax) {
    if (k_ == 0 || !hass::topk_before(bmax, static_cast<int>(c0), thr_v_, thr_i_)) return;
    for (int i0 = 0; i0 < n; i0 += kLanes) {  // vectorised pre-check of kLanes columns at a time
      const int i1 = std::min(n, i0 + kLanes);
      bool any = false;
      for (int j = 0; j < kLanes; ++j) any |= x[i0 + j] >= thr_v_;  // x is padded to kLanes with -inf
      if (any)
        for (int i = i0; i < i1; ++i) push(x[i], static_cast<int>(c0 + i));
    }
  }

  // The k best in rank order; missing entries (rows of NaN) become (-inf, sentinel).
  void finish(float* vals, int* idx) {
    if (n_ > k_) shrink();
    std::sort(buf_, buf_ + n_, before);
    for (int j = 0; j < k_; ++j) {
      vals[j] = j < n_ ? buf_[j].v : -INFINITY;
      idx[j] = j < n_ ? buf_[j].i : hass::kTopKSentinelIndex;
    }
  }

 private:
  struct Cand {
    float v;
    int i;
  };
  static bool before(const Cand& a, const Cand& b) { return hass::topk_before(a.v, a.i, b.v, b.i); }
  void shrink() {
    std::nth_element(buf_, buf_ + (k_ - 1), buf_ + n_, before);
    n_ = k_;
    thr_v_ = buf_[k_ - 1].v;
    thr_i_ = buf_[k_ - 1].i;
  }
  static constexpr int kCap = 4 * hass::kMaxTopK;
  int k_, cap_, n_ = 0;
  float thr_v_ = -INFINITY;
  int thr_i_ = hass::kTopKSentinelIndex;
  Cand buf_[kCap];
};

// ---- forward --------------------------------------------------------------------------------------------

struct FwdRow {
  hass::DistillRowOut out;
  float topk_loss, pk;
};

// One row: online statistics of target and draft, the top-K of the target, both loss terms.
HASS_CPU_CLONES
FwdRow forward_row(const void* zrow, Dt zdt, const void* trow, Dt tdt, int64_t V, int k, int* topk_idx) {
  alignas(64) float tb[kBlock], zb[kBlock];
  alignas(64) float st[kLanes] = {}, sz[kLanes] = {}, sa[kLanes] = {}, tmax[kLanes], zmax[kLanes];
  TopK top(k);
  float mt = -INFINITY, mz = -INFINITY;
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - c0));
    const int padded = load_block(trow, tdt, c0, n, tb);
    load_block(zrow, zdt, c0, n, zb);
    for (int j = 0; j < kLanes; ++j) tmax[j] = zmax[j] = -INFINITY;
    for (int i = 0; i < padded; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        tmax[j] = tb[i + j] > tmax[j] ? tb[i + j] : tmax[j];
        zmax[j] = zb[i + j] > zmax[j] ? zb[i + j] : zmax[j];
      }
    const float bt = lane_max(tmax), bz = lane_max(zmax);
    if (bt > mt || bz > mz) {  // new maxima: re-express every lane (rare after the first blocks)
      const float nt = bt > mt ? bt : mt, nz = bz > mz ? bz : mz;
      for (int j = 0; j < kLanes; ++j) {
        const hass::DistillRowStats s = hass::distill_rescale({mt, st[j], mz, sz[j], sa[j]}, nt, nz);
        st[j] = s.st; sz[j] = s.sz; sa[j] = s.a;
      }
      mt = nt; mz = nz;
    }
    const float shift_t = hass::safe_max(mt), shift_z = hass::safe_max(mz);
    // Block partial sums first, then into the row: two-level summation keeps fp32 rounding small at V = 256k.
    alignas(64) float bst[kLanes] = {}, bsz[kLanes] = {}, bsa[kLanes] = {};
    for (int i = 0; i < padded; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float w = hass::fast_exp(tb[i + j] - shift_t);
        bst[j] += w;
        bsz[j] += hass::fast_exp(zb[i + j] - shift_z);
        bsa[j] += hass::distill_cross(w, zb[i + j], mz);
      }
    for (int j = 0; j < kLanes; ++j) {
      st[j] += bst[j]; sz[j] += bsz[j]; sa[j] += bsa[j];
    }
    top.scan(tb, n, c0, bt);
  }
  float vals[hass::kMaxTopK];
  top.finish(vals, topk_idx);
  hass::DistillRowStats s{mt, 0.0f, mz, 0.0f, 0.0f};
  for (int j = 0; j < kLanes; ++j) {
    s.st += st[j]; s.sz += sz[j]; s.a += sa[j];
  }
  FwdRow r;
  r.out = hass::distill_finish(s);
  float tk[hass::kMaxTopK], zk[hass::kMaxTopK];
  for (int j = 0; j < k; ++j) {
    const int v = topk_idx[j] == hass::kTopKSentinelIndex ? 0 : topk_idx[j];
    tk[j] = load_one(trow, tdt, v);
    zk[j] = load_one(zrow, zdt, v);
  }
  r.topk_loss = hass::distill_topk_term(r.out, tk, zk, topk_idx, k, &r.pk);
  return r;
}

double mask_sum(const float* m, int64_t N) {
  double s = 0.0;
  for (int64_t i = 0; i < N; ++i) s += m[i];
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_cpu(const at::Tensor& draft_logits,
                                                                           const at::Tensor& target_logits,
                                                                           const at::Tensor& loss_mask,
                                                                           int64_t topk) {
  const hass_check::DistillShape shape = hass_check::distill_loss_args(draft_logits, target_logits, loss_mask, topk);
  const int64_t N = shape.N, V = shape.V;
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const Dt zdt = dt_of(z, "distill_loss", "draft_logits"), tdt = dt_of(t, "distill_loss", "target_logits");
  const auto f32 = z.options().dtype(at::kFloat);
  auto stats = at::zeros({N, 5}, f32);
  auto idx = at::full({N, topk}, -1, z.options().dtype(at::kLong));
  auto rows = at::zeros({N, 2}, f32);  // per-row ce, topk (unweighted)
  const float* mp = m.data_ptr<float>();
  float* sp = stats.data_ptr<float>();
  float* rp = rows.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const char* zb = static_cast<const char*>(z.data_ptr());
  const char* tb = static_cast<const char*>(t.data_ptr());
  const int64_t zrow = V * z.element_size(), trow = V * t.element_size();
  const int k = static_cast<int>(topk);
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    int kidx[hass::kMaxTopK];
    for (int64_t r = r0; r < r1; ++r) {
      if (mp[r] == 0.0f) continue;  // masked rows are never read
      const FwdRow f = forward_row(zb + r * zrow, zdt, tb + r * trow, tdt, V, k, kidx);
      float* s = sp + r * 5;
      s[0] = f.out.mz; s[1] = f.out.lz; s[2] = f.out.mt; s[3] = f.out.lt; s[4] = f.pk;
      rp[2 * r] = f.out.ce;
      rp[2 * r + 1] = f.topk_loss;
      for (int j = 0; j < k; ++j) ip[r * topk + j] = kidx[j] == hass::kTopKSentinelIndex ? -1 : kidx[j];
    }
  });
  double ce = 0.0, tk = 0.0;
  for (int64_t r = 0; r < N; ++r)
    if (mp[r] != 0.0f) {
      ce += static_cast<double>(mp[r]) * rp[2 * r];
      tk += static_cast<double>(mp[r]) * rp[2 * r + 1];
    }
  const double S = static_cast<double>(static_cast<float>(mask_sum(mp, N)) + 1e-5f);
  return {at::scalar_tensor(ce / S, f32), at::scalar_tensor(tk / S, f32), stats, idx};
}

// ---- backward -------------------------------------------------------------------------------------------

HASS_CPU_CLONES
void backward_row(const void* zrow, Dt zdt, const void* trow, Dt tdt, void* grow, Dt gdt, int64_t V,
                  const hass::DistillRowOut& row, const hass::DistillGradCoef& coef, const int64_t* topk_idx,
                  int k) {
  const hass::DistillRowOut o = row;  // local copies: provably not aliased by the stores, so the loop vectorises
  const hass::DistillGradCoef c = coef;
  alignas(64) float tb[kBlock], zb[kBlock], gb[kBlock];
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - c0));
    const int padded = load_block(trow, tdt, c0, n, tb);
    load_block(zrow, zdt, c0, n, zb);
    for (int i = 0; i < padded; ++i) gb[i] = hass::distill_grad(o, c, zb[i], tb[i], false);
    store_block(grow, gdt, c0, n, gb);
  }
  for (int j = 0; j < k; ++j) {  // the top-K columns get the extra -g_topk p_v term
    const int64_t v = topk_idx[j];
    if (v < 0 || v >= V) continue;  // no entry (a row of NaN)
    store_one(grow, gdt, v, hass::distill_grad(o, c, load_one(zrow, zdt, v), load_one(trow, tdt, v), true));
  }
}

at::Tensor distill_loss_backward_cpu(const at::Tensor& grad_ce, const at::Tensor& grad_topk,
                                     const at::Tensor& draft_logits, const at::Tensor& target_logits,
                                     const at::Tensor& loss_mask, const at::Tensor& stats,
                                     const at::Tensor& topk_idx) {
  const hass_check::DistillShape shape = hass_check::distill_loss_backward_args(
      grad_ce, grad_topk, draft_logits, target_logits, loss_mask, stats, topk_idx);
  const int64_t N = shape.N, V = shape.V;
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const auto st = stats.contiguous(), ix = topk_idx.contiguous();
  const Dt zdt = dt_of(z, "distill_loss_backward", "draft_logits");
  const Dt tdt = dt_of(t, "distill_loss_backward", "target_logits");
  auto grad = at::empty_like(z);
  const float g_ce = grad_ce.item<float>(), g_topk = grad_topk.item<float>();
  const float* mp = m.data_ptr<float>();
  const float S = static_cast<float>(mask_sum(mp, N)) + 1e-5f;
  const float* sp = st.data_ptr<float>();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int k = static_cast<int>(ix.size(1));
  const char* zb = static_cast<const char*>(z.data_ptr());
  const char* tb = static_cast<const char*>(t.data_ptr());
  char* gb = static_cast<char*>(grad.data_ptr());
  const int64_t zrow = V * z.element_size(), trow = V * t.element_size();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (mp[r] == 0.0f) {
        std::fill(gb + r * zrow, gb + (r + 1) * zrow, char(0));  // +0.0 in every float format
        continue;
      }
      const float* s = sp + r * 5;
      hass::DistillRowOut o;
      o.mz = s[0]; o.lz = s[1]; o.mt = s[2]; o.lt = s[3]; o.ce = 0.0f;
      const hass::DistillGradCoef c = hass::distill_grad_coef(mp[r] / S, g_ce, g_topk, s[4]);
      backward_row(zb + r * zrow, zdt, tb + r * trow, tdt, gb + r * zrow, zdt, V, o, c, ip + r * k, k);
    }
  });
  return grad;
}

// ---- online softmax over vocabulary chunks (fused-linear loss) ------------------------------------------

HASS_CPU_CLONES
void chunk_row(const void* xrow, Dt dt, int64_t C, float* state, float* alpha, void* erow, int k, float* vals,
               int* idx, int64_t col0) {
  alignas(64) float xb[kBlock], lmax[kLanes], eb[kBlock];
  TopK top(k);
  for (int j = 0; j < k; ++j)
    if (idx[j] != hass::kTopKSentinelIndex) top.push(vals[j], idx[j]);
  // Pass 1: chunk maximum and top-K (the chunk is small enough to stay in cache for pass 2).
  float cm = -INFINITY;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
    const int padded = load_block(xrow, dt, c0, n, xb);
    for (int j = 0; j < kLanes; ++j) lmax[j] = -INFINITY;
    for (int i = 0; i < padded; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lmax[j] = xb[i + j] > lmax[j] ? xb[i + j] : lmax[j];
    const float bm = lane_max(lmax);
    cm = bm > cm ? bm : cm;
    top.scan(xb, n, col0 + c0, bm);
  }
  top.finish(vals, idx);
  const float m_old = state[0];
  const float m = cm > m_old ? cm : m_old;
  const float shift = hass::safe_max(m);
  *alpha = expf(m_old - shift);
  // Pass 2: exp(x - m), its sum, and the values for the accumulator GEMM.
  alignas(64) float ls[kLanes] = {};
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
    const int padded = load_block(xrow, dt, c0, n, xb);
    for (int i = 0; i < padded; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        eb[i + j] = hass::fast_exp(xb[i + j] - shift);
        ls[j] += eb[i + j];
      }
    if (erow) store_block(erow, dt, c0, n, eb);
  }
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += ls[j];
  state[0] = m;
  state[1] = state[1] * *alpha + s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> online_softmax_chunk_cpu(
    const at::Tensor& logits, const at::Tensor& state, const at::Tensor& topk_val, const at::Tensor& topk_idx,
    int64_t col0, bool want_exp) {
  hass_check::online_softmax_chunk_args(logits, state, topk_val, topk_idx, col0);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto x = logits.contiguous();
  const Dt dt = dt_of(x, "online_softmax_chunk", "logits");
  auto new_state = state.contiguous().clone();
  auto new_val = topk_val.contiguous().clone();
  auto new_idx = topk_idx.contiguous().clone();
  auto alpha = at::empty({N}, state.options());
  auto e = want_exp ? at::empty_like(x) : at::empty({0}, x.options());
  const int k = static_cast<int>(topk_val.size(1));
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* eb = want_exp ? static_cast<char*>(e.data_ptr()) : nullptr;
  const int64_t row = C * x.element_size();
  float* sp = new_state.data_ptr<float>();
  float* ap = alpha.data_ptr<float>();
  float* vp = new_val.data_ptr<float>();
  int64_t* ip = new_idx.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    int kidx[hass::kMaxTopK];
    for (int64_t r = r0; r < r1; ++r) {
      for (int j = 0; j < k; ++j) {
        const int64_t v = ip[r * k + j];
        kidx[j] = v < 0 ? hass::kTopKSentinelIndex : static_cast<int>(v);
      }
      chunk_row(xb + r * row, dt, C, sp + 2 * r, ap + r, eb ? eb + r * row : nullptr, k, vp + r * k, kidx, col0);
      for (int j = 0; j < k; ++j) ip[r * k + j] = kidx[j] == hass::kTopKSentinelIndex ? -1 : kidx[j];
    }
  });
  return {e, alpha, new_state, new_val, new_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) {
  m.impl("distill_loss", &distill_loss_cpu);
  m.impl("distill_loss_backward", &distill_loss_backward_cpu);
  m.impl("online_softmax_chunk", &online_softmax_chunk_cpu);
}
