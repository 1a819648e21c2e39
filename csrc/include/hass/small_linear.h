// Skinny matrix products for decoding on CPUs: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows x
// (one decode step: M = 1; a tree verification: M = tree size, up to a few dozen), and at the end of the file the
// product with a row-major w that attention's P * V needs (sg_acc_rows).
//
// Why: a decode step is memory bound, so verifying a tree of 16 tokens should cost about what one token costs.
// BLAS libraries take a GEMV path for M = 1 but repack the weight for every call once M >= 2, which on a small
// model makes a 2-token forward cost ~1.5x a 1-token one. Here every weight row is streamed once for all M rows.
//
// Every output is the same sum in the same order whatever M is and whichever block it falls in: 16 lane-partial
// sums over k (lane l accumulates k = l mod 16 in increasing k), then a fixed pairwise reduction of the lanes.
// So a row's result does not depend on which other rows were multiplied with it: the logits of a tree node
// are bit-identical to those of a one-token step over the same hidden state.
//
// The weight may be float32, bfloat16 (its raw 16-bit patterns, uint16_t) or float16 (sg_f16): a 16-bit weight is
// widened to fp32 exactly as it is loaded, so the result is bit-identical to the fp32 product with the widened
// weight, for half the bytes streamed (a draft head's weights are bf16 values, and its whole layer then fits in the L3 cache).
//
// Host-only (GCC/Clang vector extensions). The caller compiles sg_rows inside functions with target attributes
// (the levels of csrc/cpu/cpu_dispatch.h) and picks one at run time; the arithmetic is the same, the register
// blocking differs. The sg_ prefix (skinny GEMM) marks the helpers of this header.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#error "hass/small_linear.h is for CPU code only"
#endif

#define HASS_SG_INLINE inline __attribute__((always_inline))

// The helpers below pass 64-byte vectors by value; they are always inlined, so no call ABI is involved.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace hass {

constexpr int kSgLanes = 16;
// Weight rows are adjacent, so the blocks read one long stream: prefetching 16 KiB ahead keeps memory busy while
// the FMAs run. Into L2, not L1 (locality hint 2, prefetcht1 on x86): 256 lines in flight to L1 crowd out the
// lines being used, so a call of a few rows would cost measurably more than a one-row call (the measurements:
// bench/bench_small_linear.py, bench/results/small_linear_cpu.md).
constexpr int64_t kSgPrefetchBytes = 16384;
constexpr int kSgPrefetchLocality = 2;
// A 16-lane vector as two 8-lane halves (lanes 0-7, 8-15). GCC lowers a generic 64-byte vector badly where there
// is no 64-byte register (AVX2: accumulators spilled, halves moved through general registers); two 32-byte halves
// are a pair of ymm registers there, and of ymm/zmm-half operations with AVX-512. The arithmetic is lane-wise either
// way, so the lane rule and the results are the same.
typedef float sg_vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float sg_vec4 __attribute__((vector_size(4 * sizeof(float))));
typedef uint16_t sg_vec8_u16 __attribute__((vector_size(8 * sizeof(uint16_t))));
typedef uint32_t sg_vec8_u32 __attribute__((vector_size(8 * sizeof(uint32_t))));

struct sg_vec {
  sg_vec8 lo, hi;
};
HASS_SG_INLINE sg_vec operator+(sg_vec a, sg_vec b) { return {a.lo + b.lo, a.hi + b.hi}; }
HASS_SG_INLINE sg_vec operator*(sg_vec a, sg_vec b) { return {a.lo * b.lo, a.hi * b.hi}; }
HASS_SG_INLINE sg_vec operator*(float a, sg_vec b) { return {a * b.lo, a * b.hi}; }
HASS_SG_INLINE sg_vec& operator+=(sg_vec& a, sg_vec b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}

HASS_SG_INLINE sg_vec sg_load(const float* p) {
  sg_vec v;
  std::memcpy(&v.lo, p, sizeof v.lo);  // unaligned loads
  std::memcpy(&v.hi, p + 8, sizeof v.hi);
  return v;
}

HASS_SG_INLINE sg_vec sg_load_tail(const float* p, int64_t count) {  // count < 16 elements, the rest 0
  float buf[kSgLanes] = {};
  std::memcpy(buf, p, count * sizeof(float));
  return sg_load(buf);
}

