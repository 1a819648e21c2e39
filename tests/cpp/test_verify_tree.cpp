// Unit tests of csrc/include/hass/verify_tree.h: order keys, radix selection (top-k / top-p thresholds, also
// with the digit range split the CUDA warp uses), softmax accumulators, tree checks, the walk on tiny trees,
// the residual cursor and Philox known-answer vectors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "check.h"
#include "hass/verify_tree.h"

namespace {

const float kInf = std::numeric_limits<float>::infinity();

uint32_t lcg_state = 12345u;
float rnd() {  // deterministic uniform in [0, 1)
  lcg_state = lcg_state * 1664525u + 1013904223u;
  return static_cast<float>(lcg_state >> 8) / 16777216.0f;
}

// Radix pick over 256 digits done the CUDA way: 32 ranges of 8 digits, the crossing range found from range sums.
template <typename W>
int pick_split(const W* hist, W* above, W target) {
  W before = *above;
  int last_nonempty = -1;
  W before_last = 0;
  for (int r = 0; r < 32; ++r) {
    const int hi = 256 - 8 * r, lo = hi - 8;
    W s = 0;
    for (int d = lo; d < hi; ++d) s += hist[d];
    if (s > 0 && before + s >= target) {
      W acc = before;
      const int d = hass::radix_pick<W>(hist, lo, hi, &acc, target);
      *above = acc;
      return d;
    }
    if (s > 0) {
      last_nonempty = r;
      before_last = before;
    }
    before += s;
  }
  if (last_nonempty < 0) return -1;
  W acc = before_last;
  const int hi = 256 - 8 * last_nonempty;
  const int d = hass::radix_pick<W>(hist, hi - 8, hi, &acc, target);
  *above = acc;
  return d;
}

// The 4-level selection of the kernels over keys with weights; split selects the CUDA-style pick.
template <typename W>
uint32_t select(const std::vector<float>& x, const std::function<W(float)>& weight, uint32_t min_key, W target,
                bool split, double top_p = -1.0) {
  uint32_t prefix = 0;
  W above = 0;
  for (int level = 0; level < 4; ++level) {
    W hist[hass::kRadixBins] = {};
    for (float v : x) {
      const uint32_t key = hass::order_key(v);
      if (key >= min_key && hass::radix_in_bucket(key, prefix, level)) hist[hass::radix_digit(key, level)] += weight(v);
    }
    if (level == 0 && top_p >= 0.0) {
      W total = 0;
      for (W h : hist) total += h;
      target = static_cast<W>(hass::top_p_target(total, top_p));
    }
    const int d = split ? pick_split<W>(hist, &above, target) : hass::radix_pick<W>(hist, 0, 256, &above, target);
    CHECK(d >= 0);
    prefix = hass::radix_extend(prefix, level, d);
  }
  return prefix;
}

void test_order_key() {
  const std::vector<float> v = {-kInf, -3e38f, -1.5f, -1e-40f, -0.0f, 0.0f, 1e-40f, 1e-3f, 1.0f, 2.5f, 3e38f, kInf};
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    const bool equal = v[i] == v[i + 1];
    CHECK(equal ? hass::order_key(v[i]) == hass::order_key(v[i + 1]) : hass::order_key(v[i]) < hass::order_key(v[i + 1]));
  }
  for (float f : v) CHECK(hass::key_float(hass::order_key(f)) == f);
}

void test_top_k_select() {
  for (int trial = 0; trial < 200; ++trial) {
    const int V = 1 + static_cast<int>(rnd() * 300);
    std::vector<float> x(V);
    for (float& f : x) f = std::round((rnd() * 8.f - 4.f) * 4.f) / 4.f;  // coarse values: many ties
    if (trial % 5 == 0) x[0] = -kInf;
    const uint32_t k = 1 + static_cast<uint32_t>(rnd() * V);
    std::vector<float> sorted = x;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    const float kth = sorted[k - 1];
    for (bool split : {false, true}) {
      const uint32_t t = select<uint32_t>(x, [](float) { return 1u; }, 0u, k, split);
      CHECK(hass::key_float(t) == kth);
    }
  }
}

