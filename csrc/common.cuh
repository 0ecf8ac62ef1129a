// Helpers shared by the kernels: dtype conversion, reductions, the launch helper.
#pragma once

#ifdef GAPKERN_EMULATE
#include "emulate/host.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include <cstdint>
#include <string>

#include "gapkern.h"
#include "runtime.h"

namespace gapkern {

#ifndef GAPKERN_EMULATE
// kernel<<<grid, block, 0, stream>>>(args...); the host emulation runs the blocks on threads.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, const A&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}
#endif

using bf16 = __nv_bfloat16;
using f16 = __half;

// Calls f(T{}) with the storage type T of a float dtype code.
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); break;
    case DType::BF16: f(bf16{}); break;
    case DType::F16: f(f16{}); break;
    default: throw Error("gapkern cuda backend: unsupported dtype code " + std::to_string(int(dtype)));
  }
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<bf16>(bf16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<f16>(f16 v) { return __half2float(v); }

// Round to nearest even, like torch's .to(dtype).
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_f<f16>(float v) { return __float2half_rn(v); }

// An element of a float tensor whose dtype is only known at run time.
__device__ __forceinline__ float load_any(const void* p, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::BF16: return __bfloat162float(static_cast<const bf16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const f16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x a multiple of 32, <= 1024.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max over the block; every thread gets the result. As block_sum.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : 0.f;
  return warp_max(v);
}

// A running Euclidean norm ||x|| = m sqrt(s): m the largest |x_i| so far, s the sum of (x_i / m)^2
// (LAPACK's nrm2 scaling), so that squares of entries near the float32 limits neither overflow
// (all-zero rows) nor underflow. A NaN entry makes s NaN.
struct Norm {
  float m = 0.f, s = 0.f;
};

__device__ __forceinline__ void norm_add(Norm& n, float v) {
  const float a = fabsf(v);
  if (!(a <= n.m)) {  // a new largest entry, or NaN
    const float r = n.m / a;
    n.s = fmaf(n.s, r * r, 1.f);
    n.m = a;
  } else if (a > 0.f) {
    const float r = a / n.m;
    n.s = fmaf(r, r, n.s);
  }
}

// The norm of a row whose entries the threads of the block hold in parts; every thread gets it.
__device__ __forceinline__ Norm block_norm(Norm n) {
  const float m = block_max(n.m);
  const float r = m > 0.f ? n.m / m : 0.f;
  return Norm{m, block_sum(n.s * r * r)};
}

// tau / max(||x||, eps) for tau > 0, else 1. Divided as (tau / m) / sqrt(s): ||x|| itself may
// exceed the largest float32.
__device__ __forceinline__ float calibration_scale(Norm n, float tau, float eps) {
  if (!(tau > 0.f)) return 1.f;
  const float root = sqrtf(n.s);            // >= 1 once m > 0: the largest entry adds exactly 1
  if (n.m < eps / fmaxf(root, 1.f)) return tau / eps;  // ||x|| < eps, without forming ||x||
  return tau / n.m / root;
}

}  // namespace gapkern
