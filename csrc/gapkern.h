// gapkern CUDA backend: the C++ launchers of SPEC section 2, torch-free.
//
// Every tensor crosses this boundary as a typed view: a raw device pointer, its shape and its
// strides in elements; a null pointer means an absent optional tensor. Launchers take their sizes
// from the shapes and check that they agree before touching a pointer (std::invalid_argument),
// run on the given device and enqueue on the given stream (the caller's current stream), never
// synchronise and never allocate, so they can be captured in a CUDA graph. CUDA errors throw
// gapkern::Error with a message naming the cause.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gapkern {

// The version of this interface; gapkern/ops/_cuda.py refuses an extension built from another
// (the binding exposes it as gapkern._C.ABI_VERSION). 3: typed views and the DType enum.
// 4: latent_step_strided takes no dtype (it is float32 only).
constexpr int kAbiVersion = 4;

// Storage dtypes; the binding exposes them as gapkern._C.DType, named as torch names them.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, I64 = 4 };

struct Mat {  // a (rows, cols) view: element (i, j) at p[i * s0 + j * s1]
  const void* p;
  int64_t rows, cols, s0, s1;
};
struct OutMat {  // the same, written by the launcher
  void* p;
  int64_t rows, cols, s0, s1;
};
struct Vec {  // element i at p[i * s]; p == nullptr: absent (its length is the caller's rows or cols)
  const void* p = nullptr;
  int64_t s = 0;
};
struct Packed {  // a (rows, cols) matrix prepacked in mma.m16n8k16 A-fragment order (ops/_cuda.py: _pack_a)
  const void* p;
  int64_t rows, cols;
};
struct Workspace {  // zero-initialised once by the caller, then reused (its counters reset themselves)
  void* p;
  size_t bytes;
};
struct Launch {
  int device;
  cudaStream_t stream;
};

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws Error("gapkern cuda backend: no CUDA device (...)") when the device
// cannot be used; loads every kernel of the extension on first use.
void check_device(int device);

// The CUDA version the driver supports (0 without a driver) and the one this extension's
// runtime is (1000 * major + 10 * minor). Creates no context.
void cuda_versions(int* driver, int* runtime);

// out (B, d) = hidden (B, D) @ weight (D, d) + bias (d), in dtype.
void pca_project(const Launch& L, DType dtype, Mat hidden, Mat weight, Vec bias, OutMat out);

// The same for half types on the projection kernel of the latent step: weight_t is weight.T (d, D)
// packed; the workspace has project_workspace_bytes. One launch.
void pca_project_packed(const Launch& L, DType dtype, Mat hidden, Packed weight_t, Vec bias, OutMat out,
                        Workspace workspace);

// out (B, D) = mean (D) + (coeffs (B, d) * sigma (d)) @ basis (D, d).T.
void pca_reconstruct(const Launch& L, DType dtype, Mat coeffs, Mat basis, Vec mean, Vec sigma, OutMat out);

// dst = src * tau / max(||src||, eps) row by row (rows with tau <= 0 copied); tau float32 or
// null (a copy); rows with mask[b] == 0 are not written. src and dst (B, D).
void norm_calibrate(const Launch& L, DType dtype, Mat src, Vec tau, float eps, Vec mask, OutMat dst);

// tau_state (1,) float32 <- decay * tau + (1 - decay) * mean(observed (n,)), or
// mean(observed) when tau_state is 0 or NaN.
void ema_update(const Launch& L, DType observed_dtype, int64_t n, float* tau_state, Vec observed, double decay);

// out[b] = mask[b] ? latents[b] : embed[ids[b]] for out (B, D), embed (V, D); a text row
// (mask[b] == 0) whose id is outside [0, V) traps on the device (a sticky error, like torch's index asserts).
void reembed(const Launch& L, DType out_dtype, DType latents_dtype, DType ids_dtype, Vec ids, Mat latents,
             Vec mask, Mat embed, OutMat out);

// The latent step with a head, hidden (B, D) -> out (B, D). Calibrated (tau given), the latents are
// reconstructed into the workspace as float32 and a last launch scales them by tau / max(||z||, eps),
// the norm of z itself.
struct LatentArgs {
  Mat hidden;
  Vec bias, sigma, mean;
  Vec tau;  // float32 or null: no calibration
  float eps;
  Vec mask;  // uint8 (torch.bool) or null: every row
  OutMat out;
  Workspace workspace;  // latent_workspace_bytes
};

// Half types: weight_t (d, D) and basis (D, d) prepacked. Two launches, three when calibrated.
void latent_step_packed(const Launch& L, DType dtype, const LatentArgs& a, Packed weight_t, Packed basis);

// float32 only: plain strided weight (D, d) and basis (D, d). Two launches, three when calibrated.
void latent_step_strided(const Launch& L, const LatentArgs& a, Mat weight, Mat basis);

// Bytes of the workspace of latent_step_* / of pca_project_packed for these sizes on this device.
size_t latent_workspace_bytes(int device, DType dtype, int B, int D, int d);
size_t project_workspace_bytes(int device, DType dtype, int B, int D, int d);

}  // namespace gapkern
