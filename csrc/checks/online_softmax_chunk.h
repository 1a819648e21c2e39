// Argument checks of hass::online_softmax_chunk, shared by the CPU and CUDA bindings.
#pragma once
#include "checks/args.h"
#include "hass/distill_loss.h"

namespace hass_check {

// logits float [N,C]; state float32 [N,2]; topk_val float32 [N,K] (0 <= K <= 64) and topk_idx int64 of its shape
// (indices are carried along, never dereferenced); col0 >= 0 with col0 + C < 2^31 - 1; one device.
inline void online_softmax_chunk_args(const at::Tensor& logits, const at::Tensor& state, const at::Tensor& topk_val,
                                      const at::Tensor& topk_idx, int64_t col0) {
  const Op op{"online_softmax_chunk"};
  dims(op, "logits", logits, 2, "[N, C]");
  float_dtype(op, "logits", logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  dims(op, "state", state, 2, "float32 [N, 2]");
  dtype_is(op, "state", state, at::kFloat);
  same_device(op, "state", state, logits, "logits");
  shape_is(op, "state", state, {N, 2}, "[N, 2]");
  dims(op, "topk_val", topk_val, 2, "float32 [N, K]");
  dtype_is(op, "topk_val", topk_val, at::kFloat);
  same_device(op, "topk_val", topk_val, logits, "logits");
  size_is(op, "topk_val", topk_val, 0, N, "logits' rows N");
  require(op, topk_val.size(1) <= hass::kMaxTopK, "topk_val must have K <= ", hass::kMaxTopK, " columns, got ",
          describe(topk_val));
  dims(op, "topk_idx", topk_idx, 2, "int64 [N, K]");
  dtype_is(op, "topk_idx", topk_idx, at::kLong);
  same_device(op, "topk_idx", topk_idx, logits, "logits");
  shape_is(op, "topk_idx", topk_idx, topk_val.sizes(), "topk_val's shape");
  require(op, col0 >= 0 && col0 + C < (int64_t{1} << 31) - 1, "col0 must be >= 0 with col0 + C < 2^31 - 1, got col0 = ",
          col0, ", C = ", C);
}

}  // namespace hass_check
