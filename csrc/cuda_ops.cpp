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
