// CPU kernel of hass::verify_tree (semantics and shared math: csrc/include/hass/verify_tree.h).
// Batch rows run in parallel; per row only the nodes on the walk are read, each with a few streaming passes
// (max/argmax, the radix-select passes of top-k/top-p when asked for, the kept mass), and the last node once
// more for the residual draw. Sums are accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "hass/verify_tree.h"

namespace {

struct Params {
  bool greedy;
  float inv_t;
  int64_t top_k;
  double top_p;
};

template <typename scalar_t>
hass::NodeDist node_dist(const scalar_t* row, int64_t V, const Params& p) {
  hass::NodeDist d{-std::numeric_limits<float>::infinity(), 0u, 0.f, -1, hass::kOk};
  int64_t arg = -1;
  for (int64_t j = 0; j < V; ++j) {
    const float x = static_cast<float>(row[j]);
    if (hass::bad_logit(x)) {
      d.status = hass::kNonFinite;
      return d;
    }
    if (x > d.xmax) {
      d.xmax = x;
      arg = j;
    }
  }
  if (arg < 0) {  // every logit is -inf: no distribution
    d.status = hass::kNonFinite;
    return d;
  }
  d.argmax = static_cast<int32_t>(arg);
  if (p.greedy) return d;

  if (p.top_k > 0 && p.top_k < V) {  // k-th largest key
    uint32_t prefix = 0, above = 0;
    for (int level = 0; level < 4; ++level) {
      uint32_t hist[hass::kRadixBins] = {};
      for (int64_t j = 0; j < V; ++j) {
        const uint32_t key = hass::order_key(static_cast<float>(row[j]));
        if (hass::radix_in_bucket(key, prefix, level)) ++hist[hass::radix_digit(key, level)];
      }
      const int digit = hass::radix_pick<uint32_t>(hist, 0, hass::kRadixBins, &above, static_cast<uint32_t>(p.top_k));
      prefix = hass::radix_extend(prefix, level, digit);
    }
    d.thr = prefix;
  }
  if (p.top_p < 1.0) {  // smallest kept key whose cumulative mass (from the top) reaches top_p
    uint64_t above = 0, target = 0;
    uint32_t pre = 0;
    for (int level = 0; level < 4; ++level) {
      uint64_t hist[hass::kRadixBins] = {};
      for (int64_t j = 0; j < V; ++j) {
        const float x = static_cast<float>(row[j]);
        const uint32_t key = hass::order_key(x);
        if (key >= d.thr && hass::radix_in_bucket(key, pre, level))
          hist[hass::radix_digit(key, level)] += hass::mass_fixed(hass::scaled_exp(x, d.xmax, p.inv_t));
      }
      if (level == 0) {
        uint64_t total = 0;
        for (int i = 0; i < hass::kRadixBins; ++i) total += hist[i];
        target = hass::top_p_target(total, p.top_p);
      }
      const int digit = hass::radix_pick<uint64_t>(hist, 0, hass::kRadixBins, &above, target);
      pre = hass::radix_extend(pre, level, digit);
    }
    d.thr = pre;
  }
  double sum = 0.0;
  for (int64_t j = 0; j < V; ++j) sum += hass::kept_mass(d, static_cast<float>(row[j]), p.inv_t);
  d.sum = static_cast<float>(sum);
  return d;
}

// Inverse-CDF draw from the residual of the last node (tokens in rej, sorted, excluded).
template <typename scalar_t>
int64_t draw_residual(const scalar_t* row, int64_t V, const hass::NodeDist& d, const Params& p, const int64_t* rej,
                      int nrej, float u) {
  double total = 0.0;
  int cur = 0;
  for (int64_t j = 0; j < V; ++j) total += hass::residual_mass(d, static_cast<float>(row[j]), p.inv_t, j, rej, nrej, &cur);
  if (!(total > 0.0)) return d.argmax;  // everything rejected through rounding: degenerate, keep a valid token
  const double target = static_cast<double>(u) * total;
  double cum = 0.0;
  int64_t last = d.argmax;
  cur = 0;
  for (int64_t j = 0; j < V; ++j) {
    const float e = hass::residual_mass(d, static_cast<float>(row[j]), p.inv_t, j, rej, nrej, &cur);
    if (e <= 0.f) continue;
    cum += e;
    last = j;
    if (cum > target) return j;
  }
  return last;  // rounding left the target unreached: the last token with mass
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(const at::Tensor& target_logits,
                                                               const at::Tensor& draft_tokens,
                                                               const at::Tensor& parents, double temperature,
                                                               double top_p, int64_t top_k,
                                                               const std::optional<at::Tensor>& uniforms,
                                                               std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(target_logits.dim() == 3, "verify_tree: target_logits must be [B, n, V], got ",
                    target_logits.sizes());
  const int64_t B = target_logits.size(0), n = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK_VALUE(n >= 1 && V >= 1, "verify_tree: target_logits needs n >= 1 nodes and V >= 1, got ",
                    target_logits.sizes());
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "verify_tree: V must be < 2^31");
  TORCH_CHECK_VALUE(draft_tokens.sizes() == at::IntArrayRef({B, n}) && draft_tokens.scalar_type() == at::kLong,
                    "verify_tree: draft_tokens must be int64 [B, n] = [", B, ", ", n, "], got ",
                    draft_tokens.scalar_type(), " ", draft_tokens.sizes());
  TORCH_CHECK_VALUE(parents.sizes() == at::IntArrayRef({B, n}) && parents.scalar_type() == at::kLong,
                    "verify_tree: parents must be int64 [B, n], got ", parents.scalar_type(), " ", parents.sizes());
  TORCH_CHECK_VALUE(temperature >= 0.0, "verify_tree: temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "verify_tree: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(top_k >= 0, "verify_tree: top_k must be >= 0, got ", top_k);

  const auto logits = target_logits.stride(2) == 1 ? target_logits : target_logits.contiguous();
  const auto tok = draft_tokens.contiguous();
  const auto par = parents.contiguous();
  const Params p{temperature == 0.0, temperature == 0.0 ? 1.f : static_cast<float>(1.0 / temperature), top_k, top_p};

  at::Tensor u;
  if (!p.greedy) {
    if (uniforms.has_value()) {
      TORCH_CHECK_VALUE(uniforms->sizes() == at::IntArrayRef({B, n}) && uniforms->scalar_type() == at::kFloat,
                        "verify_tree: uniforms must be float32 [B, n], got ", uniforms->scalar_type(), " ",
                        uniforms->sizes());
      u = uniforms->contiguous();
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
        auto row = [&](int64_t node) { return base + b * s_b + node * s_n; };
        hass::NodeDist d;  // the walk asks for each node once; the last one asked is the end of the path
        const hass::WalkOut w = hass::verify_walk(
            n, pr, tr, p.greedy, p.inv_t, [&](int64_t node) { return d = node_dist(row(node), V, p); },
            [&](int64_t node, int64_t x) { return static_cast<float>(row(node)[x]); },
            [&](int64_t c) { return up[b * n + c]; }, acc, rejected.data());
        if (w.status != hass::kOk) {
          status[b] = w.status;
          bad_node[b] = w.last;
          continue;
        }
        lp[b] = w.accept_len;
        if (p.greedy) {
          np[b] = d.argmax;
        } else {
          hass::sort_tokens(rejected.data(), w.nrej);
          np[b] = draw_residual(row(w.last), V, d, p, rejected.data(), w.nrej, up[b * n]);
        }
      }
    });
  });

  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(status[b] != hass::kBadTree, "verify_tree: parents[", b,
                      "] is not a tree in node order (need parents[0] == -1 and 0 <= parents[i] < i)");
    TORCH_CHECK_VALUE(status[b] != hass::kBadIndex, "verify_tree: draft_tokens[", b, "] holds a token id outside [0, ",
                      V, ")");
    TORCH_CHECK_VALUE(status[b] != hass::kNonFinite, "verify_tree: target_logits[", b, ", ", bad_node[b],
                      "] (a node on the accepted path) contains NaN or +Inf, or no finite logit");
  }
  return {accepted, accept_len, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }
