// CPU kernel of hass::verify_tree (semantics and shared math: csrc/include/hass/verify_tree.h).
// Batch rows run in parallel; per row only the nodes on the walk are read. Per visited node: one pass for
// max/argmax/finiteness, one vectorised pass for the masses exp((x - xmax) / T) into a scratch buffer, the
// radix-select passes of top-k/top-p when asked for, and the kept mass; the last node's buffer then serves the
// residual draw. Sums are accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfloat>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks/verify_tree.h"
#include "cpu_dispatch.h"
#include "hass/verify_tree.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Params {
  bool greedy;
  float inv_t;  // 1/T clamped to FLT_MAX, so (x - xmax) * inv_t is never NaN
  int64_t top_k;
  double top_p;
};

// The hot loop, compiled once per instruction-set level (cpu_dispatch.h) and picked at load time. The wider
// levels may fuse multiply-adds, so masses can differ in the last bit between machines; on one machine every run
// gives the same results.
// out[j] = exp((x[j] - m) * inv_t) for j < V (x[j] <= m): exactly 1 at the maximum, 0 far below it (at -inf).
HASS_CPU_CLONES void masses(const float* __restrict x, int64_t V, float m, float inv_t, float* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = hass::fast_exp((x[j] - m) * inv_t);
}

// Per-thread buffers: a node's logits as floats (half types only), its masses, order keys and the candidate
// tokens of a radix selection.
struct Scratch {
  std::vector<float> x, e;
  std::vector<uint32_t> keys;
  std::vector<int32_t> cand;
};

// The 4-level radix selection of hass/verify_tree.h over the tokens with key >= min_key: the largest key t
// with weight{key >= t} >= target (top_p >= 0: target = top_p of the level-0 total). After level 0 only the
// tokens of the chosen bucket are visited again.
template <typename W, typename Weight>
uint32_t radix_select(const uint32_t* keys, int64_t V, uint32_t min_key, Weight weight, W target, double top_p,
                      std::vector<int32_t>& cand) {
  W hist[hass::kRadixBins] = {};
  for (int64_t j = 0; j < V; ++j)
    if (keys[j] >= min_key) hist[hass::radix_digit(keys[j], 0)] += weight(j);
  if (top_p >= 0.0) {
    W total = 0;
    for (W h : hist) total += h;
    target = static_cast<W>(hass::top_p_target(total, top_p));
  }
  W above = 0;
  int digit = hass::radix_pick<W>(hist, 0, hass::kRadixBins, &above, target);
  uint32_t prefix = hass::radix_extend(0u, 0, digit);
  cand.clear();
  for (int64_t j = 0; j < V; ++j)
    if (keys[j] >= min_key && hass::radix_digit(keys[j], 0) == digit) cand.push_back(static_cast<int32_t>(j));
  for (int level = 1; level < 4; ++level) {
    W h[hass::kRadixBins] = {};
    for (int32_t j : cand) h[hass::radix_digit(keys[j], level)] += weight(j);
    digit = hass::radix_pick<W>(h, 0, hass::kRadixBins, &above, target);
    prefix = hass::radix_extend(prefix, level, digit);
    size_t m = 0;
    for (int32_t j : cand)
      if (hass::radix_digit(keys[j], level) == digit) cand[m++] = j;
    cand.resize(m);
  }
  return prefix;
}

template <typename scalar_t>
const float* as_float(const scalar_t* row, int64_t V, Scratch& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    s.x.resize(V);
    for (int64_t j = 0; j < V; ++j) s.x[j] = static_cast<float>(row[j]);
    return s.x.data();
  }
}

