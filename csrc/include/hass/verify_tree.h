// Tree verification / rejection sampling: the math shared by the CPU and CUDA kernels of hass::verify_tree.
//
// Per tree node the target distribution (hass_ext/sampling.py) is summarised by a NodeDist:
//   kept(x)  = key(x) >= thr                      (key: order-preserving uint32 of the logit; top-k and top-p
//                                                  are both value thresholds, so ties are kept)
//   mass(x)  = kept(x) ? exp((x - xmax) / T) : 0  (unnormalised; p(x) = mass(x) / sum)
// Comparing logits is the same as comparing logits / T, and subtracting the max first never overflows, even
// for tiny T. Thresholds are found by an 8-bit radix select over the keys (4 streaming passes each):
//   top-k: the largest key t with count{key >= t} >= k       (the k-th largest logit)
//   top-p: the largest key t with mass{key >= t} >= top_p * mass{kept by top-k}, masses in 2^-40 fixed point
//          (integer sums are exact and order-independent, hence deterministic under parallel atomics).
//
// The walk (verify_walk) starts at the root; the children of a node are tried in node-index order.
//   T = 0: follow the first child whose token is the argmax (lowest id among equal maxima).
//   T > 0: child token x is accepted when u_c * rem < mass(x), rem = sum - (mass of the tokens rejected so far
//          at this node), i.e. with probability p(x) renormalised after every rejection; a token already
//          rejected at this node is skipped. The final token is drawn from the last node's residual
//          (rejected tokens excluded) by inverse CDF in token-id order with u_0, over the residual masses in
//          the same 2^-40 fixed point (draw_target), so every summation order draws the same token.
// Uniforms: u[c] (child node c) decides node c when it is tried, u[0] draws the final token; every node is
// tried at most once, so one uniform per node index makes the random stream independent of the path.
// Non-finite logits: a visited node whose row holds a NaN or +Inf, or no finite logit, ends the walk with
// kNonFinite (an error for the caller); -inf is an ordinary logit of probability 0. Unvisited rows are not read.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hass/common.h"

