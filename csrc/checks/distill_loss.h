// Argument checks of hass::distill_loss and hass::distill_loss_backward, shared by the CPU and CUDA bindings.
#pragma once
#include "checks/args.h"
#include "hass/distill_loss.h"

namespace hass_check {

struct DistillShape {
  int64_t N, V;
};

// draft_logits, target_logits float [N,V] of one shape (each float32, bfloat16 or float16), V >= 1;
// loss_mask float32 [N]; one device.
inline DistillShape distill_inputs(const Op& op, const at::Tensor& draft, const at::Tensor& target,
                                   const at::Tensor& mask) {
  dims(op, "draft_logits", draft, 2, "[N, V]");
  float_dtype(op, "draft_logits", draft);
  dims(op, "target_logits", target, 2, "[N, V]");
  float_dtype(op, "target_logits", target);
  same_device(op, "target_logits", target, draft, "draft_logits");
  shape_is(op, "target_logits", target, draft.sizes(), "draft_logits' shape [N, V]");
  const DistillShape s{draft.size(0), draft.size(1)};
  require(op, s.V >= 1, "draft_logits has an empty vocabulary dim: ", describe(draft));
  require(op, s.V < (int64_t{1} << 31) - 1, "the vocabulary V = ", s.V, " must be < 2^31 - 1");
  dims(op, "loss_mask", mask, 1, "float32 [N]");
  dtype_is(op, "loss_mask", mask, at::kFloat);
  same_device(op, "loss_mask", mask, draft, "draft_logits");
  shape_is(op, "loss_mask", mask, {s.N}, "[N] (one entry per row of draft_logits)");
  return s;
}

inline DistillShape distill_loss_args(const at::Tensor& draft, const at::Tensor& target, const at::Tensor& mask,
                                      int64_t topk) {
  const Op op{"distill_loss"};
  const DistillShape s = distill_inputs(op, draft, target, mask);
  require(op, topk >= 1 && topk <= hass::kMaxTopK && topk <= s.V, "topk must be in [1, min(", hass::kMaxTopK,
          ", V = ", s.V, ")], got ", topk);
  return s;
}

// The forward's inputs, its row_stats float32 [N,5] and topk_idx int64 [N,K] (1 <= K <= min(64, V); entries
// outside [0, V) are skipped by the kernels), grad_ce and grad_topk one-element float tensors on the same device.
inline DistillShape distill_loss_backward_args(const at::Tensor& grad_ce, const at::Tensor& grad_topk,
                                               const at::Tensor& draft, const at::Tensor& target,
                                               const at::Tensor& mask, const at::Tensor& row_stats,
                                               const at::Tensor& topk_idx) {
  const Op op{"distill_loss_backward"};
  const DistillShape s = distill_inputs(op, draft, target, mask);
  dims(op, "row_stats", row_stats, 2, "float32 [N, 5]");
  dtype_is(op, "row_stats", row_stats, at::kFloat);
  same_device(op, "row_stats", row_stats, draft, "draft_logits");
  shape_is(op, "row_stats", row_stats, {s.N, 5}, "[N, 5]");
  dims(op, "topk_idx", topk_idx, 2, "int64 [N, K]");
  dtype_is(op, "topk_idx", topk_idx, at::kLong);
  same_device(op, "topk_idx", topk_idx, draft, "draft_logits");
  size_is(op, "topk_idx", topk_idx, 0, s.N, "draft_logits' rows N");
  const int64_t K = topk_idx.size(1);
  require(op, K >= 1 && K <= hass::kMaxTopK && K <= s.V, "topk_idx must have K in [1, min(", hass::kMaxTopK,
          ", V = ", s.V, ")] columns, got ", describe(topk_idx));
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"grad_ce", grad_ce}, {"grad_topk", grad_topk}}) {
    dense(op, name, t);
    require(op, t.numel() == 1 && t.is_floating_point(), name, " must be a one-element float tensor, got ",
            describe(t));
    same_device(op, name, t, draft, "draft_logits");
  }
  return s;
}

}  // namespace hass_check
