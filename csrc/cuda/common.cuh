// Device helpers shared by the CUDA kernels: warp reductions, dtype conversion, and the few PTX instructions the
// tensor-core kernels use, as small inline-asm wrappers (sm_80 and later; the project builds for sm_90a).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace hass {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Max over the warp; a lane keeps its value unless the other is larger (a NaN is kept, not dropped as fmaxf would).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFullMask, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// Reductions over the 4 lanes of a quad (lanes 4g .. 4g+3 hold one row of an mma accumulator tile).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

// ---- dtypes ----------------------------------------------------------------------------------------

// Conversion of one element to/from fp32, and 8 consecutive elements (16-byte aligned) loaded or stored with
// 16-byte accesses (two for fp32). kTensorCore: the mma kernels take this dtype as tensor-core operands.
template <typename T>
struct Io;

template <>
struct Io<float> {
  static constexpr bool kTensorCore = false;
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
  static __device__ __forceinline__ void load8(const float* p, float* o) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
  }
  static __device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

// The 16-bit dtypes: H with its pair type H2 and their fp32 conversions.
template <typename H2, typename H, float2 (*ToF2)(H2), H2 (*FromF2)(float2), float (*ToF)(H), H (*FromF)(float)>
struct Io16 {
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float to(H x) { return ToF(x); }
  static __device__ __forceinline__ H from(float x) { return FromF(x); }
  static __device__ __forceinline__ void load8(const H* p, float* o) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const H2* h = reinterpret_cast<const H2*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = ToF2(h[j]);
      o[2 * j] = f.x;
      o[2 * j + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store8(H* p, const float* v) {
    uint4 u;
    H2* h = reinterpret_cast<H2*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = FromF2(make_float2(v[2 * j], v[2 * j + 1]));
    *reinterpret_cast<uint4*>(p) = u;
  }
};

__device__ __forceinline__ float2 bf2_to_f2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ __nv_bfloat162 f2_to_bf2(float2 x) { return __float22bfloat162_rn(x); }
__device__ __forceinline__ float bf_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 f_to_bf(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float2 h2_to_f2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ __half2 f2_to_h2(float2 x) { return __float22half2_rn(x); }
__device__ __forceinline__ float h_to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ __half f_to_h(float x) { return __float2half_rn(x); }

template <>
struct Io<__nv_bfloat16> : Io16<__nv_bfloat162, __nv_bfloat16, bf2_to_f2, f2_to_bf2, bf_to_f, f_to_bf> {};
template <>
struct Io<__half> : Io16<__half2, __half, h2_to_f2, f2_to_h2, h_to_f, f_to_h> {};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return Io<T>::to(x);
}

// Two 16-bit values in one register, lo in the low half (the operand order of mma fragments).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// Two floats rounded to T and packed.
template <typename T>
__device__ __forceinline__ uint32_t pack2f(float lo, float hi) {
  return pack2<T>(Io<T>::from(lo), Io<T>::from(hi));
}

// 16 bytes read once (weights streamed by a decode-sized GEMM): not kept in L1.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// ---- PTX: asynchronous copies, ldmatrix, mma ---------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg); src_bytes < 16 zero-fills the rest (0: all).
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8, and
// receives in r[i] the elements (l / 4, 2 (l % 4) + {0, 1}) of matrix i (transposed with .trans).
// The address is a shared-state-space address (smem_addr), which keeps address arithmetic in 32 bits.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}

// c (16x8 fp32) += a (16x16, row-major fragment) * b (16x8, column fragment), T = bf16 or fp16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(sizeof(T) == 2, "mma_16816 takes 16-bit operands");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace cuda
}  // namespace hass
