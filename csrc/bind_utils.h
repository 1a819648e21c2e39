// Helpers turning at::Tensor metadata into the plain structs of csrc/include/hass (CPU and CUDA bindings).
#pragma once
#include <ATen/ATen.h>

#include "hass/compact_kv.h"
#include "hass/distill_loss.h"

namespace hass_bind {

// Geometry of a KV cache [B,H,S,D] or [lead,B,H,S,D] (leading dims must be collapsible into one).
inline hass::CacheGeom cache_geom(const at::Tensor& t, int64_t B) {
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "compact_kv: a cache must be [B,H,S,D] or [lead,B,H,S,D], got ",
              t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, "compact_kv: the last (head) dim of a cache must be contiguous");
  const int64_t o = t.dim() - 4;
  TORCH_CHECK(t.size(o) == B, "compact_kv: cache batch ", t.size(o), " != src_slots batch ", B);
  hass::CacheGeom g;
  g.lead = o ? t.size(0) : 1;
  g.s_lead = o ? t.stride(0) : 0;
  g.B = t.size(o); g.H = t.size(o + 1); g.S = t.size(o + 2); g.D = t.size(o + 3);
  g.s_b = t.stride(o); g.s_h = t.stride(o + 1); g.s_s = t.stride(o + 2);
  return g;
}

// Shapes shared by distill_loss and its backward, on either device: logits [N, V] alike, loss_mask float32 [N].
inline void distill_check(const at::Tensor& draft, const at::Tensor& target, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(draft.dim() == 2, op, ": draft_logits must be [N, V], got ", draft.sizes());
  TORCH_CHECK(target.sizes() == draft.sizes(), op, ": target_logits ", target.sizes(), " != draft_logits ",
              draft.sizes());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == draft.size(0) && mask.scalar_type() == at::kFloat, op,
              ": loss_mask must be float32 [N], got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(target.device() == draft.device() && mask.device() == draft.device(), op,
              ": draft_logits, target_logits and loss_mask must be on one device");
  TORCH_CHECK(draft.size(1) < (int64_t(1) << 31) - 1, op, ": vocabulary too large");
}

// distill_loss_backward's inputs: the forward's inputs, its row_stats [N, 5] and top-K ids [N, K], scalar grads.
inline void distill_backward_check(const at::Tensor& grad_ce, const at::Tensor& grad_topk, const at::Tensor& draft,
                                   const at::Tensor& target, const at::Tensor& mask, const at::Tensor& stats,
                                   const at::Tensor& topk_idx) {
  distill_check(draft, target, mask, "distill_loss_backward");
  const int64_t N = draft.size(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 5 && stats.scalar_type() == at::kFloat,
              "distill_loss_backward: row_stats must be float32 [N, 5], got ", stats.sizes());
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == N && topk_idx.scalar_type() == at::kLong &&
                  topk_idx.size(1) >= 1 && topk_idx.size(1) <= hass::kMaxTopK,
              "distill_loss_backward: topk_idx must be int64 [N, K], got ", topk_idx.sizes());
  TORCH_CHECK(grad_ce.numel() == 1 && grad_topk.numel() == 1,
              "distill_loss_backward: grad_ce and grad_topk must be scalars");
}

}  // namespace hass_bind
