// HASS top-K ranking distillation loss: the per-row math shared by the CPU and CUDA kernels.
//
// For one row (token) with target logits t[V] and draft logits z[V]:
//   p = softmax(t), log q = log_softmax(z)
//   ce_row   = -sum_v p_v log q_v
//   topk_row = -sum_{v in topK(t)} p_v log q_v          (p is NOT renormalised over the top-K)
// The kernels stream the row once, keeping online statistics relative to running maxima:
//   mt = max t, st = sum exp(t - mt), mz = max z, sz = sum exp(z - mz), a = sum exp(t - mt) * (z - mz)
// so that sum_v p_v log q_v = a / st - log sz. Every quantity is relative to a maximum, so logits of 1e4
// neither overflow nor lose precision to cancellation (z - mz is exact when z and mz are close).
//
// Top-K order: larger target logit first; among equal logits the lower vocabulary index first. Ranking by
// logits (not by the rounded probabilities) keeps the set exact and deterministic on every device.
#pragma once
#include <math.h>

#include "hass/common.h"

namespace hass {

constexpr int kMaxTopK = 64;
constexpr int kTopKSentinelIndex = 0x7fffffff;  // index of an empty top-K slot (ranks after every real entry)

// Shift used in exp(x - m): 0 when m is -inf (an empty or all -inf partial), so that empty partials
// contribute exp(-inf) = 0 instead of NaN.
HASS_HD_HOT float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// ---- online softmax statistics ------------------------------------------------------------------------

// Both sides of a row plus the cross term a = sum exp(t - mt) * (z - mz).
struct DistillRowStats {
  float mt, st;  // target
  float mz, sz;  // draft
  float a;
};

HASS_HD DistillRowStats distill_empty() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

// Re-expresses s relative to new maxima mt >= s.mt and mz >= s.mz.
HASS_HD DistillRowStats distill_rescale(DistillRowStats s, float mt, float mz) {
  if (s.st == 0.0f && s.sz == 0.0f) return {mt, 0.0f, mz, 0.0f, 0.0f};  // nothing seen yet
  const float ct = expf(s.mt - safe_max(mt));
  const float cz = expf(s.mz - safe_max(mz));
  // a = sum w (z - mz_old) becomes sum w' (z - mz) with w' = ct w: add (mz_old - mz) * st first.
  return {mt, s.st * ct, mz, s.sz * cz, ct * (s.a + (s.mz - mz) * s.st)};
}

// Combines the statistics of two disjoint column sets of the same row.
HASS_HD DistillRowStats distill_merge(DistillRowStats x, DistillRowStats y) {
  const float mt = x.mt > y.mt ? x.mt : y.mt;
  const float mz = x.mz > y.mz ? x.mz : y.mz;
  const DistillRowStats u = distill_rescale(x, mt, mz), w = distill_rescale(y, mt, mz);
  return {mt, u.st + w.st, mz, u.sz + w.sz, u.a + w.a};
}

// The cross-term contribution of one column with target weight w = exp(t - mt): w (z - mz), and 0 where
// w = 0 (p = 0 contributes nothing, also where log q = -inf, e.g. a vocabulary entry masked in both).
HASS_HD_HOT float distill_cross(float w, float z, float mz) { return w > 0.0f ? w * (z - mz) : 0.0f; }

// Adds one column (target logit t, draft logit z) to statistics whose maxima already cover it.
HASS_HD_HOT void distill_accumulate(DistillRowStats& s, float t, float z) {
  const float w = fast_exp(t - safe_max(s.mt));
  s.st += w;
  s.sz += fast_exp(z - safe_max(s.mz));
  s.a += distill_cross(w, z, s.mz);
}

// Adds n columns to statistics whose maxima already cover them, summing the group first (two-level summation
// keeps fp32 rounding small over 256k columns).
HASS_HD_HOT void distill_accumulate_n(DistillRowStats& s, const float* t, const float* z, int n) {
  const float sht = safe_max(s.mt), shz = safe_max(s.mz);
  float gt = 0.0f, gz = 0.0f, ga = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float w = fast_exp(t[j] - sht);
    gt += w;
    gz += fast_exp(z[j] - shz);
    ga += distill_cross(w, z[j], s.mz);
  }
  s.st += gt;
  s.sz += gz;
  s.a += ga;
}

