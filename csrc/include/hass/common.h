// Shared definitions for the framework-free kernel headers (compiled by g++ for the CPU kernels and by
// nvcc for the CUDA kernels). Nothing here may include torch.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HASS_HD __host__ __device__ __forceinline__
#else
#define HASS_HD inline
#endif

namespace hass {

// Status codes written by kernels that validate their inputs on the device (the host reads one int).
enum Status : int {
  kOk = 0,
  kBadIndex = 1,   // an index points outside the tensor it addresses
  kBadTree = 2,    // parents do not form a tree in node order
  kNonFinite = 3,  // NaN/Inf where a finite value is required
};

}  // namespace hass
