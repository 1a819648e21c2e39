// CUDA bindings of hass::distill_loss, hass::distill_loss_backward and hass::online_softmax_chunk (kernels:
// distill_loss.cu; checks: csrc/checks/distill_loss.h and online_softmax_chunk.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks/distill_loss.h"
#include "checks/online_softmax_chunk.h"
#include "cuda/cuda_check.h"
#include "hass/distill_loss.h"

extern "C" cudaError_t hass_distill_loss_fwd_cuda(const void* z, int z_dtype, const void* t, int t_dtype,
                                                  const float* mask, int64_t N, int64_t V, int k, float* stats,
                                                  int64_t* topk_idx, float* rows, cudaStream_t stream);
extern "C" cudaError_t hass_distill_loss_bwd_cuda(const void* z, int z_dtype, const void* t, int t_dtype,
                                                  const float* mask, const float* stats, const int64_t* topk_idx,
                                                  int k, const float* g_ce, const float* g_topk, const float* S,
                                                  int64_t N, int64_t V, void* grad, cudaStream_t stream);
extern "C" cudaError_t hass_online_softmax_chunk_cuda(const void* x, int dtype, int64_t N, int64_t C, float* state,
                                                      float* alpha, float* topk_val, int64_t* topk_idx, int k,
                                                      int64_t col0, void* e_out, cudaStream_t stream);

namespace {

// The kernels' element-type codes (the checks admit only these three types).
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "hass distill kernels: unsupported dtype ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_cuda(const at::Tensor& draft_logits,
                                                                            const at::Tensor& target_logits,
                                                                            const at::Tensor& loss_mask,
                                                                            int64_t topk) {
  const hass_check::DistillShape shape = hass_check::distill_loss_args(draft_logits, target_logits, loss_mask, topk);
  const int64_t N = shape.N, V = shape.V;
  const c10::cuda::CUDAGuard guard(draft_logits.device());
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const auto f32 = z.options().dtype(at::kFloat);
  auto stats = at::empty({N, 5}, f32);
  auto idx = at::empty({N, topk}, z.options().dtype(at::kLong));
  auto rows = at::empty({N, 2}, f32);  // m_t * ce_t, m_t * topk_t
  HASS_CUDA_CHECK(hass_distill_loss_fwd_cuda(z.data_ptr(), dtype_code(z), t.data_ptr(), dtype_code(t),
                                             m.data_ptr<float>(), N, V, static_cast<int>(topk),
                                             stats.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                             rows.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
                  "distill_loss kernel launch");
  const auto S = m.sum() + 1e-5;
  return {rows.select(1, 0).sum() / S, rows.select(1, 1).sum() / S, stats, idx};
}

at::Tensor distill_loss_backward_cuda(const at::Tensor& grad_ce, const at::Tensor& grad_topk,
                                      const at::Tensor& draft_logits, const at::Tensor& target_logits,
                                      const at::Tensor& loss_mask, const at::Tensor& stats,
                                      const at::Tensor& topk_idx) {
  const hass_check::DistillShape shape = hass_check::distill_loss_backward_args(
      grad_ce, grad_topk, draft_logits, target_logits, loss_mask, stats, topk_idx);
  const int64_t N = shape.N, V = shape.V;
  const c10::cuda::CUDAGuard guard(draft_logits.device());
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const auto st = stats.contiguous(), ix = topk_idx.contiguous();
  const auto f32 = z.options().dtype(at::kFloat);
  const auto gce = grad_ce.to(f32).contiguous(), gtk = grad_topk.to(f32).contiguous();
  const auto S = (m.sum() + 1e-5).contiguous();
  auto grad = at::empty_like(z);
  HASS_CUDA_CHECK(hass_distill_loss_bwd_cuda(z.data_ptr(), dtype_code(z), t.data_ptr(), dtype_code(t),
                                             m.data_ptr<float>(), st.data_ptr<float>(), ix.data_ptr<int64_t>(),
                                             static_cast<int>(ix.size(1)), gce.data_ptr<float>(),
                                             gtk.data_ptr<float>(), S.data_ptr<float>(), N, V, grad.data_ptr(),
                                             c10::cuda::getCurrentCUDAStream()),
                  "distill_loss_backward kernel launch");
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> online_softmax_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& state, const at::Tensor& topk_val, const at::Tensor& topk_idx,
    int64_t col0, bool want_exp) {
  hass_check::online_softmax_chunk_args(logits, state, topk_val, topk_idx, col0);
  const int64_t N = logits.size(0), C = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  auto new_state = state.contiguous().clone();  // the kernel updates these copies in place
  auto new_val = topk_val.contiguous().clone();
  auto new_idx = topk_idx.contiguous().clone();
  auto alpha = at::ones({N}, state.options());
  auto e = want_exp ? at::empty_like(x) : at::empty({0}, x.options());
  HASS_CUDA_CHECK(hass_online_softmax_chunk_cuda(x.data_ptr(), dtype_code(x), N, C, new_state.data_ptr<float>(),
                                                 alpha.data_ptr<float>(), new_val.data_ptr<float>(),
                                                 new_idx.data_ptr<int64_t>(), static_cast<int>(new_val.size(1)),
                                                 col0, want_exp ? e.data_ptr() : nullptr,
                                                 c10::cuda::getCurrentCUDAStream()),
                  "online_softmax_chunk kernel launch");
  return {e, alpha, new_state, new_val, new_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) {
  m.impl("distill_loss", &distill_loss_cuda);
  m.impl("distill_loss_backward", &distill_loss_backward_cuda);
  m.impl("online_softmax_chunk", &online_softmax_chunk_cuda);
}
