// Unit tests of csrc/include/hass/distill_loss.h: online softmax merges, top-K order and merging, gradient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "hass/distill_loss.h"

namespace {

struct Exact {  // double-precision row quantities
  double ce, lse_t, lse_z;
};

Exact exact_row(const std::vector<float>& t, const std::vector<float>& z) {
  double mt = -INFINITY, mz = -INFINITY;
  for (size_t v = 0; v < t.size(); ++v) { mt = std::max(mt, (double)t[v]); mz = std::max(mz, (double)z[v]); }
  double st = 0, sz = 0;
  for (size_t v = 0; v < t.size(); ++v) { st += std::exp(t[v] - mt); sz += std::exp(z[v] - mz); }
  const double lt = mt + std::log(st), lz = mz + std::log(sz);
  double ce = 0;
  for (size_t v = 0; v < t.size(); ++v) ce -= std::exp(t[v] - lt) * (z[v] - lz);
  return {ce, lt, lz};
}

// Sequential pushes, merges of arbitrary splits and the double-precision result agree.
void test_online_merge(float offset, float scale) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int V = 1000;
  std::vector<float> t(V), z(V);
  for (int v = 0; v < V; ++v) { t[v] = offset + scale * nd(rng); z[v] = offset + scale * nd(rng); }
  const Exact ex = exact_row(t, z);

  hass::DistillRowStats seq = hass::distill_empty();
  for (int v = 0; v < V; ++v) hass::distill_push(seq, t[v], z[v]);
  const hass::DistillRowOut a = hass::distill_finish(seq);
  const double tol = 2e-5 * std::max(1.0, std::fabs(ex.ce));
  CHECK_NEAR(a.ce, ex.ce, tol);
  CHECK_NEAR(a.mt + a.lt, ex.lse_t, 1e-6 * std::fabs(ex.lse_t) + 1e-5);
  CHECK_NEAR(a.mz + a.lz, ex.lse_z, 1e-6 * std::fabs(ex.lse_z) + 1e-5);

  // 7 interleaved partials (like threads), merged in a tree, plus empty partials on both sides
  hass::DistillRowStats part[8];
  for (auto& p : part) p = hass::distill_empty();
  for (int v = 0; v < V; ++v) hass::distill_push(part[v % 7], t[v], z[v]);
  for (int w = 4; w > 0; w >>= 1)
    for (int i = 0; i < w; ++i) part[i] = hass::distill_merge(part[i], part[i + w]);
  const hass::DistillRowStats merged = hass::distill_merge(hass::distill_empty(), part[0]);
  // groups of 8 columns (the CUDA thread loop): rescale to the group maxima, then accumulate the group
  hass::DistillRowStats grp = hass::distill_empty();
  for (int v0 = 0; v0 < V; v0 += 8) {
    float mt = grp.mt, mz = grp.mz;
    for (int j = v0; j < v0 + 8; ++j) { mt = std::max(mt, t[j]); mz = std::max(mz, z[j]); }
    grp = hass::distill_rescale(grp, mt, mz);
    hass::distill_accumulate_n(grp, &t[v0], &z[v0], 8);
  }
  CHECK_NEAR(hass::distill_finish(grp).ce, ex.ce, tol);
  CHECK_NEAR(hass::distill_finish(merged).ce, ex.ce, tol);
  CHECK_NEAR(hass::distill_finish(hass::distill_merge(merged, hass::distill_empty())).ce, ex.ce, tol);
}

void test_minus_inf_columns() {
  // -inf in both target and draft: p = 0, the term counts 0; a partial of only such columns merges cleanly
  hass::DistillRowStats s = hass::distill_empty(), pad = hass::distill_empty();
  hass::distill_push(pad, -INFINITY, -INFINITY);
  hass::distill_push(s, 1.0f, 2.0f);
  hass::distill_push(s, 0.5f, -1.0f);
  const hass::DistillRowStats m1 = hass::distill_merge(pad, s), m2 = hass::distill_merge(s, pad);
  const std::vector<float> t = {1.0f, 0.5f}, z = {2.0f, -1.0f};
  const Exact ex = exact_row(t, z);
  CHECK_NEAR(hass::distill_finish(m1).ce, ex.ce, 1e-6);
  CHECK_NEAR(hass::distill_finish(m2).ce, ex.ce, 1e-6);
}

