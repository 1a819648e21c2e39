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

// Register blocking per level. On v3 and the baseline a 16-lane vector is a pair of 8-lane halves (see the header):
// two ymm registers on v3, four xmm on the baseline; 2 x 2 blocks (8 ymm accumulators) were the fastest of 1x2 .. 3x4
// on an AVX2 machine from M = 4 up. v4 computes in one zmm register per 16 lanes (sg_zvec) and has 32 of them, so it
// holds 4 x 4 blocks (16 accumulators): each weight block is reread from L1 half as often and each FMA covers all 16
// lanes. Against the 2 x 4 blocks of ymm pairs it had before, on an AVX-512 Xeon (one thread, SmolLM2-135M layers):
// M = 4 1.1x, M = 5 1.26x, M = 8 1.6x faster; M <= 3 the same (memory bound). Any blocking and either vector type
// gives the same bits: the lane rule fixes every sum's order. W: float, uint16_t (bf16) or sg_f16 (read through the
// hardware conversion at v3/v4: sg_hw_ptr).
template <typename W>
HASS_CPU_V4 void rows_v4(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                         const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<4, 4, typename hass::sg_hw<W>::type, hass::sg_zvec>(x, M, ldx, hass::sg_hw_ptr(w), ldw, K, bias, y, ldy,
                                                                   n0, n1);
}

template <typename W>
HASS_CPU_V3 void rows_v3(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                         const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  hass::sg_rows<2, 2>(x, M, ldx, hass::sg_hw_ptr(w), ldw, K, bias, y, ldy, n0, n1);
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
  TORCH_CHECK(x.device().is_cpu(), "hass::small_linear: x must be on the CPU for the CPU kernel, got ", x.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  // The kernel reads fp32 rows and writes fp32 sums; 16-bit inputs are widened exactly and the sums rounded to
  // x's dtype once at the end, so a row's result is still independent of the other rows.
  const at::Tensor x2 = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M != 0 && N != 0 && K == 0) {
    b.defined() ? y.copy_(b.expand({M, N})) : y.zero_();  // an empty sum
  } else if (M != 0 && N != 0) {
    const float* xp = x2.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    if (w.scalar_type() == at::kBFloat16) {
      run_rows(xp, M, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.stride(0), N, K, bp, yp);
    } else if (w.scalar_type() == at::kHalf) {
      run_rows(xp, M, reinterpret_cast<const hass::sg_f16*>(w.data_ptr<at::Half>()), w.stride(0), N, K, bp, yp);
    } else {
      run_rows(xp, M, w.data_ptr<float>(), w.stride(0), N, K, bp, yp);
    }
  }
  return y.to(x.scalar_type()).view(out_shape);
}

// On the CPU the tensor-core op is small_linear itself: the CPU kernel is row-invariant already.
at::Tensor small_linear_tc_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  hass_check::small_linear_tc_args(x, weight, bias);
  return small_linear_cpu(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CPU, m) {
  m.impl("small_linear", &small_linear_cpu);
  m.impl("small_linear_tc", &small_linear_tc_cpu);
}
