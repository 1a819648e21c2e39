// HASS_CUDA_CHECK(expr, what): turns a failed CUDA runtime call (e.g. a kernel launch) into an error naming it.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define HASS_CUDA_CHECK(expr, what)                                           \
  do {                                                                        \
    const cudaError_t err__ = (expr);                                         \
    TORCH_CHECK(err__ == cudaSuccess, what, ": ", cudaGetErrorString(err__)); \
  } while (0)