HASS_SG_INLINE sg_vec8 sg_as_float(sg_vec8_u32 u) {
  sg_vec8 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
HASS_SG_INLINE sg_vec8_u32 sg_bits(sg_vec8 v) {
  sg_vec8_u32 u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 pattern.
HASS_SG_INLINE sg_vec8 sg_widen_bf16(sg_vec8_u16 h) {
  return sg_as_float(__builtin_convertvector(h, sg_vec8_u32) << 16);
}

HASS_SG_INLINE sg_vec sg_load(const uint16_t* p) {  // 16 bf16 values
  sg_vec8_u16 lo, hi;
  std::memcpy(&lo, p, sizeof lo);
  std::memcpy(&hi, p + 8, sizeof hi);
  return {sg_widen_bf16(lo), sg_widen_bf16(hi)};
}

HASS_SG_INLINE sg_vec sg_load_tail(const uint16_t* p, int64_t count) {
  uint16_t buf[kSgLanes] = {};
  std::memcpy(buf, p, count * sizeof(uint16_t));
  return sg_load(static_cast<const uint16_t*>(buf));
}

// IEEE half weights: a distinct element type so sg_load can tell them from bf16 (both are 16-bit patterns).
struct sg_f16 {
  uint16_t bits;
};

// fp16 -> fp32 is exact too. Here (the baseline level; v3/v4 read through sg_f16_hw below) in integer operations on
// the bit patterns: GCC 12 turns a vector conversion from _Float16 into one scalar conversion per lane. The exponent is rebiased (15 -> 127); Inf/NaN keep an all-ones exponent; a subnormal m * 2^-24 is made as the normal
// 2^-14 (1 + m/1024) minus 2^-14, an exact subtraction of normal numbers (so no denormal mode can touch it).
HASS_SG_INLINE sg_vec8 sg_widen_f16(sg_vec8_u16 bits) {
  const sg_vec8_u32 h = __builtin_convertvector(bits, sg_vec8_u32);
  const sg_vec8_u32 exp_ones = sg_vec8_u32{} + (0x1fu << 23), exp = (h << 13) & exp_ones;
  const sg_vec8_u32 inf_nan = (sg_vec8_u32)(exp == exp_ones), small = (sg_vec8_u32)(exp == 0);
  const sg_vec8_u32 normal = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23) + (inf_nan & ((128u - 16u) << 23));
  const sg_vec8_u32 subnormal = sg_bits(sg_as_float(normal + (1u << 23)) - 6.103515625e-05f);  // - 2^-14
  return sg_as_float(((small & subnormal) | (~small & normal)) | ((h & 0x8000u) << 16));
}

HASS_SG_INLINE sg_vec8 sg_widen_f16(const uint16_t* p) {
  sg_vec8_u16 h;
  std::memcpy(&h, p, sizeof h);
  return sg_widen_f16(h);
}

HASS_SG_INLINE sg_vec sg_load(const sg_f16* p) {  // 16 fp16 values
  const uint16_t* u = &p->bits;
  return {sg_widen_f16(u), sg_widen_f16(u + 8)};
}

HASS_SG_INLINE sg_vec sg_load_tail(const sg_f16* p, int64_t count) {
  uint16_t buf[kSgLanes] = {};
  std::memcpy(buf, p, count * sizeof(uint16_t));
  return {sg_widen_f16(buf), sg_widen_f16(buf + 8)};
}

// The same fp16 weights read by a level that has F16C (x86-64-v3 and v4): widened by the hardware conversion
// (vcvtph2ps), which is exact and ignores the denormal modes too, so it gives the bits of sg_load(const sg_f16*) at a
// fraction of the instructions. Written as inline asm because an intrinsic would have to inline through the helpers
// here, which carry no target attribute. Only code compiled for such a level may use it (the callers in csrc/cpu/
// reinterpret their sg_f16 pointers with sg_hw_ptr there); elsewhere the mapping is the identity.
template <typename W>
struct sg_hw {
  using type = W;
};
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
struct sg_f16_hw {
  uint16_t bits;
};
template <>
struct sg_hw<sg_f16> {
  using type = sg_f16_hw;
};
HASS_SG_INLINE sg_vec8 sg_cvtph(const uint16_t* p) {
  sg_vec8_u16 h;
  std::memcpy(&h, p, sizeof h);
  sg_vec8 f;
  asm("vcvtph2ps %1, %0" : "=x"(f) : "x"(h));
  return f;
}
HASS_SG_INLINE sg_vec sg_load(const sg_f16_hw* p) { return {sg_cvtph(&p->bits), sg_cvtph(&p->bits + 8)}; }
HASS_SG_INLINE sg_vec sg_load_tail(const sg_f16_hw* p, int64_t count) {
  uint16_t buf[kSgLanes] = {};
  std::memcpy(buf, p, count * sizeof(uint16_t));
  return {sg_cvtph(buf), sg_cvtph(buf + 8)};
}
#endif
template <typename W>
HASS_SG_INLINE const typename sg_hw<W>::type* sg_hw_ptr(const W* p) {
  return reinterpret_cast<const typename sg_hw<W>::type*>(p);
}
template <typename W>
HASS_SG_INLINE const typename sg_hw<W>::type* const* sg_hw_ptr(const W* const* p) {
  return reinterpret_cast<const typename sg_hw<W>::type* const*>(p);
}

// ---- one 64-byte register per 16 lanes (levels with AVX-512) ---------------------------------------------
// The same 16 lanes as sg_vec in one native vector: where 64-byte registers exist (x86-64-v4) every FMA covers all
// 16 lanes, so a block of several input rows needs half the instructions of the pair of halves. Lane l still holds
// the k = l mod 16 partial sum and sg_reduce(sg_zvec) adds the lanes as sg_reduce(sg_vec) does, so the bits are
// those of sg_vec. Only code compiled for such a level may use it (elsewhere GCC would split it, badly).
typedef float sg_zvec __attribute__((vector_size(kSgLanes * sizeof(float))));
typedef uint16_t sg_zvec_u16 __attribute__((vector_size(kSgLanes * sizeof(uint16_t))));
typedef uint32_t sg_zvec_u32 __attribute__((vector_size(kSgLanes * sizeof(uint32_t))));

HASS_SG_INLINE sg_zvec sg_join(sg_vec v) {
  return __builtin_shufflevector(v.lo, v.hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
HASS_SG_INLINE sg_vec sg_split(sg_zvec v) {
  return {__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)};
}
HASS_SG_INLINE sg_zvec sg_zload(const float* p) {
  sg_zvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HASS_SG_INLINE sg_zvec sg_zload(const uint16_t* p) {  // 16 bf16 values, widened as sg_widen_bf16 does
  sg_zvec_u16 h;
  std::memcpy(&h, p, sizeof h);
  const sg_zvec_u32 u = __builtin_convertvector(h, sg_zvec_u32) << 16;
  sg_zvec v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
template <typename W>
HASS_SG_INLINE sg_zvec sg_zload(const W* p) {  // other weight types: through their 8-lane widening
  return sg_join(sg_load(p));
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
HASS_SG_INLINE sg_zvec sg_zload(const sg_f16_hw* p) {  // 16 fp16 values in one vcvtph2ps
  sg_zvec_u16 h;
  std::memcpy(&h, &p->bits, sizeof h);
  sg_zvec f;
  asm("vcvtph2ps %1, %0" : "=v"(f) : "v"(h));
  return f;
}
#endif
template <typename W>
HASS_SG_INLINE sg_zvec sg_zload_tail(const W* p, int64_t count) {
  return sg_join(sg_load_tail(p, count));
}

// Loads into the vector type a block computes in (sg_block's V: sg_vec or sg_zvec), picked by a value of that type.
template <typename T>
HASS_SG_INLINE sg_vec sg_load_as(sg_vec, const T* p) { return sg_load(p); }
template <typename T>
HASS_SG_INLINE sg_zvec sg_load_as(sg_zvec, const T* p) { return sg_zload(p); }
template <typename T>
HASS_SG_INLINE sg_vec sg_load_tail_as(sg_vec, const T* p, int64_t count) { return sg_load_tail(p, count); }
template <typename T>
HASS_SG_INLINE sg_zvec sg_load_tail_as(sg_zvec, const T* p, int64_t count) { return sg_zload_tail(p, count); }

HASS_SG_INLINE void sg_store(float* p, sg_vec v, int64_t count) {  // the first count <= 16 lanes
  if (count == kSgLanes) {
    std::memcpy(p, &v.lo, sizeof v.lo);
    std::memcpy(p + 8, &v.hi, sizeof v.hi);
  } else {
    float buf[kSgLanes];
    std::memcpy(buf, &v.lo, sizeof v.lo);
    std::memcpy(buf + 8, &v.hi, sizeof v.hi);
    std::memcpy(p, buf, count * sizeof(float));
  }
}

// Pairwise: lane i += lane i + 8, then i += i + 4, i += i + 2, and lane 0 + lane 1.
HASS_SG_INLINE float sg_reduce(sg_vec v) {
  const sg_vec8 h = v.lo + v.hi;
  const sg_vec4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  const float a = q[0] + q[2], b = q[1] + q[3];
  return a + b;
}

// sg_reduce of four vectors: returns the four sums.
HASS_SG_INLINE sg_vec4 sg_reduce4(sg_vec a, sg_vec b, sg_vec c, sg_vec d) {
  return sg_vec4{sg_reduce(a), sg_reduce(b), sg_reduce(c), sg_reduce(d)};
}
HASS_SG_INLINE float sg_reduce(sg_zvec v) { return sg_reduce(sg_split(v)); }
HASS_SG_INLINE sg_vec4 sg_reduce4(sg_zvec a, sg_zvec b, sg_zvec c, sg_zvec d) {
  return sg_reduce4(sg_split(a), sg_split(b), sg_split(c), sg_split(d));
}

// MR input rows x NR weight rows: x rows at x + i*ldx, weight rows at w + r*ldw, outputs at y + i*ldy + r.
// V: the vector type of the lanes (sg_vec, or sg_zvec where 64-byte registers exist).
template <int MR, int NR, typename W, typename V = sg_vec>
HASS_SG_INLINE void sg_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K, const float* bias,
                             float* y, int64_t ldy) {
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = V{};
  int64_t k = 0;
  for (; k + kSgLanes <= K; k += kSgLanes) {
    V wv[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = sg_load_as(V{}, w + r * ldw + k);
      __builtin_prefetch(reinterpret_cast<const char*>(w + r * ldw + k) + kSgPrefetchBytes, 0, kSgPrefetchLocality);
    }
    for (int i = 0; i < MR; ++i) {
      const V xv = sg_load_as(V{}, x + i * ldx + k);
      for (int r = 0; r < NR; ++r) acc[i][r] += xv * wv[r];
    }
  }
  if (k < K) {  // the tail lands in lanes 0..K-k-1, as the lane rule says (k is a multiple of 16 here)
    V wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = sg_load_tail_as(V{}, w + r * ldw + k, K - k);
    for (int i = 0; i < MR; ++i) {
      const V xv = sg_load_tail_as(V{}, x + i * ldx + k, K - k);
      for (int r = 0; r < NR; ++r) acc[i][r] += xv * wv[r];
    }
  }
  for (int i = 0; i < MR; ++i) {
    if constexpr (NR == 4) {
      const sg_vec4 sums = sg_reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      for (int r = 0; r < 4; ++r) y[i * ldy + r] = sums[r] + (bias ? bias[r] : 0.0f);
    } else {
      for (int r = 0; r < NR; ++r) y[i * ldy + r] = sg_reduce(acc[i][r]) + (bias ? bias[r] : 0.0f);
    }
  }
}

// rows < MR remaining rows (1 <= rows): one block of exactly that many.
template <int MR, int R, typename W, typename V = sg_vec>
HASS_SG_INLINE void sg_tail(const float* x, int64_t rows, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                            const float* bias, float* y, int64_t ldy) {
  if (rows == MR) {
    sg_block<MR, R, W, V>(x, ldx, w, ldw, K, bias, y, ldy);
  } else if constexpr (MR > 1) {
    sg_tail<MR - 1, R, W, V>(x, rows, ldx, w, ldw, K, bias, y, ldy);
  }
}

// All M rows of x against the R weight rows starting at row n (MR input rows at a time).
template <int MR, int R, typename W, typename V = sg_vec>
HASS_SG_INLINE void sg_row_block(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                                 const float* bias, float* y, int64_t ldy, int64_t n) {
  const W* wn = w + n * ldw;
  const float* bn = bias ? bias + n : nullptr;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) sg_block<MR, R, W, V>(x + m * ldx, ldx, wn, ldw, K, bn, y + m * ldy + n, ldy);
  if constexpr (MR > 1) {  // the last M mod MR rows in one block
    if (m < M) sg_tail<MR - 1, R, W, V>(x + m * ldx, M - m, ldx, wn, ldw, K, bn, y + m * ldy + n, ldy);
  }
}

// All M rows of x against weight rows [n0, n1): blocks of NR weight rows, each multiplied with the input rows in
// groups of MR while the block is still in L1. x [M, K] (row stride ldx), w [N, K] (row stride ldw; float, or
// uint16_t holding bf16, or sg_f16), y [M, N] (row stride ldy); bias [N] or null. (No lambdas: they would not inherit the
// caller's target attributes.)
template <int MR, int NR, typename W, typename V = sg_vec>
HASS_SG_INLINE void sg_rows(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                            const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) sg_row_block<MR, NR, W, V>(x, M, ldx, w, ldw, K, bias, y, ldy, n);
  for (; n < n1; ++n) sg_row_block<MR, 1, W, V>(x, M, ldx, w, ldw, K, bias, y, ldy, n);
}

// ---- the product with a row-major w: y[m, n] += sum_k x[m, k] * w[k, n] ---------------------------------
// Attention's P * V (x: probabilities [M, K], w: K value rows of N). MR rows of y keep one 16-column vector each in
// registers over all k; columns go 16 at a time (a partial last vector for N mod 16). Each output adds its k
// terms in increasing k whatever M and MR are, so a row's result does not depend on the rows next to it.

template <int MR, typename W>
HASS_SG_INLINE void sg_acc_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K, float* y,
                                 int64_t ldy, int64_t width) {
  sg_vec acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = width == kSgLanes ? sg_load(y + i * ldy) : sg_load_tail(y + i * ldy, width);
  if (width == kSgLanes) {
    for (int64_t k = 0; k < K; ++k) {
      const sg_vec wv = sg_load(w + k * ldw);
      for (int i = 0; i < MR; ++i) acc[i] += x[i * ldx + k] * wv;
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const sg_vec wv = sg_load_tail(w + k * ldw, width);
      for (int i = 0; i < MR; ++i) acc[i] += x[i * ldx + k] * wv;
    }
  }
  for (int i = 0; i < MR; ++i) sg_store(y + i * ldy, acc[i], width);
}

template <int MR, typename W>
HASS_SG_INLINE void sg_acc_tail(const float* x, int64_t rows, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                                float* y, int64_t ldy, int64_t width) {
  if (rows == MR) {
    sg_acc_block<MR, W>(x, ldx, w, ldw, K, y, ldy, width);
  } else if constexpr (MR > 1) {
    sg_acc_tail<MR - 1, W>(x, rows, ldx, w, ldw, K, y, ldy, width);
  }
}

// x [M, K] (row stride ldx), w [K, N] (row stride ldw; float, uint16_t holding bf16, or sg_f16), y [M, N] (row stride ldy).
template <int MR, typename W>
HASS_SG_INLINE void sg_acc_rows(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                                float* y, int64_t ldy, int64_t N) {
  for (int64_t c = 0; c < N; c += kSgLanes) {
    const int64_t width = N - c < kSgLanes ? N - c : kSgLanes;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) sg_acc_block<MR, W>(x + m * ldx, ldx, w + c, ldw, K, y + m * ldy + c, ldy, width);
    if constexpr (MR > 1) {
      if (m < M) sg_acc_tail<MR - 1, W>(x + m * ldx, M - m, ldx, w + c, ldw, K, y + m * ldy + c, ldy, width);
    }
  }
}

// y[0, N) += sum_k x[k] * rows[k][0, N) for one output row, with the K rows given by pointers: attention's P * V
// over a gathered list of value rows (the keys a tree query sees). Each output adds its k terms in increasing k
// with the arithmetic of sg_acc_block, so the result depends on the list only, not on where the rows are.
template <typename W>
HASS_SG_INLINE void sg_acc_gather(const float* x, int64_t K, const W* const* rows, float* y, int64_t N) {
  for (int64_t c = 0; c < N; c += kSgLanes) {
    const int64_t width = N - c < kSgLanes ? N - c : kSgLanes;
    sg_vec acc = width == kSgLanes ? sg_load(y + c) : sg_load_tail(y + c, width);
    if (width == kSgLanes) {
      for (int64_t k = 0; k < K; ++k) acc += x[k] * sg_load(rows[k] + c);
    } else {
      for (int64_t k = 0; k < K; ++k) acc += x[k] * sg_load_tail(rows[k] + c, width);
    }
    sg_store(y + c, acc, width);
  }
}

}  // namespace hass

#pragma GCC diagnostic pop
