// The PTX the tensor-core latent kernels use, each behind a small named function
// (emulate/host.h defines the same names for the host emulation used in tests).
#pragma once

#include "common.cuh"

#ifndef GAPKERN_EMULATE
namespace gapkern {

// c += A @ B for one 16x8x16 tile (mma.sync.m16n8k16.row.col, float32 accumulators):
// a holds the lane's A fragment (4 x 2 halves), b0 / b1 its B fragment (2 x 2 halves).
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma<bf16>(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<f16>(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// A 16-byte load, zero where !pred. Plain (coherent) ld.global: ptxas moves ld.global.nc
// freely across barriers, and warp_barrier below relies on loads staying put.
__device__ __forceinline__ uint4 load16(const uint4* p, bool pred) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(pred)));
  return v;
}

// The same for data read once per launch (the packed matrices): do not keep it in L1.
__device__ __forceinline__ uint4 load16_stream(const uint4* p, bool pred) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(pred)));
  return v;
}

// 16 bytes global -> shared without a register round trip (zero-filled where !pred).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(pred ? 16 : 0));
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// A barrier for the 32 threads of one warp (named barrier `id`, 1..15): memory operations do
// not move across it, unlike across __syncwarp.
__device__ __forceinline__ void warp_barrier(int id) { asm volatile("bar.sync %0, 32;" ::"r"(id) : "memory"); }

}  // namespace gapkern
#endif  // GAPKERN_EMULATE
