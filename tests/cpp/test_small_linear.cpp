// Unit tests of csrc/include/hass/small_linear.h: values against a double-precision loop, the lane rule (a row's
// result is the same whatever rows it is blocked with), tails of K below and past a multiple of 16, bias; and the
// row-major product sg_acc_rows (y += x w, attention's P * V) with its column tails, strides and bf16 rows; the
// exact widening of every fp16 bit pattern, in software and by the hardware conversion; the 64-byte-register blocks
// of x86-64-v4 against the 8-lane pairs.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "hass/small_linear.h"

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

// bf16 bit patterns by truncation (any bf16 pattern will do) and their exact fp32 values.
uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

float bf16_value(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
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
    w16[i] = bf16_bits(d(rng));
    wide[i] = bf16_value(w16[i]);
  }
  hass::sg_rows<MR, NR>(x.data(), M, K, w16.data(), K, K, b.data(), y.data(), N, 0, N);
  hass::sg_rows<MR, NR>(x.data(), M, K, wide.data(), K, K, b.data(), y32.data(), N, 0, N);
  for (int64_t i = 0; i < M * N; ++i) CHECK(y[i] == y32[i]);
}

// y[M, N] (+ its initial values) += x[M, K] w[K, N] with w rows ldw apart: against a double loop, each row
// bit-identical to the row computed alone, and a bf16 w exactly the fp32 result with the widened values.
template <int MR>
void check_acc(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  const int64_t ldw = N + 5, ldy = N + 3;
  std::vector<float> x(M * K), w(K * ldw), y0(M * ldy), y, y1, y16, wide(K * ldw);
  std::vector<uint16_t> w16(K * ldw);
  for (auto& v : x) v = d(rng);
  for (auto& v : y0) v = d(rng);
  for (int64_t i = 0; i < K * ldw; ++i) {
    w[i] = d(rng);
    w16[i] = bf16_bits(w[i]);
    wide[i] = bf16_value(w16[i]);
  }
  y = y0;
  hass::sg_acc_rows<MR>(x.data(), M, K, w.data(), ldw, K, y.data(), ldy, N);
  for (int64_t m = 0; m < M; ++m) {
    y1.assign(y0.begin() + m * ldy, y0.begin() + (m + 1) * ldy);
    hass::sg_acc_rows<MR>(x.data() + m * K, 1, K, w.data(), ldw, K, y1.data(), ldy, N);
    for (int64_t n = 0; n < N; ++n) {
      double want = y0[m * ldy + n];
      for (int64_t k = 0; k < K; ++k) want += double(x[m * K + k]) * double(w[k * ldw + n]);
      CHECK_NEAR(y[m * ldy + n], want, 1e-4 * (1.0 + std::sqrt(double(K))));
      CHECK(y[m * ldy + n] == y1[n]);
    }
    for (int64_t n = N; n < ldy; ++n) CHECK(y[m * ldy + n] == y0[m * ldy + n]);  // padding untouched
  }
  y16 = y0;
  y = y0;
  hass::sg_acc_rows<MR>(x.data(), M, K, w16.data(), ldw, K, y16.data(), ldy, N);
  hass::sg_acc_rows<MR>(x.data(), M, K, wide.data(), ldw, K, y.data(), ldy, N);
  for (int64_t i = 0; i < M * ldy; ++i) CHECK(y16[i] == y[i]);
}

// Every fp16 bit pattern widens to its exact fp32 value (a double conversion tells; NaNs stay NaNs), in software
// (sg_f16) and, where the CPU has F16C, through the hardware conversion (sg_f16_hw), which must give the same bits.
double half_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double mag = e == 0 ? std::ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -mag : mag;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v3"))) hass::sg_vec load_hw(const uint16_t* p) {
  return hass::sg_load(reinterpret_cast<const hass::sg_f16_hw*>(p));
}
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The blocks of one 64-byte register per 16 lanes (sg_zvec, what x86-64-v4 runs) give the bits of the blocks of
// 8-lane pairs compiled for the same level, for fp32, bf16 and fp16 (hardware-widened) weights.
template <typename W, int MR, typename V>
__attribute__((target("arch=x86-64-v4"))) void rows_v4(const float* x, int64_t M, int64_t K, const W* w, int64_t N,
                                                       const float* bias, float* y) {
  hass::sg_rows<MR, 4, W, V>(x, M, K, w, K, K, bias, y, N, 0, N);
}

