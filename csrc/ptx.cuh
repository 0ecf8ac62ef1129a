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

// The specialisation for T, whose operands PTX calls TYPE (the instruction is the same otherwise).
#define GAPKERN_MMA(T, TYPE)                                                                          \
  template <>                                                                                         \
  __device__ __forceinline__ void mma<T>(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "         \
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                            \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                     \
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));                         \
  }
GAPKERN_MMA(bf16, "bf16")
GAPKERN_MMA(f16, "f16")
#undef GAPKERN_MMA

// A 16-byte load, zero where !pred, with the cache qualifiers HINT. Plain (coherent) ld.global:
// ptxas moves ld.global.nc freely across barriers, and warp_barrier below relies on loads staying put.
#define GAPKERN_LOAD16(NAME, HINT)                                               \
  __device__ __forceinline__ uint4 NAME(const uint4* p, bool pred) {             \
    uint4 v;                                                                     \
    asm volatile(                                                                \
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"                            \
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"     \
        " @p ld.global" HINT ".v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"                \
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)                             \
        : "l"(p), "r"(int(pred)));                                               \
    return v;                                                                    \
  }
GAPKERN_LOAD16(load16, "")
// For data read once per launch (the packed matrices): do not keep it in L1.
GAPKERN_LOAD16(load16_stream, ".L1::no_allocate")
#undef GAPKERN_LOAD16

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