// The NodeDist of one row (x: V floats); for T > 0 leaves kept_mass of every token in s.e (kept(x) as a float
// comparison: key(x) >= thr  <=>  x >= key_float(thr)).
hass::NodeDist node_dist(const float* x, int64_t V, const Params& p, Scratch& s) {
  hass::NodeDist d{-kInf, 0u, 0.f, -1, hass::kOk};
  float m = -kInf;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t j = 0; j < V; ++j) {
    const float v = x[j];
    bad |= static_cast<int>(v != v) | static_cast<int>(v == kInf);
    m = v > m ? v : m;
  }
  if (bad || m == -kInf) {  // NaN/+Inf, or every logit is -inf: no distribution
    d.status = hass::kNonFinite;
    return d;
  }
  d.xmax = m;
  int64_t arg = 0;
  while (x[arg] != m) ++arg;
  d.argmax = static_cast<int32_t>(arg);
  if (p.greedy) return d;

  s.e.resize(V);
  float* ep = s.e.data();
  masses(x, V, m, p.inv_t, ep);

  const bool by_k = p.top_k > 0 && p.top_k < V, by_p = p.top_p < 1.0;
  if (by_k || by_p) {
    s.keys.resize(V);
    for (int64_t j = 0; j < V; ++j) s.keys[j] = hass::order_key(x[j]);
  }
  if (by_k)  // the k-th largest key
    d.thr = radix_select<uint32_t>(s.keys.data(), V, 0u, [](int64_t) { return 1u; },
                                   static_cast<uint32_t>(p.top_k), -1.0, s.cand);
  if (by_p)  // the smallest kept key whose mass from the top reaches top_p of the kept mass
    d.thr = radix_select<uint64_t>(s.keys.data(), V, d.thr, [&](int64_t j) { return hass::mass_fixed(ep[j]); }, 0,
                                   p.top_p, s.cand);
  if (d.thr != 0u) {  // from here on e holds kept_mass: zero outside the kept set
    const float tv = hass::key_float(d.thr);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) ep[j] = x[j] >= tv ? ep[j] : 0.f;
  }
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < V; ++j) sum += ep[j];
  d.sum = static_cast<float>(sum);
  return d;
}

