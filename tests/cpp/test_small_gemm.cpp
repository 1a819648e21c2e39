// Unit tests of csrc/include/hass/small_gemm.h: values against a double-precision loop, the lane rule (a row's
// result is the same whatever rows it is blocked with), tails of K below and past a multiple of 16, bias.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "hass/small_gemm.h"

namespace {

double dot(const float* a, const float* b, int64_t K) {
  double s = 0;
  for (int64_t k = 0; k < K; ++k) s += double(a[k]) * double(b[k]);
  return s;
}

// The lane rule written out: lane l sums k = l mod 16 in order, then the pairwise halving of the 16 lanes.
float lane_rule(const float* a, const float* b, int64_t K) {
  float lanes[16] = {};
  for (int64_t k = 0; k < K; ++k) lanes[k % 16] += a[k] * b[k];
  for (int s = 8; s >= 1; s /= 2)
    for (int i = 0; i < s; ++i) lanes[i] += lanes[i + s];
  return lanes[0];
}

template <int MR, int NR>
void check_shape(int64_t M, int64_t N, int64_t K, bool with_bias, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> x(M * K), w(N * K), b(N), y(M * N), y1(N);
  for (auto& v : x) v = d(rng);
  for (auto& v : w) v = d(rng);
  for (auto& v : b) v = d(rng);
  const float* bias = with_bias ? b.data() : nullptr;
  hass::sg_rows<MR, NR>(x.data(), M, K, w.data(), K, K, bias, y.data(), N, 0, N);
  for (int64_t m = 0; m < M; ++m) {
    hass::sg_rows<MR, NR>(x.data() + m * K, 1, K, w.data(), K, K, bias, y1.data(), N, 0, N);
    for (int64_t n = 0; n < N; ++n) {
      const double want = dot(x.data() + m * K, w.data() + n * K, K) + (with_bias ? b[n] : 0.0);
      CHECK_NEAR(y[m * N + n], want, 1e-4 * (1.0 + std::sqrt(double(K))));
      CHECK(y[m * N + n] == y1[n]);  // bit-identical to the row computed alone
    }
  }
}

// A bf16 weight (raw 16-bit patterns) gives exactly the fp32 result with the widened weight, tails included.
template <int MR, int NR>
void check_bf16(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> x(M * K), wide(N * K), b(N), y(M * N), y32(M * N);
  std::vector<uint16_t> w16(N * K);
  for (auto& v : x) v = d(rng);
  for (auto& v : b) v = d(rng);
  for (int64_t i = 0; i < N * K; ++i) {
    const float f = d(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    w16[i] = uint16_t(u >> 16);  // truncation: any bf16 pattern will do
    u = uint32_t(w16[i]) << 16;
    std::memcpy(&wide[i], &u, 4);
  }
  hass::sg_rows<MR, NR>(x.data(), M, K, w16.data(), K, K, b.data(), y.data(), N, 0, N);
  hass::sg_rows<MR, NR>(x.data(), M, K, wide.data(), K, K, b.data(), y32.data(), N, 0, N);
  for (int64_t i = 0; i < M * N; ++i) CHECK(y[i] == y32[i]);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (int64_t K : {1, 15, 16, 17, 48, 576, 1001})
    for (int64_t M : {1, 2, 3, 4, 5, 9})
      for (int64_t N : {1, 3, 4, 7}) {
        check_shape<4, 4>(M, N, K, (M + N) % 2 == 0, rng);
        check_shape<2, 2>(M, N, K, true, rng);
        check_shape<1, 2>(M, N, K, false, rng);
        check_bf16<4, 4>(M, N, K, rng);
        check_bf16<1, 2>(M, N, K, rng);
      }
  // The reduction order is the documented one, whatever the blocking (no FMA contraction at -O0/-O2 of this
  // test's default target: multiply, then add, as the lane rule does).
  std::vector<float> a(37), w(37);
  std::mt19937 r2(3);
  std::normal_distribution<float> d(0.f, 1.f);
  for (auto& v : a) v = d(r2);
  for (auto& v : w) v = d(r2);
  float y = 0;
  hass::sg_rows<4, 4>(a.data(), 1, 37, w.data(), 37, 37, nullptr, &y, 1, 0, 1);
  CHECK(y == lane_rule(a.data(), w.data(), 37));
  TEST_MAIN_END();
}
