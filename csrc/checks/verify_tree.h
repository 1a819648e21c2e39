// Argument checks of hass::verify_tree, shared by the CPU and CUDA bindings. Errors are ValueError, as the Python
// API documents. The tree (parents[:, 0] == -1, 0 <= parents[:, i] < i) and the token ids (draft_tokens in
// [0, V)) are checked by the kernels themselves (hass::check_tree / check_tokens in hass/verify_tree.h) before
// a row's logits are read.
#pragma once
#include <optional>

#include "checks/args.h"

namespace hass_check {

struct VerifyShape {
  int64_t B, n, V;
};

// target_logits float [B,n,V] (n, V >= 1); draft_tokens, parents int64 [B,n]; temperature finite >= 0;
// top_p in (0, 1]; top_k >= 0; uniforms float32 [B,n] (values: verify_tree_uniform_values); generator of the
// tensors' device type; everything on one device.
inline VerifyShape verify_tree_args(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                                    const at::Tensor& parents, double temperature, double top_p, int64_t top_k,
                                    const std::optional<at::Tensor>& uniforms,
                                    const std::optional<at::Generator>& generator) {
  const Op op{"verify_tree", /*value_errors=*/true};
  dims(op, "target_logits", target_logits, 3, "[B, n, V]");
  float_dtype(op, "target_logits", target_logits);
  const VerifyShape s{target_logits.size(0), target_logits.size(1), target_logits.size(2)};
  require(op, s.n >= 1 && s.V >= 1, "target_logits needs n >= 1 nodes and V >= 1 tokens, got ",
          describe(target_logits));
  require(op, s.V < (int64_t{1} << 31) - 256, "the vocabulary V = ", s.V, " must be < 2^31 - 256");
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"draft_tokens", draft_tokens}, {"parents", parents}}) {
    dims(op, name, t, 2, "int64 [B, n]");
    dtype_is(op, name, t, at::kLong);
    same_device(op, name, t, target_logits, "target_logits");
    shape_is(op, name, t, {s.B, s.n}, "[B, n] of target_logits");
  }
  require(op, std::isfinite(temperature) && temperature >= 0.0,
          "temperature must be a finite number >= 0 (0 = greedy), got ", temperature);
  require(op, top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
  require(op, top_k >= 0, "top_k must be >= 0 (0 = no top-k filter), got ", top_k);
  if (uniforms.has_value()) {
    dims(op, "uniforms", *uniforms, 2, "float32 [B, n]");
    dtype_is(op, "uniforms", *uniforms, at::kFloat);
    same_device(op, "uniforms", *uniforms, target_logits, "target_logits");
    shape_is(op, "uniforms", *uniforms, {s.B, s.n}, "[B, n] of target_logits");
  }
  if (generator.has_value() && generator->defined())
    require(op, generator->device().type() == target_logits.device().type(), "generator is on ",
            generator->device(), " but the tensors are on ", target_logits.device());
  if (target_logits.is_cuda()) require(op, s.n <= 1024, "the CUDA kernel supports n <= 1024 nodes, got ", s.n);
  return s;
}

// Every uniform in [0, 1) (NaN rejected). u: a host (CPU) tensor.
inline void verify_tree_uniform_values(const at::Tensor& u) {
  const Op op{"verify_tree", /*value_errors=*/true};
  const at::Tensor c = u.contiguous();
  const float* q = c.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    require(op, q[i] >= 0.f && q[i] < 1.f, "uniforms must lie in [0, 1), got ", q[i], " at flat index ", i);
}

}  // namespace hass_check
