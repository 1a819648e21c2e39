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