void test_top_p_select() {
  for (int trial = 0; trial < 200; ++trial) {
    const int V = 1 + static_cast<int>(rnd() * 200);
    std::vector<float> x(V);
    for (float& f : x) f = std::round((rnd() * 10.f - 5.f) * 2.f) / 2.f;
    const float inv_t = 0.5f + 2.f * rnd();
    const double top_p = 0.05 + 0.9 * rnd();
    const float xmax = *std::max_element(x.begin(), x.end());
    auto w = [&](float v) { return static_cast<uint64_t>(hass::mass_fixed(hass::scaled_exp(v, xmax, inv_t))); };
    // Brute force: the largest value t with mass{x >= t} >= ceil(top_p * total).
    uint64_t total = 0;
    for (float v : x) total += w(v);
    const uint64_t target = hass::top_p_target(total, top_p);
    float best = -kInf;
    for (float t : x) {
      uint64_t m = 0;
      for (float v : x) m += v >= t ? w(v) : 0;
      if (m >= target && t > best) best = t;
    }
    for (bool split : {false, true}) {
      const uint32_t t = select<uint64_t>(x, w, 0u, 0, split, top_p);
      CHECK(hass::key_float(t) == best);
    }
    // The most likely token always survives, and top_p = 1 keeps every token with mass.
    CHECK(best == xmax || best < xmax);
    const uint32_t all = select<uint64_t>(x, w, 0u, 0, false, 1.0);
    for (float v : x)
      if (w(v) > 0) CHECK(hass::order_key(v) >= all);
  }
}

void test_maxsum() {
  const float inv_t = 1.f / 0.7f;
  std::vector<float> x = {0.5f, -kInf, 2.0f, 1.0f, 2.0f, -3.0f};
  hass::MaxSum a{-kInf, 0.f, INT32_MAX}, b{-kInf, 0.f, INT32_MAX};
  for (int j = 0; j < 3; ++j) hass::maxsum_add(&a, x[j], j, inv_t, true);
  for (int j = 3; j < 6; ++j) hass::maxsum_add(&b, x[j], j, inv_t, true);
  const hass::MaxSum ab = hass::maxsum_merge(a, b, inv_t), ba = hass::maxsum_merge(b, a, inv_t);
  CHECK(ab.m == ba.m && ab.s == ba.s && ab.arg == ba.arg);
  CHECK(ab.m == 2.0f && ab.arg == 2);  // tie between 2 and 4: the lower index
  double want = 0;
  for (float v : x) want += std::exp((static_cast<double>(v) - 2.0) * inv_t);
  CHECK_NEAR(ab.s, want, 1e-5 * want);
  const hass::MaxSum empty{-kInf, 0.f, INT32_MAX};
  const hass::MaxSum e2 = hass::maxsum_merge(empty, empty, inv_t);
  CHECK(e2.m == -kInf && e2.s == 0.f && e2.arg == INT32_MAX);
  CHECK(hass::scaled_exp(3.f, 3.f, kInf) == 1.f);   // 1/T overflowed: the max keeps mass 1
  CHECK(hass::scaled_exp(2.f, 3.f, kInf) == 0.f);
  CHECK(hass::scaled_exp(-kInf, 3.f, 1.f) == 0.f);
  CHECK(hass::bad_logit(std::nanf("")) && hass::bad_logit(kInf) && !hass::bad_logit(-kInf));
}

void test_tree_checks() {
  const int64_t ok[5] = {-1, 0, 0, 1, 3};
  const int64_t root[3] = {0, 0, 1};
  const int64_t fwd[3] = {-1, 0, 2};
  const int64_t neg[3] = {-1, -1, 0};
  CHECK(hass::check_tree(ok, 5) == hass::kOk);
  CHECK(hass::check_tree(root, 3) == hass::kBadTree);
  CHECK(hass::check_tree(fwd, 3) == hass::kBadTree);
  CHECK(hass::check_tree(neg, 3) == hass::kBadTree);
  const int64_t toks[3] = {-7, 3, 4};  // entry 0 is ignored
  CHECK(hass::check_tokens(toks, 3, 5) == hass::kOk);
  CHECK(hass::check_tokens(toks, 3, 4) == hass::kBadIndex);
}