template <typename W>
void check_zvec_bits(const std::vector<float>& x, int64_t M, int64_t K, const std::vector<W>& w, int64_t N,
                     const float* bias) {
  std::vector<float> pair(M * N), z(M * N), z1(N);
  rows_v4<W, 2, hass::sg_vec>(x.data(), M, K, w.data(), N, bias, pair.data());
  rows_v4<W, 4, hass::sg_zvec>(x.data(), M, K, w.data(), N, bias, z.data());
  CHECK(std::memcmp(pair.data(), z.data(), pair.size() * sizeof(float)) == 0);
  for (int64_t m = 0; m < M; ++m) {
    rows_v4<W, 4, hass::sg_zvec>(x.data() + m * K, 1, K, w.data(), N, bias, z1.data());
    CHECK(std::memcmp(z1.data(), z.data() + m * N, N * sizeof(float)) == 0);
  }
}

void check_zvec(std::mt19937& rng) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("x86-64-v4")) return;
  std::normal_distribution<float> d(0.f, 1.f);
  for (int64_t K : {1, 15, 16, 17, 576, 1001})
    for (int64_t M : {1, 3, 4, 5, 9})
      for (int64_t N : {1, 5, 9}) {
        std::vector<float> x(M * K), w(N * K), b(N);
        std::vector<uint16_t> bf(N * K);
        std::vector<hass::sg_f16_hw> fp(N * K);
        for (auto& v : x) v = d(rng);
        for (auto& v : b) v = d(rng);
        for (int64_t i = 0; i < N * K; ++i) {
          w[i] = d(rng);
          bf[i] = bf16_bits(w[i]);
          fp[i].bits = uint16_t((rng() & 0x83ff) | ((rng() % 30 + 1) << 10));  // finite fp16, subnormals aside
        }
        check_zvec_bits(x, M, K, w, N, M % 2 ? b.data() : nullptr);
        check_zvec_bits(x, M, K, bf, N, b.data());
        check_zvec_bits(x, M, K, fp, N, nullptr);
      }
}
#endif

void check_f16_widening() {
  for (uint32_t base = 0; base < 65536; base += 16) {
    uint16_t h[16];
    for (int i = 0; i < 16; ++i) h[i] = uint16_t(base + i);
    const hass::sg_vec v = hass::sg_load(reinterpret_cast<const hass::sg_f16*>(h));
    float sw[16];
    hass::sg_store(sw, v, 16);
    for (int i = 0; i < 16; ++i) {
      const double want = half_value(h[i]);
      CHECK(std::isnan(want) ? std::isnan(sw[i]) : (double(sw[i]) == want && std::signbit(sw[i]) == std::signbit(want)));
    }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v3")) {
      float hw[16];
      hass::sg_store(hw, load_hw(h), 16);
      for (int i = 0; i < 16; ++i) CHECK(std::isnan(sw[i]) ? std::isnan(hw[i]) : std::memcmp(&hw[i], &sw[i], 4) == 0);
    }
#endif
  }
}

}  // namespace

int main() {
  check_f16_widening();
  std::mt19937 rng(7);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  check_zvec(rng);
#endif
  for (int64_t K : {1, 15, 16, 17, 48, 576, 1001})
    for (int64_t M : {1, 2, 3, 4, 5, 9})
      for (int64_t N : {1, 3, 4, 7}) {
        check_shape<4, 4>(M, N, K, (M + N) % 2 == 0, rng);
        check_shape<2, 2>(M, N, K, true, rng);
        check_shape<1, 2>(M, N, K, false, rng);
        check_bf16<4, 4>(M, N, K, rng);
        check_bf16<1, 2>(M, N, K, rng);
      }
  for (int64_t N : {1, 15, 16, 24, 64, 130})
    for (int64_t M : {1, 3, 8, 9, 18})
      for (int64_t K : {1, 7, 128}) {
        check_acc<8>(M, N, K, rng);
        check_acc<4>(M, N, K, rng);
        check_acc<1>(M, N, K, rng);
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
