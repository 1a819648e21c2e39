// Argument checks of hass::align_attention and hass::align_attention_backward, shared by the CPU and CUDA
// bindings.
#pragma once
#include "checks/args.h"

namespace hass_check {

struct AlignShape {
  int64_t F, B, Hq, Hkv, T, d;
};

// q [B,Hq,T,d]; k_levels, v_levels [F,B,Hkv,T,d] alike with F >= 1; one float dtype, one device.
inline AlignShape align_attention_args(const Op& op, const at::Tensor& q, const at::Tensor& k_levels,
                                       const at::Tensor& v_levels, double scale) {
  dims(op, "q", q, 4, "[B, Hq, T, d]");
  float_dtype(op, "q", q);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"k_levels", k_levels}, {"v_levels", v_levels}}) {
    dims(op, name, t, 5, "[F, B, Hkv, T, d]");
    same_device(op, name, t, q, "q");
    require(op, t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
            describe(t));
  }
  require(op, v_levels.sizes() == k_levels.sizes(), "v_levels must have k_levels' shape ", k_levels.sizes(),
          ", got ", describe(v_levels));
  AlignShape s{k_levels.size(0), q.size(0), q.size(1), k_levels.size(2), q.size(2), q.size(3)};
  require(op, s.F >= 1, "k_levels must hold at least one level (F = k_levels.shape[0] >= 1), got ",
          describe(k_levels));
  size_is(op, "k_levels", k_levels, 1, s.B, "q's batch B");
  size_is(op, "k_levels", k_levels, 3, s.T, "q's length T");
  size_is(op, "k_levels", k_levels, 4, s.d, "q's head_dim d");
  require(op, s.Hkv > 0 && s.Hq % s.Hkv == 0, "the query heads (q.shape[1] = ", s.Hq,
          ") must be a multiple of the key/value heads (k_levels.shape[2] = ", s.Hkv, ")");
  finite(op, "scale", scale);
  if (q.is_cuda()) {
    require(op, s.d == 64 || s.d == 128, "the CUDA kernel supports head_dim 64 or 128, got q ", describe(q));
    fits_int32(op, "k_levels.shape[0] (F)", s.F);
    fits_int32(op, "q.shape[2] (T)", s.T);
    fits_int32(op, "q.shape[0] * q.shape[1] (B * Hq)", s.B * s.Hq);
  }
  return s;
}

inline AlignShape align_attention_forward_args(const at::Tensor& q, const at::Tensor& k_levels,
                                               const at::Tensor& v_levels, double scale) {
  return align_attention_args(Op{"align_attention"}, q, k_levels, v_levels, scale);
}

// The forward's arguments, grad_out and out shaped and typed like q, lse float32 [B,Hq,T].
inline AlignShape align_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                                const at::Tensor& k_levels, const at::Tensor& v_levels,
                                                const at::Tensor& out, const at::Tensor& lse, double scale) {
  const Op op{"align_attention_backward"};
  const AlignShape s = align_attention_args(op, q, k_levels, v_levels, scale);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    dims(op, name, t, 4, "[B, Hq, T, d]");
    same_device(op, name, t, q, "q");
    require(op, t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
            describe(t));
    shape_is(op, name, t, q.sizes(), "q's shape [B, Hq, T, d]");
  }
  dims(op, "lse", lse, 3, "[B, Hq, T]");
  dtype_is(op, "lse", lse, at::kFloat);
  same_device(op, "lse", lse, q, "q");
  shape_is(op, "lse", lse, {s.B, s.Hq, s.T}, "[B, Hq, T]");
  return s;
}

}  // namespace hass_check
