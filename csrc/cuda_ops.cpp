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

// ---- tree_attention / align_attention -----------------------------------------------------------------
#include "hass/attention.h"

extern "C" int hass_tree_attention_splits_cuda(const hass::TreeAttnParams* p);
extern "C" cudaError_t hass_tree_attention_cuda(const hass::TreeAttnParams* p, int dtype, cudaStream_t stream);
extern "C" cudaError_t hass_align_attention_fwd_cuda(const hass::AlignParams* p, int dtype, cudaStream_t stream);
extern "C" cudaError_t hass_align_attention_bwd_cuda(const hass::AlignParams* p, int dtype, cudaStream_t stream);

namespace {

int attn_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return hass::kAttnF32;
    case at::kBFloat16: return hass::kAttnBF16;
    case at::kHalf: return hass::kAttnF16;
    default: TORCH_CHECK(false, "hass attention: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

// The kernels copy rows in 16-byte chunks: the last dim must be contiguous and every row start 16-byte aligned.
at::Tensor rows_aligned(const at::Tensor& t) {
  const int64_t chunk = 16 / t.element_size();
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) == 1 || t.stride(i) % chunk == 0;
  return ok ? t : t.contiguous();
}

hass::Strided4 strided4(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

hass::Strided5 strided5(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

at::Tensor tree_attention_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                               const at::Tensor& tree_mask, const c10::optional<at::Tensor>& prefix_lens,
                               double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_aligned(q_), k = rows_aligned(k_), v = rows_aligned(v_);
  const auto mask = tree_mask.contiguous();
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "tree_attention (CUDA): head_dim must be 64 or 128");
  TORCH_CHECK(q.size(2) <= hass::kMaxTreeNodes && q.size(2) <= k.size(2), "tree_attention: bad tree size");
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  at::Tensor pl;
  if (prefix_lens.has_value()) pl = prefix_lens->contiguous();
  hass::TreeAttnParams p{};
  p.q = strided4(q); p.k = strided4(k); p.v = strided4(v); p.out = strided4(out);
  p.mask = mask.data_ptr<bool>();
  p.prefix_lens = pl.defined() ? pl.data_ptr<int64_t>() : nullptr;
  p.B = q.size(0); p.Hq = q.size(1); p.Hkv = k.size(1); p.n = q.size(2); p.L = k.size(2); p.D = q.size(3);
  p.scale = static_cast<float>(scale);
  p.splits = hass_tree_attention_splits_cuda(&p);
  at::Tensor o_part, lse_part;
  if (p.splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.n;
    o_part = at::empty({p.splits, rows, p.D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.splits, rows}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  HASS_CUDA_CHECK(hass_tree_attention_cuda(&p, attn_dtype(q), c10::cuda::getCurrentCUDAStream()),
                  "tree_attention kernel launch");
  return out;
}

hass::AlignParams align_params(const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl, double scale) {
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "align_attention (CUDA): head_dim must be 64 or 128");
  hass::AlignParams p{};
  p.q = strided4(q); p.k = strided5(kl); p.v = strided5(vl);
  p.B = q.size(0); p.Hq = q.size(1); p.T = q.size(2); p.D = q.size(3);
  p.F = kl.size(0); p.Hkv = kl.size(2);
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> align_attention_cuda(const at::Tensor& q_, const at::Tensor& k_levels,
                                                        const at::Tensor& v_levels, double scale, bool leaky) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_aligned(q_), kl = rows_aligned(k_levels), vl = rows_aligned(v_levels);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};
  hass::AlignParams p = align_params(q, kl, vl, scale);
  p.out = strided4(out);
  p.lse = lse.data_ptr<float>();
  p.leaky = leaky;
  HASS_CUDA_CHECK(hass_align_attention_fwd_cuda(&p, attn_dtype(q), c10::cuda::getCurrentCUDAStream()),
                  "align_attention kernel launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_attention_backward_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_levels, const at::Tensor& v_levels,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_aligned(q_), kl = rows_aligned(k_levels), vl = rows_aligned(v_levels);
  const auto dout = rows_aligned(dout_), out = rows_aligned(out_);
  const auto lse = lse_.contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dkl = at::empty(kl.sizes(), kl.options().memory_format(at::MemoryFormat::Contiguous));
  auto dvl = at::empty(vl.sizes(), vl.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return {dq, dkl.zero_(), dvl.zero_()};
  auto delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  hass::AlignParams p = align_params(q, kl, vl, scale);
  p.out = strided4(out); p.dout = strided4(dout); p.dq = strided4(dq);
  p.dk = strided5(dkl); p.dv = strided5(dvl);
  p.lse = lse.data_ptr<float>(); p.delta = delta.data_ptr<float>();
  HASS_CUDA_CHECK(hass_align_attention_bwd_cuda(&p, attn_dtype(q), c10::cuda::getCurrentCUDAStream()),
                  "align_attention_backward kernel launch");
  return {dq, dkl, dvl};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("align_attention", &align_attention_cuda);
  m.impl("align_attention_backward", &align_attention_backward_cuda);
}

// ---- distill_loss / distill_loss_backward / online_softmax_chunk ----------------------------------------
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

int distill_dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss_cuda(const at::Tensor& draft_logits,
                                                                            const at::Tensor& target_logits,
                                                                            const at::Tensor& loss_mask,
                                                                            int64_t topk) {
  hass_bind::distill_check(draft_logits, target_logits, loss_mask, "distill_loss");
  const int64_t N = draft_logits.size(0), V = draft_logits.size(1);
  TORCH_CHECK(topk >= 1 && topk <= hass::kMaxTopK && topk <= V,
              "distill_loss: topk must be in [1, min(", hass::kMaxTopK, ", V=", V, ")], got ",
              topk);
  const c10::cuda::CUDAGuard guard(draft_logits.device());
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const auto f32 = z.options().dtype(at::kFloat);
  auto stats = at::empty({N, 5}, f32);
  auto idx = at::empty({N, topk}, z.options().dtype(at::kLong));
  auto rows = at::empty({N, 2}, f32);  // m_t * ce_t, m_t * topk_t
  HASS_CUDA_CHECK(hass_distill_loss_fwd_cuda(z.data_ptr(), distill_dtype_code(z, "distill_loss", "draft_logits"),
                                             t.data_ptr(), distill_dtype_code(t, "distill_loss", "target_logits"),
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
  hass_bind::distill_backward_check(grad_ce, grad_topk, draft_logits, target_logits, loss_mask, stats, topk_idx);
  const int64_t N = draft_logits.size(0), V = draft_logits.size(1);
  const c10::cuda::CUDAGuard guard(draft_logits.device());
  const auto z = draft_logits.contiguous(), t = target_logits.contiguous(), m = loss_mask.contiguous();
  const auto st = stats.contiguous(), ix = topk_idx.contiguous();
  const auto f32 = z.options().dtype(at::kFloat);
  const auto gce = grad_ce.to(f32).contiguous(), gtk = grad_topk.to(f32).contiguous();
  const auto S = (m.sum() + 1e-5).contiguous();
  auto grad = at::empty_like(z);
  HASS_CUDA_CHECK(
      hass_distill_loss_bwd_cuda(z.data_ptr(), distill_dtype_code(z, "distill_loss_backward", "draft_logits"),
                                 t.data_ptr(), distill_dtype_code(t, "distill_loss_backward", "target_logits"),
                                 m.data_ptr<float>(), st.data_ptr<float>(), ix.data_ptr<int64_t>(),
                                 static_cast<int>(ix.size(1)), gce.data_ptr<float>(), gtk.data_ptr<float>(),
                                 S.data_ptr<float>(), N, V, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "distill_loss_backward kernel launch");
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> online_softmax_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& state, const at::Tensor& topk_val, const at::Tensor& topk_idx,
    int64_t col0, bool want_exp) {
  TORCH_CHECK(logits.dim() == 2, "online_softmax_chunk: logits must be [N, C], got ", logits.sizes());
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == N && state.size(1) == 2 && state.scalar_type() == at::kFloat,
              "online_softmax_chunk: state must be float32 [N, 2], got ", state.sizes());
  TORCH_CHECK(topk_val.dim() == 2 && topk_val.size(0) == N && topk_val.scalar_type() == at::kFloat &&
                  topk_val.size(1) <= 64,
              "online_softmax_chunk: topk_val must be float32 [N, K<=64], got ", topk_val.sizes());
  TORCH_CHECK(topk_idx.sizes() == topk_val.sizes() && topk_idx.scalar_type() == at::kLong,
              "online_softmax_chunk: topk_idx must be int64 shaped like topk_val, got ", topk_idx.sizes());
  TORCH_CHECK(col0 >= 0 && col0 + C < (int64_t(1) << 31) - 1, "online_softmax_chunk: bad col0 ", col0);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  auto new_state = state.contiguous().clone();  // the kernel updates these copies in place
  auto new_val = topk_val.contiguous().clone();
  auto new_idx = topk_idx.contiguous().clone();
  auto alpha = at::ones({N}, state.options());
  auto e = want_exp ? at::empty_like(x) : at::empty({0}, x.options());
  HASS_CUDA_CHECK(hass_online_softmax_chunk_cuda(
                      x.data_ptr(), distill_dtype_code(x, "online_softmax_chunk", "logits"), N, C,
                      new_state.data_ptr<float>(), alpha.data_ptr<float>(), new_val.data_ptr<float>(),
                      new_idx.data_ptr<int64_t>(), static_cast<int>(new_val.size(1)), col0,
                      want_exp ? e.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()),
                  "online_softmax_chunk kernel launch");
  return {e, alpha, new_state, new_val, new_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) {
  m.impl("distill_loss", &distill_loss_cuda);
  m.impl("distill_loss_backward", &distill_loss_backward_cuda);
  m.impl("online_softmax_chunk", &online_softmax_chunk_cuda);
}
