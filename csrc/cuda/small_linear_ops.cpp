// CUDA binding of hass::small_linear (kernel: small_linear.cu; checks: csrc/checks/small_linear.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "checks/small_linear.h"
#include "cuda/cuda_check.h"

extern "C" cudaError_t hass_small_linear_cuda(const void* x, int x_dtype, int64_t ldx, const void* w, int w_dtype,
                                              int64_t ldw, const float* bias, void* y, int64_t M, int64_t N,
                                              int64_t K, cudaStream_t stream);
extern "C" cudaError_t hass_small_linear_tc_cuda(const void* x, int dtype, int64_t ldx, const void* w, int64_t ldw,
                                                 const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                                                 cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {  // small_linear_args admits these three
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    default: return 2;  // float16
  }
}

at::Tensor small_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  hass_check::small_linear_args(x, weight, bias);
  hass_check::require(hass_check::Op{"small_linear"}, x.is_cuda(),
                      "the CUDA kernel needs x, weight and bias on a CUDA device, got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  // Rows with a unit last stride are read in place (x as a view when reshape allows it, weight with its row stride).
  // The kernel addresses the x rows of a tile with 32-bit offsets (8 rows of ldx elements).
  constexpr int64_t kMaxRowStride = std::numeric_limits<int32_t>::max() / 8;
  hass_check::require(hass_check::Op{"small_linear"}, K <= kMaxRowStride, "the CUDA kernel takes K <= ",
                      kMaxRowStride, ", got K = ", K);
  at::Tensor x2 = x.reshape({M, K});
  if ((K > 1 && x2.stride(1) != 1) || (M > 1 && x2.stride(0) > kMaxRowStride)) x2 = x2.contiguous();
  const int64_t ldx = M > 1 ? x2.stride(0) : K;  // one row: its stride is meaningless
  const at::Tensor w = (K > 1 && weight.stride(1) != 1) ? weight.contiguous() : weight;
  at::Tensor b;  // widened once: bf16/fp16 -> fp32 is exact
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  if (K == 0) return (b.defined() ? y.copy_(b.expand({M, N})) : y.zero_()).view(out_shape);  // an empty sum
  HASS_CUDA_CHECK(hass_small_linear_cuda(x2.data_ptr(), dtype_code(x2), ldx, w.data_ptr(), dtype_code(w),
                                         w.stride(0), b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr(), M,
                                         N, K, c10::cuda::getCurrentCUDAStream()),
                  "small_linear kernel launch");
  return y.view(out_shape);
}

// Rows the tensor-core kernel reads with 16-byte loads: unit last stride, 16-byte aligned start and row stride.
bool rows_aligned(const at::Tensor& t) {
  return t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) <= 1 || (t.stride(0) * static_cast<int64_t>(t.element_size())) % 16 == 0);
}

at::Tensor small_linear_tc_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  hass_check::small_linear_tc_args(x, weight, bias);
  hass_check::require(hass_check::Op{"small_linear_tc"}, x.is_cuda(),
                      "the CUDA kernel needs x, weight and bias on a CUDA device, got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  // Unaligned rows are copied into fresh (aligned) storage: the sums depend on the values only, never on where
  // they were read from.
  at::Tensor x2 = x.reshape({M, K});
  if (M > 0 && K > 0 && !rows_aligned(x2)) x2 = x2.clone(at::MemoryFormat::Contiguous);
  at::Tensor w = weight;
  if (N > 0 && K > 0 && !rows_aligned(w)) w = w.clone(at::MemoryFormat::Contiguous);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  if (K == 0) return (b.defined() ? y.copy_(b.expand({M, N})) : y.zero_()).view(out_shape);
  HASS_CUDA_CHECK(hass_small_linear_tc_cuda(x2.data_ptr(), dtype_code(x2), M > 1 ? x2.stride(0) : K, w.data_ptr(),
                                            N > 1 ? w.stride(0) : K, b.defined() ? b.data_ptr<float>() : nullptr,
                                            y.data_ptr(), M, N, K, c10::cuda::getCurrentCUDAStream()),
                  "small_linear_tc kernel launch");
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) {
  m.impl("small_linear", &small_linear_cuda);
  m.impl("small_linear_tc", &small_linear_tc_cuda);
}
