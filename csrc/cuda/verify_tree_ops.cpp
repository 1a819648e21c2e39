// CUDA binding of hass::verify_tree (kernels: verify_tree.cu; checks: csrc/checks/verify_tree.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <mutex>
#include <optional>
#include <tuple>

#include "checks/verify_tree.h"
#include "cuda/cuda_check.h"
#include "hass/verify_tree.h"

extern "C" cudaError_t hass_verify_tree_cuda(const void* logits, int dtype, int64_t B, int64_t n, int64_t V,
                                             int64_t s_b, int64_t s_n, const int64_t* tokens,
                                             const int64_t* parents, float inv_t, int greedy, int64_t top_k,
                                             double top_p, const float* uniforms, hass::Philox rng,
                                             hass::NodeDist* dists, int64_t* accepted, int64_t* accept_len,
                                             int64_t* next_token, int* status, cudaStream_t stream);

namespace {

// Philox key/counter for one launch from a CUDA generator; under graph capture they stay device pointers.
hass::Philox verify_tree_philox(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);  // one counter block per (row, node); distinct offsets per call
  }
  hass::Philox r{};
  r.captured = st.captured_ ? 1 : 0;
  if (st.captured_) {
    r.seed_ptr = st.seed_.ptr;
    r.offset_ptr = st.offset_.ptr;
    r.offset_extra = st.offset_intragraph_;
  } else {
    r.seed = st.seed_.val;
    r.offset = st.offset_.val;
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(const at::Tensor& target_logits,
                                                                const at::Tensor& draft_tokens,
                                                                const at::Tensor& parents, double temperature,
                                                                double top_p, int64_t top_k,
                                                                const std::optional<at::Tensor>& uniforms,
                                                                std::optional<at::Generator> generator) {
  const hass_check::VerifyShape shape = hass_check::verify_tree_args(target_logits, draft_tokens, parents,
                                                                      temperature, top_p, top_k, uniforms, generator);
  const int64_t B = shape.B, n = shape.n, V = shape.V;
  const c10::cuda::CUDAGuard guard(target_logits.device());
  if (B == 0) {
    auto e = at::empty({0}, draft_tokens.options());
    return {at::empty({0, n}, draft_tokens.options()), e, e.clone()};
  }
  int dtype = -1;
  switch (target_logits.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kBFloat16: dtype = 1; break;
    default: dtype = 2; break;  // float16 (verify_tree_args admits these three)
  }
  const auto logits = target_logits.stride(2) == 1 ? target_logits : target_logits.contiguous();
  const auto tok = draft_tokens.contiguous();
  const auto par = parents.contiguous();
  const bool greedy = temperature == 0.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor u;
  hass::Philox rng{};
  if (!greedy) {
    if (uniforms.has_value()) {
      u = uniforms->contiguous();
      // Caller-given uniforms (tests, reproducible draws): checked on the host (one read) unless a graph is
      // being captured.
      if (!hass_cuda_capturing(stream)) hass_check::verify_tree_uniform_values(hass_check::host_contiguous(u));
    } else {
      rng = verify_tree_philox(generator);
    }
  }
  auto accepted = at::empty({B, n}, tok.options());
  auto accept_len = at::empty({B}, tok.options());
  auto next_token = at::empty({B}, tok.options());
  static_assert(sizeof(hass::NodeDist) % 4 == 0, "NodeDist is stored in an int32 scratch tensor");
  auto scratch = at::empty({B * n * static_cast<int64_t>(sizeof(hass::NodeDist) / 4) + 1},
                           tok.options().dtype(at::kInt));
  int* status = scratch.data_ptr<int>();
  const float inv_t = greedy ? 1.f : static_cast<float>(std::min(1.0 / temperature, double{FLT_MAX}));
  HASS_CUDA_CHECK(cudaMemsetAsync(status, 0, sizeof(int), stream), "verify_tree status reset");
  HASS_CUDA_CHECK(hass_verify_tree_cuda(logits.data_ptr(), dtype, B, n, V, logits.stride(0), logits.stride(1),
                                        tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(), inv_t, greedy ? 1 : 0,
                                        top_k, top_p, u.defined() ? u.data_ptr<float>() : nullptr, rng,
                                        reinterpret_cast<hass::NodeDist*>(status + 1),
                                        accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
                                        next_token.data_ptr<int64_t>(), status, stream),
                  "verify_tree kernel launch");
  if (!hass_cuda_capturing(stream)) {  // one 4-byte read; under capture bad rows stay -1
    const int st = scratch.narrow(0, 0, 1).item<int>();
    TORCH_CHECK_VALUE(st != hass::kBadTree, "verify_tree: parents is not a tree in node order in some batch row ",
                      "(need parents[:, 0] == -1 and 0 <= parents[:, i] < i); such rows were returned as -1");
    TORCH_CHECK_VALUE(st != hass::kBadIndex, "verify_tree: draft_tokens holds a token id outside [0, ", V, ")");
    TORCH_CHECK_VALUE(st != hass::kNonFinite, "verify_tree: target_logits contains NaN or +Inf (or no finite ",
                      "logit) in the row of a node on the accepted path");
  }
  return {accepted, accept_len, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) { m.impl("verify_tree", &verify_tree_cuda); }
