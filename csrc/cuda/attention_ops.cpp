// CUDA bindings of hass::tree_attention, hass::align_attention and hass::align_attention_backward (kernels:
// attention.cu; checks: csrc/checks/tree_attention.h and align_attention.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks/align_attention.h"
#include "checks/tree_attention.h"
#include "cuda/cuda_check.h"
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
                               const at::Tensor& tree_mask, const std::optional<at::Tensor>& prefix_lens,
                               double scale) {
  const hass_check::TreeAttnShape shape = hass_check::tree_attention_args(q_, k_, v_, tree_mask, prefix_lens, scale);
  const c10::cuda::CUDAGuard guard(q_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor pl;
  if (prefix_lens.has_value()) {
    pl = prefix_lens->contiguous();
    // prefix_lens values: a host check (one small read) unless a CUDA graph is being captured; under capture the
    // kernel clamps each value into [0, L - n], which keeps every read inside k and v.
    if (!hass_cuda_capturing(stream)) hass_check::tree_attention_prefix_values(hass_check::host_contiguous(pl), shape);
  }
  const auto q = rows_aligned(q_), k = rows_aligned(k_), v = rows_aligned(v_);
  const auto mask = tree_mask.contiguous();
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  hass::TreeAttnParams p{};
  p.q = strided4(q); p.k = strided4(k); p.v = strided4(v); p.out = strided4(out);
  p.mask = mask.data_ptr<bool>();
  p.prefix_lens = pl.defined() ? pl.data_ptr<int64_t>() : nullptr;
  p.B = static_cast<int>(shape.B); p.Hq = static_cast<int>(shape.Hq); p.Hkv = static_cast<int>(shape.Hkv);
  p.n = static_cast<int>(shape.n); p.L = static_cast<int>(shape.L); p.D = static_cast<int>(shape.d);
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
  HASS_CUDA_CHECK(hass_tree_attention_cuda(&p, attn_dtype(q), stream), "tree_attention kernel launch");
  return out;
}

hass::AlignParams align_params(const at::Tensor& q, const at::Tensor& kl, const at::Tensor& vl,
                               const hass_check::AlignShape& s, double scale) {
  hass::AlignParams p{};
  p.q = strided4(q); p.k = strided5(kl); p.v = strided5(vl);
  p.B = static_cast<int>(s.B); p.Hq = static_cast<int>(s.Hq); p.T = static_cast<int>(s.T);
  p.D = static_cast<int>(s.d); p.F = static_cast<int>(s.F); p.Hkv = static_cast<int>(s.Hkv);
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> align_attention_cuda(const at::Tensor& q_, const at::Tensor& k_levels,
                                                        const at::Tensor& v_levels, double scale, bool leaky) {
  const hass_check::AlignShape shape = hass_check::align_attention_forward_args(q_, k_levels, v_levels, scale);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_aligned(q_), kl = rows_aligned(k_levels), vl = rows_aligned(v_levels);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({shape.B, shape.Hq, shape.T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};
  hass::AlignParams p = align_params(q, kl, vl, shape, scale);
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
  const hass_check::AlignShape shape =
      hass_check::align_attention_backward_args(dout_, q_, k_levels, v_levels, out_, lse_, scale);
  const c10::cuda::CUDAGuard guard(q_.device());
  const auto q = rows_aligned(q_), kl = rows_aligned(k_levels), vl = rows_aligned(v_levels);
  const auto dout = rows_aligned(dout_), out = rows_aligned(out_);
  const auto lse = lse_.contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dkl = at::empty(kl.sizes(), kl.options().memory_format(at::MemoryFormat::Contiguous));
  auto dvl = at::empty(vl.sizes(), vl.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return {dq, dkl.zero_(), dvl.zero_()};
  auto delta = at::empty({shape.B, shape.Hq, shape.T}, q.options().dtype(at::kFloat));
  hass::AlignParams p = align_params(q, kl, vl, shape, scale);
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