void test_topk_order_and_merge() {
  CHECK(hass::topk_before(2.0f, 9, 1.0f, 0));
  CHECK(hass::topk_before(1.0f, 3, 1.0f, 4));   // tie: lower index first
  CHECK(!hass::topk_before(1.0f, 4, 1.0f, 3));
  CHECK(!hass::topk_before(1.0f, 3, 1.0f, 3));
  CHECK(!hass::topk_before(NAN, 0, -INFINITY, 5));
  CHECK(hass::topk_before(-INFINITY, 5, -INFINITY, hass::kTopKSentinelIndex));  // real -inf beats an empty slot

  // a sorted list with ties and two empty slots
  const float lv[6] = {5, 3, 3, 3, -INFINITY, -INFINITY};
  const int li[6] = {8, 1, 4, 6, hass::kTopKSentinelIndex, hass::kTopKSentinelIndex};
  CHECK(hass::topk_count_before(lv, li, 6, 6.0f, 100) == 0);
  CHECK(hass::topk_count_before(lv, li, 6, 3.0f, 0) == 1);
  CHECK(hass::topk_count_before(lv, li, 6, 3.0f, 5) == 3);
  CHECK(hass::topk_count_before(lv, li, 6, 3.0f, 7) == 4);
  CHECK(hass::topk_count_before(lv, li, 6, -INFINITY, 2) == 4);

  // merge of per-worker sorted top-K lists by rank (the CUDA block merge) == top-K of a full stable sort
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> small(0, 20);  // many ties
  for (int k : {1, 5, 64}) {
    const int V = 3000, W = 8;
    std::vector<float> x(V);
    for (auto& v : x) v = (float)small(rng);
    std::vector<int> order(V);
    for (int i = 0; i < V; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });
    std::vector<float> wv(W * k, -INFINITY);
    std::vector<int> wi(W * k, hass::kTopKSentinelIndex);
    for (int w = 0; w < W; ++w) {  // worker w sees columns i % W == w, keeps its top-k sorted
      std::vector<int> mine;
      for (int i = w; i < V; i += W) mine.push_back(i);
      std::sort(mine.begin(), mine.end(), [&](int a, int b) { return hass::topk_before(x[a], a, x[b], b); });
      for (int j = 0; j < k && j < (int)mine.size(); ++j) { wv[w * k + j] = x[mine[j]]; wi[w * k + j] = mine[j]; }
    }
    std::vector<int> out(k, -1);
    for (int e = 0; e < W * k; ++e) {
      if (wi[e] == hass::kTopKSentinelIndex) continue;
      int rank = e % k;
      for (int w2 = 0; w2 < W; ++w2)
        if (w2 != e / k) rank += hass::topk_count_before(&wv[w2 * k], &wi[w2 * k], k, wv[e], wi[e]);
      if (rank < k) out[rank] = wi[e];
    }
    for (int j = 0; j < k; ++j) CHECK(out[j] == order[j]);
  }
}

void test_loss_and_gradient() {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  const int V = 50, K = 4;
  std::vector<float> t(V), z(V);
  for (int v = 0; v < V; ++v) { t[v] = 2 * nd(rng); z[v] = 2 * nd(rng); }
  hass::DistillRowStats s = hass::distill_empty();
  for (int v = 0; v < V; ++v) hass::distill_push(s, t[v], z[v]);
  const hass::DistillRowOut o = hass::distill_finish(s);
  std::vector<int> order(V);
  for (int i = 0; i < V; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return hass::topk_before(t[a], a, t[b], b); });
  float tk[K], zk[K];
  for (int j = 0; j < K; ++j) { tk[j] = t[order[j]]; zk[j] = z[order[j]]; }
  float pk;
  const float topk = hass::distill_topk_term(o, tk, zk, order.data(), K, &pk);
  const Exact ex = exact_row(t, z);
  double topk_ex = 0, pk_ex = 0;
  for (int j = 0; j < K; ++j) {
    const double p = std::exp(t[order[j]] - ex.lse_t);
    pk_ex += p;
    topk_ex -= p * (z[order[j]] - ex.lse_z);
  }
  CHECK_NEAR(topk, topk_ex, 1e-5);
  CHECK_NEAR(pk, pk_ex, 1e-6);

  // gradient of g_ce * ce + g_topk * topk: finite differences in double, and sum_v grad = 0
  const float g_ce = 0.3f, g_topk = 1.7f, scale = 0.5f;
  const hass::DistillGradCoef c = hass::distill_grad_coef(scale, g_ce, g_topk, pk);
  double gsum = 0;
  for (int v = 0; v < V; ++v) {
    const bool in = std::find(order.begin(), order.begin() + K, v) != order.begin() + K;
    const float g = hass::distill_grad(o, c, z[v], t[v], in);
    gsum += g;
    auto loss = [&](double dz) {
      std::vector<float> z2(z);
      z2[v] = (float)(z[v] + dz);
      const Exact e2 = exact_row(t, z2);
      double tk2 = 0;
      for (int j = 0; j < K; ++j) tk2 -= std::exp(t[order[j]] - e2.lse_t) * (z2[order[j]] - e2.lse_z);
      return scale * (g_ce * e2.ce + g_topk * tk2);
    };
    const double fd = (loss(1e-2) - loss(-1e-2)) / 2e-2;
    CHECK_NEAR(g, fd, 2e-4);
  }
  CHECK_NEAR(gsum, 0.0, 1e-6);
}

}  // namespace

int main() {
  test_online_merge(0.0f, 1.0f);
  test_online_merge(1e4f, 2.0f);   // large logits: no overflow, no cancellation
  test_online_merge(0.0f, 30.0f);  // very peaked distributions
  test_minus_inf_columns();
  test_topk_order_and_merge();
  test_loss_and_gradient();
  TEST_MAIN_END();
}