// Inverse-CDF draw from the residual of the last node in fixed point (hass::draw_target): e holds its kept
// masses (the rejected tokens are zeroed in place). Block sums first, so only one block of 256 is scanned token by
// token.
int64_t draw_residual(const hass::NodeDist& d, std::vector<float>& e, const int64_t* rej, int nrej, float u) {
  constexpr int64_t kBlock = 256;
  const int64_t V = static_cast<int64_t>(e.size());
  float* ep = e.data();
  for (int i = 0; i < nrej; ++i) ep[rej[i]] = 0.f;
  std::vector<uint64_t> bsum((V + kBlock - 1) / kBlock);
  uint64_t total = 0;
  for (size_t k = 0; k < bsum.size(); ++k) {
    const int64_t lo = k * kBlock, hi = std::min(V, lo + kBlock);
    uint64_t s = 0;
    for (int64_t j = lo; j < hi; ++j) s += hass::mass_fixed(ep[j]);
    bsum[k] = s;
    total += s;
  }
  if (total == 0) return d.argmax;  // no token with a fixed-point mass left: degenerate, keep a valid token
  const uint64_t target = hass::draw_target(total, u);
  uint64_t cum = 0;
  for (size_t k = 0; k < bsum.size(); ++k) {
    if (cum + bsum[k] <= target) {  // not in this block
      cum += bsum[k];
      continue;
    }
    const int64_t lo = k * kBlock, hi = std::min(V, lo + kBlock);
    for (int64_t j = lo; j < hi; ++j) {
      cum += hass::mass_fixed(ep[j]);
      if (cum > target) return j;
    }
  }
  return d.argmax;  // not reached: target < total
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(const at::Tensor& target_logits,
                                                               const at::Tensor& draft_tokens,
                                                               const at::Tensor& parents, double temperature,
                                                               double top_p, int64_t top_k,
                                                               const std::optional<at::Tensor>& uniforms,
                                                               std::optional<at::Generator> generator) {
  const hass_check::VerifyShape shape = hass_check::verify_tree_args(target_logits, draft_tokens, parents,
                                                                      temperature, top_p, top_k, uniforms, generator);
  const int64_t B = shape.B, n = shape.n, V = shape.V;

  const auto logits = target_logits.stride(2) == 1 ? target_logits : target_logits.contiguous();
  const auto tok = draft_tokens.contiguous();
  const auto par = parents.contiguous();
  const Params p{temperature == 0.0,
                 temperature == 0.0 ? 1.f : static_cast<float>(std::min(1.0 / temperature, double{FLT_MAX})), top_k,
                 top_p};

  at::Tensor u;
  if (!p.greedy) {
    if (uniforms.has_value()) {
      u = uniforms->contiguous();
      hass_check::verify_tree_uniform_values(u);
    } else {
      u = at::rand({B, n}, generator, at::TensorOptions().dtype(at::kFloat));
    }
  }

  auto accepted = at::empty({B, n}, tok.options());
  auto accept_len = at::empty({B}, tok.options());
  auto next_token = at::empty({B}, tok.options());
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t* pp = par.data_ptr<int64_t>();
  int64_t* ap = accepted.data_ptr<int64_t>();
  int64_t* lp = accept_len.data_ptr<int64_t>();
  int64_t* np = next_token.data_ptr<int64_t>();
  const float* up = p.greedy ? nullptr : u.data_ptr<float>();
  const int64_t s_b = logits.stride(0), s_n = logits.stride(1);

  // Per row: 0 or (status, node) of the first failure; reported after the parallel loop.
  std::vector<int> status(B, hass::kOk);
  std::vector<int64_t> bad_node(B, 0);
  const int64_t grain = std::max<int64_t>(1, 16384 / V);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "verify_tree_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> rejected(n);
      Scratch scratch;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* pr = pp + b * n;
        const int64_t* tr = tp + b * n;
        int64_t* acc = ap + b * n;
        int st = hass::check_tree(pr, n);
        if (st == hass::kOk) st = hass::check_tokens(tr, n, V);
        if (st != hass::kOk) {
          status[b] = st;
          continue;
        }
        // The walk asks for each node once, in path order: the scratch always holds the node being decided,
        // and after the walk the end of the path.
        hass::NodeDist d;
        const hass::WalkOut w = hass::verify_walk(
            n, pr, tr, p.greedy,
            [&](int64_t node) { return d = node_dist(as_float(base + b * s_b + node * s_n, V, scratch), V, p, scratch); },
            [&](int64_t, int64_t c) { return scratch.e[tr[c]]; },
            [&](int64_t c) { return up[b * n + c]; }, acc, rejected.data());
        if (w.status != hass::kOk) {
          status[b] = w.status;
          bad_node[b] = w.last;
          continue;
        }
        lp[b] = w.accept_len;
        np[b] = p.greedy ? d.argmax : draw_residual(d, scratch.e, rejected.data(), w.nrej, up[b * n]);
      }
    });
  });

  for (int64_t b = 0; b < B; ++b) {
    if (status[b] == hass::kBadTree) {
      const int64_t* pr = pp + b * n;
      int64_t i = pr[0] != -1 ? 0 : 1;
      while (i < n && pr[i] >= 0 && pr[i] < i) ++i;
      TORCH_CHECK_VALUE(false, "verify_tree: parents[", b, "] is not a tree in node order: parents[", b, ", ", i,
                        "] = ", pr[i], " (need parents[:, 0] == -1 and 0 <= parents[:, i] < i)");
    }
    TORCH_CHECK_VALUE(status[b] != hass::kBadIndex, "verify_tree: draft_tokens[", b, "] holds a token id outside [0, ",
                      V, ")");
    TORCH_CHECK_VALUE(status[b] != hass::kNonFinite, "verify_tree: target_logits[", b, ", ", bad_node[b],
                      "] (a node on the accepted path) contains NaN or +Inf, or no finite logit");
  }
  return {accepted, accept_len, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }
