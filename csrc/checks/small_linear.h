// Argument checks of hass::small_linear (a CPU-only op; the checks still name a wrong device).
#pragma once
#include <ATen/core/grad_mode.h>

#include <optional>

#include "checks/args.h"

namespace hass_check {

// x float32 [..., K] (at least one dim); weight float32 or bfloat16 [N, K]; bias float32 [N] or None; all on
// the CPU; no autograd (no input requiring grad while grad mode is on: the op has no backward).
inline void small_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const Op op{"small_linear"};
  dense(op, "x", x);
  require(op, x.dim() >= 1, "x must be [..., K], got ", describe(x));
  dtype_is(op, "x", x, at::kFloat);
  require(op, x.device().is_cpu(), "x must be on the CPU (small_linear is a CPU kernel), got ", describe(x));
  dims(op, "weight", weight, 2, "[N, K]");
  dtype_in(op, "weight", weight, {at::kFloat, at::kBFloat16});
  same_device(op, "weight", weight, x, "x");
  require(op, x.size(-1) == weight.size(1), "x must be [..., K] with K = weight.shape[1] = ", weight.size(1),
          ", got ", describe(x));
  if (bias.has_value() && bias->defined()) {
    dims(op, "bias", *bias, 1, "float32 [N]");
    dtype_is(op, "bias", *bias, at::kFloat);
    same_device(op, "bias", *bias, x, "x");
    shape_is(op, "bias", *bias, {weight.size(0)}, "[N] (one entry per weight row)");
  }
  const bool wants_grad = x.requires_grad() || weight.requires_grad() ||
                          (bias.has_value() && bias->defined() && bias->requires_grad());
  require(op, !(wants_grad && at::GradMode::is_enabled()),
          "small_linear has no backward: call it under torch.no_grad()/inference_mode(), or use "
          "torch.nn.functional.linear for training");
}

}  // namespace hass_check
