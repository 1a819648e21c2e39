// Shared definitions for the framework-free kernel headers (compiled by g++ for the CPU kernels and by
// nvcc for the CUDA kernels). Nothing here may include torch.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HASS_HD __host__ __device__ __forceinline__
#else
#define HASS_HD inline
#endif

// Per-element functions that must inline into the CPU streaming loops, or those loops do not vectorise.
#if defined(__CUDACC__)
#define HASS_HD_HOT HASS_HD
#else
#define HASS_HD_HOT inline __attribute__((always_inline))
#endif

namespace hass {

// Status codes written by kernels that validate their inputs on the device (the host reads one int).
enum Status : int {
  kOk = 0,
  kBadIndex = 1,   // an index points outside the tensor it addresses
  kBadTree = 2,    // parents do not form a tree in node order
  kNonFinite = 3,  // NaN/Inf where a finite value is required
};

// exp(x) for the streaming loops. Host: a branch-free Cody-Waite + degree-6 polynomial exp (about 1 ulp)
// that compilers vectorise; 0 below -87 (the float range); NaN propagates. Device: the hardware exp2.
HASS_HD_HOT float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float xc = x < -87.0f ? -87.0f : x;                            // x <= 0 in all uses
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = xc - k * 0.693359375f;                                     // ln 2 split in two parts
  r = r - k * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  union { int i; float f; } scale;
  scale.i = (static_cast<int>(k) + 127) << 23;
  return x < -87.0f ? 0.0f : y * scale.f;
#endif
}

}  // namespace hass