// A tiny tree: root 0 with children 1 (token 2), 2 (token 2, duplicate), 3 (token 1); node 1 has child 4 (token 0).
struct Tiny {
  int64_t parents[5] = {-1, 0, 0, 0, 1};
  int64_t tokens[5] = {9, 2, 2, 1, 0};
  std::vector<std::vector<float>> logits;  // per node, V = 3
  std::vector<hass::NodeDist> dists;
  Tiny() {
    logits = {{0.f, 1.f, 2.f}, {3.f, 0.f, 0.f}, {0.f, 0.f, 0.f}, {0.f, 5.f, 0.f}, {1.f, 1.f, 0.f}};
    for (auto& row : logits) {
      hass::NodeDist d{-kInf, 0u, 0.f, -1, hass::kOk};
      for (int j = 0; j < 3; ++j)
        if (row[j] > d.xmax) {
          d.xmax = row[j];
          d.argmax = j;
        }
      for (float v : row) d.sum += hass::kept_mass(d, v, 1.f);
      dists.push_back(d);
    }
  }
  hass::WalkOut walk(bool greedy, std::vector<float> u, int64_t* acc, int64_t* rej) {
    return hass::verify_walk(
        5, parents, tokens, greedy, [&](int64_t i) { return dists[i]; },
        [&](int64_t i, int64_t c) { return hass::kept_mass(dists[i], logits[i][tokens[c]], 1.f); },
        [&](int64_t i) { return u[i]; }, acc, rej);
  }
};

void test_walk() {
  Tiny t;
  int64_t acc[5], rej[5];
  hass::WalkOut w = t.walk(true, {}, acc, rej);  // root argmax 2 -> node 1 (first of the duplicates) -> argmax 0
  CHECK(w.status == hass::kOk && w.last == 4 && w.accept_len == 2);
  CHECK(acc[0] == 0 && acc[1] == 1 && acc[2] == 4 && acc[3] == -1 && acc[4] == -1);
  // p_root = softmax(0, 1, 2) = (0.090, 0.245, 0.665).
  // u_1 = 0.7 rejects token 2 (p 0.665); node 2 repeats token 2 and is skipped; node 3 (token 1) is tried with
  // the renormalised p = 0.245 / 0.335 = 0.731: u_3 = 0.72 accepts it. Node 3 is a leaf.
  w = t.walk(false, {0.5f, 0.7f, 0.0f, 0.72f, 0.9f}, acc, rej);
  CHECK(w.status == hass::kOk && w.last == 3 && w.accept_len == 1 && acc[1] == 3 && w.nrej == 0);
  w = t.walk(false, {0.5f, 0.7f, 0.0f, 0.74f, 0.9f}, acc, rej);  // u_3 = 0.74 rejects it too
  CHECK(w.last == 0 && w.accept_len == 0 && w.nrej == 2 && rej[0] == 2 && rej[1] == 1);
  // A node with a non-finite row stops the walk with its status.
  t.dists[1].status = hass::kNonFinite;
  w = t.walk(true, {}, acc, rej);
  CHECK(w.status == hass::kNonFinite && w.last == 1);
}

void test_residual_cursor() {
  hass::NodeDist d{0.f, 0u, 0.f, 0, hass::kOk};
  int64_t rej[3] = {7, 1, 4};
  hass::sort_tokens(rej, 3);
  CHECK(rej[0] == 1 && rej[1] == 4 && rej[2] == 7);
  int cur = 0;
  float total = 0.f;
  for (int64_t j = 0; j < 10; ++j) total += hass::residual_mass(d, 0.f, 1.f, j, rej, 3, &cur);
  CHECK(total == 7.f);
  // Top-k threshold: tokens below thr have no mass.
  d.thr = hass::order_key(0.5f);
  cur = 0;
  CHECK(hass::residual_mass(d, 0.f, 1.f, 0, rej, 3, &cur) == 0.f);
}

void test_philox() {
  const uint32_t kat[3][3][4] = {
      {{0, 0, 0, 0}, {0, 0, 0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu, 0, 0},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u, 0, 0},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& v : kat) {
    uint32_t out[4];
    hass::philox4x32_10(v[0], v[1], out);
    for (int i = 0; i < 4; ++i) CHECK(out[i] == v[2][i]);
  }
  double mean = 0;
  for (uint64_t i = 0; i < 4000; ++i) {
    const float u = hass::philox_uniform(42, 8, i % 7, i);
    CHECK(u >= 0.f && u < 1.f);
    mean += u / 4000.0;
  }
  CHECK_NEAR(mean, 0.5, 0.02);
  CHECK(hass::philox_uniform(42, 8, 1, 2) != hass::philox_uniform(42, 12, 1, 2));
  CHECK(hass::philox_uniform(42, 8, 1, 2) == hass::philox_uniform(42, 8, 1, 2));
}

}  // namespace

int main() {
  test_order_key();
  test_top_k_select();
  test_top_p_select();
  test_maxsum();
  test_tree_checks();
  test_walk();
  test_residual_cursor();
  test_philox();
  TEST_MAIN_END();
}
