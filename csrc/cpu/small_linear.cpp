// CPU kernel of hass::small_linear (see csrc/include/hass/small_linear.h for the arithmetic and why).
// The same header code is compiled once per instruction-set level of cpu_dispatch.h, and the widest one the CPU
// supports is picked once. The threads split the weight rows, so each streams its own part of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks/small_linear.h"
#include "cpu_dispatch.h"
#include "hass/small_linear.h"

namespace {

template <typename W>
using RowsFn = void (*)(const float*, int64_t, int64_t, const W*, int64_t, int64_t, const float*, float*, int64_t,
                        int64_t, int64_t);

// Register blocking per level: 4 x 4 accumulators fill 16 of the 32 zmm registers (v4); a 16-lane vector is two
// ymm (v3) or four xmm (baseline) registers, so those take fewer input rows per block. W: float or uint16_t (bf16).
template <typename W>
HASS_CPU_V4 void rows_v4(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                         const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<4, 4>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
HASS_CPU_V3 void rows_v3(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                         const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<2, 2>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
void rows_baseline(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K, const float* bias,
                   float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<1, 2>(x, M, ldx, w, ldw, K, bias, y, ldy, n0, n1);
}

template <typename W>
void run_rows(const float* xp, int64_t M, const W* wp, int64_t ldw, int64_t N, int64_t K, const float* bp, float* yp) {
  static const RowsFn<W> rows = hass_cpu::pick<RowsFn<W>>(rows_v4<W>, rows_v3<W>, rows_baseline<W>);
  // ~32 KiB of fp32 weight per task at least: small layers stay on one thread, big ones split evenly.
  const int64_t grain = std::max<int64_t>(2, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(xp, M, K, wp, ldw, K, bp, yp, N, n0, n1); });
}

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  hass_check::small_linear_args(x, weight, bias);
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  if (K == 0) return (b.defined() ? y.copy_(b.expand({M, N})) : y.zero_()).view(out_shape);  // an empty sum
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
