// Argument checks of hass::small_linear, shared by the CPU and the CUDA binding (each also requires its device).
#pragma once
#include <ATen/core/grad_mode.h>

#include <optional>

#include "checks/args.h"

namespace hass_check {

// x float32/bfloat16/float16 [..., K] (at least one dim); weight float32/bfloat16/float16 [N, K]; bias [N] of any of
// those dtypes or None; all on one device; no autograd (no input requiring grad while grad mode is on: the op has
// no backward). The result has x's dtype.
inline void small_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const char* name = "small_linear") {
  const Op op{name};
  dense(op, "x", x);
  require(op, x.dim() >= 1, "x must be [..., K], got ", describe(x));
  dtype_in(op, "x", x, {at::kFloat, at::kBFloat16, at::kHalf});
  dims(op, "weight", weight, 2, "[N, K]");
  dtype_in(op, "weight", weight, {at::kFloat, at::kBFloat16, at::kHalf});
  same_device(op, "weight", weight, x, "x");
  require(op, x.size(-1) == weight.size(1), "x must be [..., K] with K = weight.shape[1] = ", weight.size(1),
          ", got ", describe(x));
  if (bias.has_value() && bias->defined()) {
    dims(op, "bias", *bias, 1, "[N]");
    dtype_in(op, "bias", *bias, {at::kFloat, at::kBFloat16, at::kHalf});
    same_device(op, "bias", *bias, x, "x");
    shape_is(op, "bias", *bias, {weight.size(0)}, "[N] (one entry per weight row)");
  }
  const bool wants_grad = x.requires_grad() || weight.requires_grad() ||
                          (bias.has_value() && bias->defined() && bias->requires_grad());
  require(op, !(wants_grad && at::GradMode::is_enabled()),
          name, " has no backward: call it under torch.no_grad()/inference_mode(), or use "
          "torch.nn.functional.linear for training");
}

// small_linear_tc: small_linear's arguments with x and weight both bfloat16 or both float16 and K % 8 == 0 (whole
// 16-byte groups of k, the tensor-core kernel's unit).
inline void small_linear_tc_args(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  const Op op{"small_linear_tc"};
  small_linear_args(x, weight, bias, "small_linear_tc");
  dtype_in(op, "x", x, {at::kBFloat16, at::kHalf});
  require(op, weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(), ", got ",
          describe(weight));
  require(op, weight.size(1) % 8 == 0, "K = weight.shape[1] must be a multiple of 8, got ", describe(weight));
}

}  // namespace hass_check
