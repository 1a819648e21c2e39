// Argument checks of hass::tree_attention, shared by the CPU and CUDA bindings.
#pragma once
#include <optional>

#include "checks/args.h"
#include "hass/attention.h"

namespace hass_check {

struct TreeAttnShape {
  int64_t B, Hq, Hkv, n, L, d;
};

// q [B,Hq,n,d]; k, v [B,Hkv,L,d] alike; tree_mask bool [B,n,n]; prefix_lens int64 [B] or None; all on q's
// device, one float dtype. Sizes only: prefix_lens values are checked by tree_attention_prefix_values.
inline TreeAttnShape tree_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& tree_mask, const std::optional<at::Tensor>& prefix_lens,
                                         double scale) {
  const Op op{"tree_attention"};
  dims(op, "q", q, 4, "[B, Hq, n, d]");
  float_dtype(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    dims(op, name, t, 4, "[B, Hkv, L, d]");
    same_device(op, name, t, q, "q");
    require(op, t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
            describe(t));
  }
  require(op, v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", describe(v));
  TreeAttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  size_is(op, "k", k, 0, s.B, "q's batch B");
  size_is(op, "k", k, 3, s.d, "q's head_dim d");
  require(op, s.Hkv > 0 && s.Hq % s.Hkv == 0, "the query heads (q.shape[1] = ", s.Hq,
          ") must be a multiple of the key/value heads (k.shape[1] = ", s.Hkv, ")");
  require(op, s.n <= s.L, "k and v must hold the prefix and the n = ", s.n, " tree nodes, but L = k.shape[2] = ",
          s.L, " < n");
  require(op, s.n <= hass::kMaxTreeNodes, "at most ", hass::kMaxTreeNodes, " tree nodes are supported, got n = ",
          s.n);
  dims(op, "tree_mask", tree_mask, 3, "[B, n, n]");
  dtype_is(op, "tree_mask", tree_mask, at::kBool);
  same_device(op, "tree_mask", tree_mask, q, "q");
  shape_is(op, "tree_mask", tree_mask, {s.B, s.n, s.n}, "[B, n, n]");
  if (prefix_lens.has_value()) {
    dims(op, "prefix_lens", *prefix_lens, 1, "[B]");
    dtype_is(op, "prefix_lens", *prefix_lens, at::kLong);
    same_device(op, "prefix_lens", *prefix_lens, q, "q");
    shape_is(op, "prefix_lens", *prefix_lens, {s.B}, "[B]");
  }
  finite(op, "scale", scale);
  if (q.is_cuda()) {
    require(op, s.d == 64 || s.d == 128, "the CUDA kernel supports head_dim 64 or 128, got q ", describe(q));
    fits_int32(op, "k.shape[2] (L)", s.L);
    fits_int32(op, "q.shape[0] * q.shape[1] (B * Hq)", s.B * s.Hq);
  }
  return s;
}

// Every prefix_lens[b] in [0, L - n]. prefix_lens: a host (CPU) tensor.
inline void tree_attention_prefix_values(const at::Tensor& prefix_lens, const TreeAttnShape& s) {
  const Op op{"tree_attention"};
  const at::Tensor pl = prefix_lens.contiguous();
  const int64_t* p = pl.data_ptr<int64_t>();
  for (int64_t b = 0; b < pl.numel(); ++b)
    require(op, p[b] >= 0 && p[b] <= s.L - s.n, "prefix_lens[", b, "] = ", p[b], " is outside [0, L - n] = [0, ",
            s.L - s.n, "]");
}

}  // namespace hass_check