namespace hass {

// Summary of the target distribution at one tree node (see the file comment).
struct NodeDist {
  float xmax;      // largest logit of the row
  uint32_t thr;    // keep tokens whose key is >= thr (0 keeps every token)
  float sum;       // sum of mass over the kept tokens (T > 0 only)
  int32_t argmax;  // lowest token id holding xmax
  int32_t status;  // kOk, or kNonFinite when the row has a NaN/+Inf or no finite logit
};

constexpr int kRadixBins = 256;
constexpr float kMassScale = 1099511627776.0f;  // 2^40: fixed-point scale of the top-p masses

HASS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

HASS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Order-preserving key: a < b (as floats, not NaN) <=> key(a) < key(b); -0 and +0 share a key.
HASS_HD uint32_t order_key(float f) {
  uint32_t u = float_bits(f);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

HASS_HD float key_float(uint32_t k) { return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

HASS_HD float fexp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

HASS_HD bool bad_logit(float x) { return x != x || x == INFINITY; }  // NaN or +Inf

// exp((x - ref) / T) for x <= ref; exactly 1 at x == ref (also when 1/T overflows), 0 at x = -inf.
HASS_HD float scaled_exp(float x, float ref, float inv_t) {
  const float d = x - ref;
  return d == 0.f ? 1.f : fexp(d * inv_t);
}

HASS_HD float kept_mass(const NodeDist& d, float x, float inv_t) {
  return order_key(x) < d.thr ? 0.f : scaled_exp(x, d.xmax, inv_t);
}

// Running softmax statistics of logits: max m, lowest index of the max, sum of exp((x - m) / T).
struct MaxSum {
  float m;
  float s;
  int32_t arg;  // INT32_MAX when no finite logit was seen
};

// Adds logit x at index j (finite or -inf; j increasing within one accumulator).
HASS_HD void maxsum_add(MaxSum* a, float x, int32_t j, float inv_t, bool with_sum) {
  if (x > a->m) {
    if (with_sum) a->s = (a->m == -INFINITY ? 0.f : a->s * scaled_exp(a->m, x, inv_t)) + 1.f;
    a->m = x;
    a->arg = j;
  } else if (with_sum && x != -INFINITY) {
    a->s += scaled_exp(x, a->m, inv_t);
  }
}

// Merges two accumulators; symmetric (merge(a, b) == merge(b, a) bit for bit), so butterfly reductions agree.
HASS_HD MaxSum maxsum_merge(const MaxSum& a, const MaxSum& b, float inv_t) {
  MaxSum r;
  r.m = a.m > b.m ? a.m : b.m;
  r.arg = a.m > b.m ? a.arg : (b.m > a.m ? b.arg : (a.arg < b.arg ? a.arg : b.arg));
  const float sa = a.m == -INFINITY ? 0.f : a.s * scaled_exp(a.m, r.m, inv_t);
  const float sb = b.m == -INFINITY ? 0.f : b.s * scaled_exp(b.m, r.m, inv_t);
  r.s = sa + sb;
  return r;
}

HASS_HD uint64_t mass_fixed(float e) { return static_cast<uint64_t>(e * kMassScale); }

// The final draw works on the same fixed-point masses: a token's share is mass_fixed(residual mass), the total
// is an exact integer sum, and the token drawn is the first (in id order) whose cumulative fixed mass exceeds
// draw_target(total, u). Integer sums do not depend on their order, so the CPU and CUDA kernels (and any
// blocking of either) pick the same token for the same u. total > 0; the target is < total, so a token is found.
HASS_HD uint64_t draw_target(uint64_t total, float u) {
  const uint64_t t = static_cast<uint64_t>(static_cast<double>(u) * static_cast<double>(total));
  return t < total ? t : total - 1;
}

// Fixed-point mass the kept top-p set must reach: ceil(top_p * total), at least 1.
HASS_HD uint64_t top_p_target(uint64_t total, double top_p) {
  const double t = std::ceil(top_p * static_cast<double>(total));
  const uint64_t r = t < 1.0 ? 1 : static_cast<uint64_t>(t);
  return r > total ? total : r;
}

// ---- radix select over order keys (level 0 = most significant byte) ----

HASS_HD int radix_shift(int level) { return 24 - 8 * level; }
HASS_HD int radix_digit(uint32_t key, int level) { return static_cast<int>((key >> radix_shift(level)) & 255u); }
// True when the bytes above `level` of key equal those of prefix (the bucket chosen by the earlier levels).
HASS_HD bool radix_in_bucket(uint32_t key, uint32_t prefix, int level) {
  return level == 0 || (key >> (32 - 8 * level)) == (prefix >> (32 - 8 * level));
}

// One level of "largest key t with weight{key >= t} >= target": hist holds the weight of each digit among the
// keys of the current bucket, *above the weight of all keys above the bucket (< target). Scans the digits
// [lo, hi) downwards (a caller may split the 256 digits into ranges, *above then counting the higher ranges).
// Returns the digit of t and adds the weight of the higher digits to *above. If rounding left the target
// unreached, takes the lowest non-empty digit (keeps everything). Returns -1 for an empty range.
template <typename W>
HASS_HD int radix_pick(const W* hist, int lo, int hi, W* above, W target) {
  W acc = *above;
  int last = -1;
  for (int d = hi - 1; d >= lo; --d) {
    if (hist[d] == 0) continue;
    if (acc + hist[d] >= target) {
      *above = acc;
      return d;
    }
    acc += hist[d];
    last = d;
  }
  if (last >= 0) *above = acc - hist[last];
  return last;
}

HASS_HD uint32_t radix_extend(uint32_t prefix, int level, int digit) {
  return prefix | (static_cast<uint32_t>(digit) << radix_shift(level));
}

// ---- tree structure ----

// Tree entry i is valid when parents[0] == -1 and 0 <= parents[i] < i for i >= 1 (a tree in node order).
HASS_HD bool tree_entry_ok(int64_t i, int64_t parent) { return i == 0 ? parent == -1 : (parent >= 0 && parent < i); }
// Draft token i is valid when it is a token id (entry 0, the root, is ignored).
HASS_HD bool token_ok(int64_t i, int64_t token, int64_t V) { return i == 0 || (token >= 0 && token < V); }

HASS_HD int check_tree(const int64_t* parents, int64_t n) {
  if (n < 1) return kBadTree;
  for (int64_t i = 0; i < n; ++i)
    if (!tree_entry_ok(i, parents[i])) return kBadTree;
  return kOk;
}

HASS_HD int check_tokens(const int64_t* tokens, int64_t n, int64_t V) {
  for (int64_t i = 1; i < n; ++i)
    if (!token_ok(i, tokens[i], V)) return kBadIndex;
  return kOk;
}

// ---- the walk ----

struct WalkOut {
  int64_t last;        // node at the end of the accepted path
  int64_t accept_len;  // accepted draft tokens (root excluded)
  int nrej;            // tokens rejected at `last` (T > 0), stored in the rejected buffer
  int status;          // kOk, or the status of a visited node
};

template <typename I>
HASS_HD bool contains(const I* a, int n, I x) {
  for (int i = 0; i < n; ++i)
    if (a[i] == x) return true;
  return false;
}

// Accept/reject walk of one batch row over a validated tree (I: the index type of parents/tokens/rejected).
// dist(node) -> NodeDist (computed on demand or precomputed; asked for once per visited node, in path order),
// mass(node, c) -> kept_mass at node of the token of its child c, uniform(c) -> float in [0, 1) (T > 0 only).
// accepted[n] receives the path (node indices, -1 padded); rejected needs room for n tokens.
template <typename I, class Dist, class Mass, class Uniform>
HASS_HD WalkOut verify_walk(int64_t n, const I* parents, const I* tokens, bool greedy, Dist&& dist, Mass&& mass,
                            Uniform&& uniform, int64_t* accepted, I* rejected) {
  accepted[0] = 0;
  for (int64_t i = 1; i < n; ++i) accepted[i] = -1;
  int64_t node = 0, len = 0;
  int nrej = 0;
  for (;;) {
    const NodeDist d = dist(node);
    if (d.status != kOk) return {node, len, 0, d.status};
    nrej = 0;
    int64_t next = -1;
    float rem = d.sum;
    for (int64_t c = node + 1; c < n && next < 0; ++c) {
      if (parents[c] != node) continue;
      const I x = tokens[c];
      if (greedy) {
        if (x == d.argmax) next = c;
        continue;
      }
      if (contains(rejected, nrej, x)) continue;  // this token was already rejected here
      const float e = mass(node, c);
      if (e > 0.f && uniform(c) * rem < e) {
        next = c;
      } else {
        rejected[nrej++] = x;
        rem -= e;
      }
    }
    if (next < 0) break;
    accepted[++len] = next;
    node = next;
  }
  return {node, len, nrej, kOk};
}

// Ascending insertion sort of the (few) rejected tokens, so the residual scans can skip them with a cursor.
template <typename I>
HASS_HD void sort_tokens(I* a, int n) {
  for (int i = 1; i < n; ++i) {
    const I v = a[i];
    int j = i - 1;
    while (j >= 0 && a[j] > v) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = v;
  }
}

// Residual mass of token j at the last node: its kept mass unless it was rejected there. rej is sorted and
// *cursor only moves forward, so a scan in increasing j costs O(V + nrej).
template <typename I>
HASS_HD float residual_mass(const NodeDist& d, float x, float inv_t, int64_t j, const I* rej, int nrej,
                            int* cursor) {
  while (*cursor < nrej && rej[*cursor] < j) ++*cursor;
  if (*cursor < nrej && rej[*cursor] == j) return 0.f;
  return kept_mass(d, x, inv_t);
}

// ---- counter-based randomness (CUDA path): Philox4x32-10 ----

struct Philox {
  uint64_t seed;              // key
  uint64_t offset;            // base counter (advanced by the generator per call)
  const int64_t* seed_ptr;    // under CUDA graph capture: read seed/offset from device memory
  const int64_t* offset_ptr;
  uint64_t offset_extra;      // added to *offset_ptr under capture
  int captured;
};

HASS_HD void philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
  uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
  uint32_t k0 = key_in[0], k1 = key_in[1];
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Uniform in [0, 1) (24 random bits) for (batch row b, node i) under key seed and base counter offset.
HASS_HD float philox_uniform(uint64_t seed, uint64_t offset, uint64_t b, uint64_t i) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                           static_cast<uint32_t>(b), static_cast<uint32_t>(i)};
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  uint32_t out[4];
  philox4x32_10(ctr, key, out);
  return static_cast<float>(out[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace hass
