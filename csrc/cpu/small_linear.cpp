// CPU kernel of hass::small_linear (see csrc/include/hass/small_gemm.h for the arithmetic and why).
// The same header code is compiled three times, for AVX-512, AVX2+FMA and the baseline ISA, and the widest one
// the CPU supports is picked once. The threads split the weight rows, so each streams its own part of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hass/small_gemm.h"

namespace {

template <typename W>
using RowsFn = void (*)(const float*, int64_t, int64_t, const W*, int64_t, int64_t, const float*, float*, int64_t,
                        int64_t, int64_t);

// Register blocking per ISA: 4 x 4 accumulators fill 16 of the 32 zmm registers; a 16-lane vector is two ymm
// (AVX2) or four xmm (baseline) registers, so those take fewer input rows per block. W: float or uint16_t (bf16).
template <typename W>
__attribute__((target("avx512f,fma"))) void rows_avx512(const float* x, int64_t M, int64_t ldx, const W* w,
                                                        int64_t ldw, int64_t K, const float* bias, float* y,
                                                        int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<4, 4>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw,
                                                   int64_t K, const float* bias, float* y, int64_t ldy, int64_t n0,
                                                   int64_t n1) {
  hass::sg_rows<2, 2>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
void rows_baseline(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K, const float* bias,
                   float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<1, 2>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
RowsFn<W> pick_rows() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return rows_avx512<W>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2<W>;
  return rows_baseline<W>;
}

template <typename W>
void run_rows(const float* xp, int64_t M, const W* wp, int64_t ldw, int64_t N, int64_t K, const float* bp, float* yp) {
  static const RowsFn<W> rows = pick_rows<W>();
  // ~32 KiB of fp32 weight per task at least: small layers stay on one thread, big ones split evenly.
  const int64_t grain = std::max<int64_t>(2, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(xp, M, K, wp, ldw, K, bp, yp, N, n0, n1); });
}

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && (weight.scalar_type() == at::kFloat ||
                                                 weight.scalar_type() == at::kBFloat16),
              "small_linear: x must be float32 and weight float32 or bfloat16, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "small_linear: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "small_linear: x [..., K] with K = ", weight.size(1),
              " expected, got ", x.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N,
                "small_linear: bias must be float32 [", N, "], got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  const float* xp = x2.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (w.scalar_type() == at::kBFloat16) {
    run_rows(xp, M, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.stride(0), N, K, bp, yp);
  } else {
    run_rows(xp, M, w.data_ptr<float>(), w.stride(0), N, K, bp, yp);
  }
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) { m.impl("small_linear", &small_linear_cpu); }