// Adds one column, raising the maxima first when needed.
HASS_HD void distill_push(DistillRowStats& s, float t, float z) {
  if (t > s.mt || z > s.mz) s = distill_rescale(s, t > s.mt ? t : s.mt, z > s.mz ? z : s.mz);
  distill_accumulate(s, t, z);
}

// Per-row results of the forward pass, kept for the backward pass.
struct DistillRowOut {
  float mz, lz;  // draft max and log sum exp(z - mz): log q_v = (z_v - mz) - lz
  float mt, lt;  // target max and log sum exp(t - mt): log p_v = (t_v - mt) - lt
  float ce;      // -sum_v p_v log q_v
};

HASS_HD DistillRowOut distill_finish(const DistillRowStats& s) {
  DistillRowOut o;
  o.mz = s.mz;
  o.lz = logf(s.sz);
  o.mt = s.mt;
  o.lt = logf(s.st);
  o.ce = o.lz - s.a / s.st;
  return o;
}

HASS_HD_HOT float distill_log_p(const DistillRowOut& o, float t) { return (t - o.mt) - o.lt; }
HASS_HD_HOT float distill_log_q(const DistillRowOut& o, float z) { return (z - o.mz) - o.lz; }

// Coefficients of the gradient of g_ce * ce + g_topk * topk w.r.t. the draft logits of one row:
//   d/dz_v = scale * [ (g_ce + g_topk P_K) q_v - (g_ce + g_topk [v in topK]) p_v ],  scale = m_t / S.
struct DistillGradCoef {
  float cq;       // scale * (g_ce + g_topk * P_K)
  float cp;       // scale * g_ce
  float cp_topk;  // scale * (g_ce + g_topk)
};

HASS_HD DistillGradCoef distill_grad_coef(float scale, float g_ce, float g_topk, float pk) {
  return {scale * (g_ce + g_topk * pk), scale * g_ce, scale * (g_ce + g_topk)};
}

// Gradient for one column; in_topk selects the top-K coefficient.
HASS_HD_HOT float distill_grad(const DistillRowOut& o, const DistillGradCoef& c, float z, float t, bool in_topk) {
  const float q = fast_exp(distill_log_q(o, z));
  const float p = fast_exp(distill_log_p(o, t));
  return c.cq * q - (in_topk ? c.cp_topk : c.cp) * p;
}

// ---- top-K selection ----------------------------------------------------------------------------------

// True when (va, ia) ranks before (vb, ib): larger value first, lower index among equal values.
// NaN ranks before nothing, so it is never selected.
HASS_HD bool topk_before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

// Number of entries of a rank-sorted list (vals/idx, length n) that rank before (v, i): the position where
// (v, i) belongs. Binary search; empty slots (-inf, sentinel) sort last and never rank before a real entry.
HASS_HD int topk_count_before(const float* vals, const int* idx, int n, float v, int i) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (topk_before(vals[mid], idx[mid], v, i))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// One top-K entry of a row: returns -p log q for target logit t and draft logit z, and writes p.
HASS_HD float distill_topk_entry(const DistillRowOut& o, float t, float z, float* p_out) {
  const float p = expf(distill_log_p(o, t));
  *p_out = p;
  return -p * distill_log_q(o, z);
}

// Top-K part of one row given the K target indices, their target and draft logits:
// returns -sum_k p_k log q_k and writes P_K = sum_k p_k. Sentinel slots (a row of NaN) are skipped.
HASS_HD float distill_topk_term(const DistillRowOut& o, const float* t_k, const float* z_k, const int* idx, int k,
                                float* pk_out) {
  float loss = 0.0f, pk = 0.0f;
  for (int j = 0; j < k; ++j) {
    if (idx[j] == kTopKSentinelIndex) continue;
    float p;
    loss += distill_topk_entry(o, t_k[j], z_k[j], &p);
    pk += p;
  }
  *pk_out = pk;
  return loss;
}

}  // namespace hass
