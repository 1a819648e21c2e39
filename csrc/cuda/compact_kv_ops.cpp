// CUDA binding of hass::compact_kv (kernel: compact_kv.cu; checks: csrc/checks/compact_kv.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks/compact_kv.h"
#include "cuda/cuda_check.h"
#include "hass/compact_kv.h"

extern "C" cudaError_t hass_compact_kv_cuda(void* cache, int elem_bytes, hass::CacheGeom g, const int64_t* src,
                                            const int64_t* dst, int64_t m, int* status, cudaStream_t stream);

namespace {

// hass_compact_kv_cuda stages one column of a row's m entries in shared memory and refuses larger plans; checked
// here for every cache before the first launch, so that no cache is moved when a later one would be refused.
constexpr int64_t kMaxColumnBytes = 32 * 1024;

void compact_kv_cuda(at::TensorList caches, const at::Tensor& src_slots, const at::Tensor& dst_start) {
  const std::vector<hass::CacheGeom> geoms = hass_check::compact_kv_args(caches, src_slots, dst_start);
  const int64_t m = src_slots.size(1);
  for (size_t c = 0; c < caches.size(); ++c)
    hass_check::require(hass_check::Op{"compact_kv"}, m * caches[c].element_size() <= kMaxColumnBytes,
                        "the CUDA kernel moves at most ", kMaxColumnBytes / caches[c].element_size(),
                        " entries per row for caches[", c, "] (", caches[c].scalar_type(), "), got m = ", m);
  const c10::cuda::CUDAGuard guard(src_slots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Outside graph capture: a host check of the slot values (one small copy) validates every row before any cache
  // is changed, and the kernel's status is read after. Under capture nothing is read: the kernel still checks
  // every row on the device and leaves a row whose plan is out of range unmoved.
  const bool capturing = hass_cuda_capturing(stream);
  if (!capturing)
    hass_check::compact_kv_values(hass_check::host_contiguous(src_slots), hass_check::host_contiguous(dst_start),
                                  geoms);
  const auto src = src_slots.contiguous();
  const auto dst = dst_start.contiguous();
  auto status = at::zeros({1}, src.options().dtype(at::kInt));
  for (size_t c = 0; c < caches.size(); ++c) {
    HASS_CUDA_CHECK(hass_compact_kv_cuda(caches[c].data_ptr(), caches[c].element_size(), geoms[c],
                                         src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), m, status.data_ptr<int>(),
                                         stream),
                    "compact_kv kernel launch");
  }
  // The kernel validates the plan again on the device; after the host check this guards the kernel itself.
  if (capturing) return;
  TORCH_CHECK(status.item<int>() == hass::kOk,
              "compact_kv: src_slots/dst_start address slots outside the cache (no row was moved for them)");
}

}  // namespace

TORCH_LIBRARY_IMPL(hass, CUDA, m) { m.impl("compact_kv", &compact_kv_cuda); }
