// Host-side helpers of the launchers: device selection, error checks, kernel loading.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "gapkern.h"

namespace gapkern {

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
// n rounded up to a multiple of `to` (workspace regions start 256-byte aligned).
inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Bytes of the float32 latent step's workspace (gemm.cu); latent_workspace_bytes reports it.
size_t strided_workspace_bytes(int B, int D, int d);

// Makes `device` current (loading the kernels on first use of that device) for this scope (in this extension's own CUDA runtime)
// and restores the previous device on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Throws Error naming `what` when err != cudaSuccess.
void check_cuda(cudaError_t err, const char* what);
// After a launch: throws on a launch error (bad configuration, no kernel image, ...).
void check_launch(const char* kernel);
int sm_count(int device);

// rowwise.cu: norm_calibrate from a float32 (B, D) buffer (the latent steps' unscaled latents) into
// dst (B, D) of dtype; the caller holds a DeviceGuard and checked the sizes.
void calibrate_from_f32(const Launch& L, DType dtype, Mat src, Vec tau, float eps, Vec mask, OutMat dst);

// Each kernel file lists its kernels so check_device can load them all up
// front (CUDA loads modules lazily: a first load inside graph capture is best avoided).
void add_gemm_kernels(std::vector<const void*>& out);
void add_latent_mma_kernels(std::vector<const void*>& out);
void add_rowwise_kernels(std::vector<const void*>& out);

}  // namespace gapkern
