// Unit tests of csrc/include/hass/attention.h: online softmax and log-sum-exp merging, tree-mask bits, the
// alignment index rule and the split partition.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "hass/attention.h"

namespace {

// Online softmax over scores in blocks of `block`; returns the weighted mean of values and the log-sum-exp.
void online(const std::vector<float>& s, const std::vector<float>& val, int block, float m0, float l0, float* mean,
            float* lse) {
  float m = m0, l = l0, acc = 0.f;
  for (size_t b0 = 0; b0 < s.size(); b0 += block) {
    float bmax = -INFINITY;
    for (size_t j = b0; j < s.size() && j < b0 + block; ++j) bmax = std::fmax(bmax, s[j]);
    const float mn = hass::online_max(m, bmax);
    const float alpha = hass::rescale_factor(m, mn);
    acc *= alpha;
    l *= alpha;
    for (size_t j = b0; j < s.size() && j < b0 + block; ++j) {
      const float p = hass::softmax_weight(s[j], mn);
      acc += p * val[j];
      l += p;
    }
    m = mn;
  }
  *mean = l > 0.f ? acc / l : 0.f;
  *lse = hass::row_lse(m, l);
}

void test_online_softmax() {
  std::vector<float> s, val;
  for (int i = 0; i < 37; ++i) {
    s.push_back(std::sin(1.7f * i) * 6.f + (i == 20 ? 30.f : 0.f));
    val.push_back(std::cos(0.3f * i));
  }
  s[5] = -INFINITY;  // a masked key
  double mx = -INFINITY, den = 0, num = 0;
  for (float x : s) mx = std::fmax(mx, x);
  for (size_t j = 0; j < s.size(); ++j) {
    den += std::exp(s[j] - mx);
    num += std::exp(s[j] - mx) * val[j];
  }
  for (int block : {1, 4, 16, 64}) {
    float mean, lse;
    online(s, val, block, -INFINITY, 0.f, &mean, &lse);
    CHECK_NEAR(mean, num / den, 1e-5);
    CHECK_NEAR(lse, mx + std::log(den), 1e-4);
  }
  // Everything masked: empty row, output 0, lse -inf.
  std::vector<float> none(5, -INFINITY);
  float mean, lse;
  online(none, val, 2, -INFINITY, 0.f, &mean, &lse);
  CHECK(mean == 0.f && lse == -INFINITY);
  // The leaky initial state = extra zero-logit, zero-value columns.
  std::vector<float> s2 = {0.5f, -1.f, 2.f}, v2 = {1.f, 2.f, 3.f};
  online(s2, v2, 2, 0.f, 4.f, &mean, &lse);
  double d2 = 4.0, n2 = 0.0;
  for (int j = 0; j < 3; ++j) {
    d2 += std::exp(s2[j]);
    n2 += std::exp(s2[j]) * v2[j];
  }
  CHECK_NEAR(mean, n2 / d2, 1e-6);
  CHECK_NEAR(lse, std::log(d2), 1e-6);
}

void test_lse_merge() {
  std::vector<float> s = {1.f, 3.f, -2.f, 0.5f, 7.f, 2.f}, val = {1, 2, 3, 4, 5, 6};
  float mean_all, lse_all, mean_a, lse_a, mean_b, lse_b;
  online(s, val, 6, -INFINITY, 0.f, &mean_all, &lse_all);
  std::vector<float> sa(s.begin(), s.begin() + 2), va(val.begin(), val.begin() + 2);
  std::vector<float> sb(s.begin() + 2, s.end()), vb(val.begin() + 2, val.end());
  online(sa, va, 6, -INFINITY, 0.f, &mean_a, &lse_a);
  online(sb, vb, 6, -INFINITY, 0.f, &mean_b, &lse_b);
  const float total = hass::lse_merge(lse_a, lse_b);  // split-key partial results merge into the full row
  CHECK_NEAR(total, lse_all, 1e-5);
  CHECK_NEAR(hass::lse_weight(lse_a, total) * mean_a + hass::lse_weight(lse_b, total) * mean_b, mean_all, 1e-5);
  CHECK(hass::lse_merge(-INFINITY, 2.f) == 2.f && hass::lse_merge(2.f, -INFINITY) == 2.f);
  CHECK(hass::lse_merge(-INFINITY, -INFINITY) == -INFINITY);
  CHECK(hass::lse_weight(-INFINITY, 1.f) == 0.f);
  CHECK_NEAR(hass::lse_merge(0.f, 0.f), std::log(2.0), 1e-6);
  CHECK(hass::row_lse(5.f, 0.f) == -INFINITY);
}

void test_mask_bits() {
  CHECK(hass::mask_words(1) == 1 && hass::mask_words(64) == 1 && hass::mask_words(65) == 2);
  CHECK(hass::mask_words(hass::kMaxTreeNodes) == hass::kMaxTreeWords);
  const int n = 100;
  bool row[n] = {};
  for (int j : {0, 3, 63, 64, 99}) row[j] = true;
  uint64_t words[2] = {~0ull, ~0ull};
  hass::mask_pack_row(row, n, words);
  for (int j = 0; j < n; ++j) CHECK(hass::mask_bit(words, j) == row[j]);
  CHECK(words[0] == ((1ull << 0) | (1ull << 3) | (1ull << 63)));
  CHECK(words[1] == ((1ull << 0) | (1ull << 35)));
  // L = 110 keys: prefix slots [0, 10), the last 100 keys are the tree; a ragged prefix of 7 hides slots 7..9.
  CHECK(hass::tree_key_visible(0, 10, 110, n, words));
  CHECK(hass::tree_key_visible(9, 10, 110, n, words));
  CHECK(!hass::tree_key_visible(8, 7, 110, n, words));
  CHECK(hass::tree_key_visible(10, 7, 110, n, words));   // tree node 0
  CHECK(!hass::tree_key_visible(11, 7, 110, n, words));  // tree node 1
  CHECK(hass::tree_key_visible(109, 7, 110, n, words));  // tree node 99
}

void test_align_rule() {
  // docs/algorithms.md#alignment-masks, L = 6: the level seen at (t, c) for steps F = 1, 2, 3 ('.' = none).
  const char* table[3][6] = {
      {"0.....", "00....", "000...", "0000..", "00000.", "000000"},
      {"1.....", "01....", "001...", "0001..", "00001.", "000001"},
      {"2.....", "12....", "012...", "0012..", "00012.", "000012"},
  };
  for (int F = 1; F <= 3; ++F)
    for (int t = 0; t < 6; ++t)
      for (int c = 0; c < 6; ++c) {
        std::string seen;
        if (c <= hass::align_level0_last(t, F)) seen += '0';
        for (int i = 1; i < F; ++i)
          if (hass::align_diag_col(t, F, i) == c) seen += static_cast<char>('0' + i);
        const char want = table[F - 1][t][c];
        CHECK(want == '.' ? seen.empty() : seen == std::string(1, want));
      }
  // For any T, F: the levels cover columns 0..t exactly once, and align_diag_row inverts align_diag_col.
  for (int F = 1; F <= 5; ++F)
    for (int T = 1; T <= 9; ++T)
      for (int t = 0; t < T; ++t) {
        int count = static_cast<int>(hass::align_level0_last(t, F) + 1);
        count = count < 0 ? 0 : count;
        for (int i = 1; i < F; ++i) {
          const int64_t c = hass::align_diag_col(t, F, i);
          if (c < 0) continue;
          ++count;
          CHECK(c > hass::align_level0_last(t, F) && c <= t);
          CHECK(hass::align_diag_row(c, F, i, T) == t);
        }
        CHECK(count == t + 1);
        CHECK(hass::align_diag_col(t, F, F - 1) == t || F == 1);
      }
  CHECK(hass::align_diag_row(5, 3, 1, 6) == -1);  // would be row 6, past the end
  float m, l;
  hass::align_initial_state(2, 6, true, &m, &l);
  CHECK(m == 0.f && l == 3.f);
  hass::align_initial_state(5, 6, true, &m, &l);
  CHECK(m == -INFINITY && l == 0.f);
  hass::align_initial_state(0, 6, false, &m, &l);
  CHECK(m == -INFINITY && l == 0.f);
}

void test_split_range() {
  for (int tiles : {1, 5, 17, 64})
    for (int splits : {1, 2, 3, 7, 64}) {
      int next = 0, lo = 1 << 30, hi = 0;
      for (int s = 0; s < splits; ++s) {
        int b, e;
        hass::split_range(tiles, splits, s, &b, &e);
        CHECK(b == next && e >= b);
        next = e;
        lo = std::min(lo, e - b);
        hi = std::max(hi, e - b);
      }
      CHECK(next == tiles && hi - lo <= 1);
    }
}

}  // namespace

int main() {
  test_online_softmax();
  test_lse_merge();
  test_mask_bits();
  test_align_rule();
  test_split_range();
  TEST_MAIN_END();
}
