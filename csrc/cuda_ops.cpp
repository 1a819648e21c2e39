// CUDA registrations of the hass ops. Compiled by the host compiler; the kernels live in csrc/cuda/*.cu
// behind plain C interfaces so that no .cu file includes torch (fast, low-memory CUDA compiles).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "bind_utils.h"
#include "hass/compact_kv.h"

#define HASS_CUDA_CHECK(expr, what)                                                        \
  do {                                                                                     \
    cudaError_t err__ = (expr);                                                            \
    TORCH_CHECK(err__ == cudaSuccess, what, ": ", cudaGetErrorString(err__));              \
  } while (0)

// ---- compact_kv -------------------------------------------------------------------------------------
extern "C" cudaError_t hass_compact_kv_cuda(void* cache, int elem_bytes, hass::CacheGeom g, const int64_t* src,
                                            const int64_t* dst, int64_t m, int* status, cudaStream_t stream);

namespace {

void compact_kv_cuda(at::TensorList caches, const at::Tensor& src_slots, const at::Tensor& dst_start) {
  const c10::cuda::CUDAGuard guard(src_slots.device());
  const auto src = src_slots.contiguous();
  const auto dst = dst_start.contiguous();
  auto status = at::zeros({1}, src.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& cache : caches) {
    const hass::CacheGeom g = hass_bind::cache_geom(cache, src.size(0));
    HASS_CUDA_CHECK(hass_compact_kv_cuda(cache.data_ptr(), cache.element_size(), g, src.data_ptr<int64_t>(),
                                         dst.data_ptr<int64_t>(), src.size(1), status.data_ptr<int>(), stream),
                    "compact_kv kernel launch");
  }
  TORCH_CHECK(status.item<int>() == hass::kOk,
              "compact_kv: src_slots/dst_start address slots outside the cache (no row was moved for them)");
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) { m.impl("compact_kv", &compact_kv_cuda); }

// ---- verify_tree ------------------------------------------------------------------------------------
#include <ATen/cuda/CUDAGeneratorImpl.h>

#include <algorithm>
#include <cfloat>
#include <mutex>
#include <optional>
#include <tuple>

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
  const c10::cuda::CUDAGuard guard(target_logits.device());
  TORCH_CHECK_VALUE(target_logits.dim() == 3, "verify_tree: target_logits must be [B, n, V], got ",
                    target_logits.sizes());
  const int64_t B = target_logits.size(0), n = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK_VALUE(n >= 1 && V >= 1, "verify_tree: target_logits needs n >= 1 nodes and V >= 1, got ",
                    target_logits.sizes());
  if (B == 0) {
    auto e = at::empty({0}, draft_tokens.options());
    return {at::empty({0, n}, draft_tokens.options()), e, e.clone()};
  }
  TORCH_CHECK_VALUE(n <= 1024 && V < (int64_t{1} << 31) - 256, "verify_tree (CUDA): needs n <= 1024 nodes and V < 2^31");
  for (const at::Tensor* t : {&draft_tokens, &parents})
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({B, n}) && t->scalar_type() == at::kLong &&
                          t->device() == target_logits.device(),
                      "verify_tree: draft_tokens and parents must be int64 [B, n] on ", target_logits.device());
  TORCH_CHECK_VALUE(temperature >= 0.0, "verify_tree: temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "verify_tree: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(top_k >= 0, "verify_tree: top_k must be >= 0, got ", top_k);
  int dtype = -1;
  switch (target_logits.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kBFloat16: dtype = 1; break;
    case at::kHalf: dtype = 2; break;
    default: TORCH_CHECK_VALUE(false, "verify_tree: target_logits must be float32/bfloat16/float16");
  }
  const auto logits = target_logits.stride(2) == 1 ? target_logits : target_logits.contiguous();
  const auto tok = draft_tokens.contiguous();
  const auto par = parents.contiguous();
  const bool greedy = temperature == 0.0;
  at::Tensor u;
  hass::Philox rng{};
  if (!greedy) {
    if (uniforms.has_value()) {
      TORCH_CHECK_VALUE(uniforms->sizes() == at::IntArrayRef({B, n}) && uniforms->scalar_type() == at::kFloat &&
                            uniforms->device() == target_logits.device(),
                        "verify_tree: uniforms must be float32 [B, n] on ", target_logits.device());
      u = uniforms->contiguous();
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  HASS_CUDA_CHECK(cudaMemsetAsync(status, 0, sizeof(int), stream), "verify_tree status reset");
  HASS_CUDA_CHECK(hass_verify_tree_cuda(logits.data_ptr(), dtype, B, n, V, logits.stride(0), logits.stride(1),
                                        tok.data_ptr<int64_t>(), par.data_ptr<int64_t>(),
                                        greedy ? 1.f : static_cast<float>(std::min(1.0 / temperature, double{FLT_MAX})), greedy ? 1 : 0, top_k,
                                        top_p, u.defined() ? u.data_ptr<float>() : nullptr, rng,
                                        reinterpret_cast<hass::NodeDist*>(status + 1),
                                        accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
                                        next_token.data_ptr<int64_t>(), status, stream),
                  "verify_tree kernel launch");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  HASS_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture), "verify_tree capture query");
  if (capture == cudaStreamCaptureStatusNone) {  // one 4-byte read; under capture bad rows stay -1
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
