// Host emulation of the CUDA features the kernels of csrc/ use, so that they run on a CPU in
// tests (GAPKERN_EMULATE: tests/kernels/test_cuda_backend.py builds gapkern._C this way with g++).
//
// Every CUDA thread is a std::thread, blocks run one after another, __shared__ is a function
// static (one block at a time), and warp-collective operations (shuffles, mma.sync) exchange
// values through per-warp scratch between two warp barriers. The mma emulation follows the
// PTX ISA fragment layout of mma.m16n8k16.row.col (16-bit inputs, float32 accumulators).
// Slow and for correctness only: it checks indexing, fragment layouts, reductions and the
// arrival-counter protocol, not timing, and not the GPU memory model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

using std::max;
using std::min;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace gapkern {
namespace emu {

struct Warp {
  std::barrier<> sync{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};

struct Block {
  explicit Block(int threads) : sync(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* block = nullptr;

inline Warp& warp() { return *block->warps[threadIdx.x / 32]; }

template <typename T>
inline float bits_to_float(uint32_t bits) {
  const uint16_t h = uint16_t(bits);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    __half x;
    std::memcpy(&x, &h, 2);
    return __half2float(x);
  }
}

}  // namespace emu

// One blockDim.x-thread block after another; each CUDA thread a std::thread.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, const A&... args) {
  const int threads = int(block.x);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::Block blk(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = make_uint3(unsigned(t), 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = block;
            gridDim = grid;
            emu::block = &blk;
            kernel(args...);
            emu::warp().sync.arrive_and_drop();  // a finished thread no longer holds up a barrier
            blk.sync.arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
}

// The PTX of ptx.cuh.
template <typename T>
inline void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp();
  const int lane = threadIdx.x & 31;
  w.a[lane][0] = a.x; w.a[lane][1] = a.y; w.a[lane][2] = a.z; w.a[lane][3] = a.w;
  w.b[lane][0] = b0; w.b[lane][1] = b1;
  w.sync.arrive_and_wait();
  // A (16x16): lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2.
  // B (16x8):  lane col * 4 + (k % 8) / 2, register (k >= 8), half k % 2.
  auto A = [&](int row, int k) {
    return emu::bits_to_float<T>(w.a[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)] >> (16 * (k & 1)));
  };
  auto B = [&](int k, int col) {
    return emu::bits_to_float<T>(w.b[col * 4 + ((k & 7) >> 1)][k >> 3] >> (16 * (k & 1)));
  };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {  // C: row g + 8 (i >= 2), column 2 t + (i % 2)
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  w.sync.arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline uint4 load16(const uint4* p, bool pred) { return pred ? *p : make_uint4(0, 0, 0, 0); }
inline uint4 load16_stream(const uint4* p, bool pred) { return load16(p, pred); }
inline void cp_async16(void* smem, const void* gmem, bool pred) {
  if (pred) std::memcpy(smem, gmem, 16);
  else std::memset(smem, 0, 16);
}
inline void cp_async_wait_all() {}
inline void warp_barrier(int) { emu::warp().sync.arrive_and_wait(); }

}  // namespace gapkern

// A device trap aborts the process here; the ops check CPU tensors before any kernel could trap.
[[noreturn]] inline void __trap() { std::abort(); }

inline void __syncthreads() { gapkern::emu::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { gapkern::emu::warp().sync.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  gapkern::emu::Warp& w = gapkern::emu::warp();
  const int lane = threadIdx.x & 31;
  w.f[lane] = v;
  w.sync.arrive_and_wait();
  const float r = w.f[lane ^ mask];
  w.sync.arrive_and_wait();
  return r;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
