// HASS_CUDA_CHECK(expr, what): turns a failed CUDA runtime call (e.g. a kernel launch) into an error naming it.
// hass_cuda_capturing(stream): whether a CUDA graph is being captured on the stream (no host reads then).
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define HASS_CUDA_CHECK(expr, what)                                           \
  do {                                                                        \
    const cudaError_t err__ = (expr);                                         \
    TORCH_CHECK(err__ == cudaSuccess, what, ": ", cudaGetErrorString(err__)); \
  } while (0)

inline bool hass_cuda_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  HASS_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture), "CUDA stream capture query");
  return capture != cudaStreamCaptureStatusNone;
}
