// gapkern CUDA backend: the C++ launchers of SPEC section 2, torch-free.
//
// Every tensor crosses this boundary as a raw device pointer plus strides in
// elements; a null pointer means an absent optional tensor. Launchers run on
// the given device and enqueue on the given stream (the caller's current
// stream), never synchronise and never allocate, so they can be captured in a
// CUDA graph. Errors throw gapkern::Error with a message naming the cause.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gapkern {

// Storage dtype codes shared with gapkern/ops/_cuda.py.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, I64 = 4 };

struct Mat {            // a 2-D view: element (i, j) at p[i * s0 + j * s1]
  const void* p;
  int64_t s0, s1;
};
struct Vec {            // a 1-D view: element i at p[i * s]; p == nullptr: absent
  const void* p;
  int64_t s;
};
struct OutMat {
  void* p;
  int64_t s0, s1;
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

// coeffs (B, d) = hidden (B, D) @ weight (D, d) + bias (d); out in dtype.
void pca_project(const Launch& L, DType dtype, int B, int D, int d, Mat hidden, Mat weight, Vec bias,
                 OutMat out);

// latents (B, D) = mean + (coeffs * sigma) @ basis.T.
void pca_reconstruct(const Launch& L, DType dtype, int B, int D, int d, Mat coeffs, Mat basis, Vec mean,
                     Vec sigma, OutMat out);

// dst = src * tau / max(||src||, eps) row by row (rows with tau <= 0 copied);
// tau float32 or null (copy); rows with mask[b] == 0 are not written.
void norm_calibrate(const Launch& L, DType dtype, int B, int D, Mat src, Vec tau, float eps, Vec mask,
                    OutMat dst);

// tau_state (1,) float32 <- decay * tau + (1 - decay) * mean(observed), or
// mean(observed) when tau_state is 0 or NaN.
void ema_update(const Launch& L, DType observed_dtype, int n, float* tau_state, Vec observed, double decay);

// out[b] = mask[b] ? latents[b] : embed[ids[b]]; a text row (mask[b] == 0) whose id is outside
// [0, vocab) traps on the device (a sticky error, like torch's index asserts).
void reembed(const Launch& L, DType out_dtype, DType latents_dtype, DType ids_dtype, int B, int D,
             int64_t vocab, Vec ids, Mat latents, Vec mask, Mat embed, OutMat out);

// The latent step with a head. Calibrated (tau given), the latents are reconstructed into the
// workspace as float32 and a last launch scales them by tau / max(||z||, eps), the norm of z itself.
struct LatentArgs {
  int B, D, d;
  Mat hidden;
  Vec bias, sigma, mean;
  Vec tau;              // float32 or null: no calibration
  float eps;
  Vec mask;             // uint8 (torch.bool) or null: every row
  OutMat out;
  void* workspace;      // zero-initialised once, then reused (latent_workspace_bytes)
  size_t workspace_bytes;
};

// Half types: weight.T and basis prepacked in mma.m16n8k16 A-fragment order
// (see gapkern/ops/_cuda.py: _pack_a). Two launches, three when calibrated.
void latent_step_packed(const Launch& L, DType dtype, const LatentArgs& a, const void* weight_packed,
                        const void* basis_packed);

// coeffs = hidden @ weight + bias for half types on the projection kernel of the latent step
// (weight.T packed as above; workspace of project_workspace_bytes). One launch.
void pca_project_packed(const Launch& L, DType dtype, int B, int D, int d, Mat hidden, const void* weight_packed,
                        Vec bias, OutMat out, void* workspace, size_t workspace_bytes);

// float32: plain strided weight and basis. Two launches, three when calibrated.
void latent_step_strided(const Launch& L, DType dtype, const LatentArgs& a, Mat weight, Mat basis);

// Bytes of the zero-initialised workspace of latent_step_* / of pca_project_packed for these sizes.
size_t latent_workspace_bytes(int device, DType dtype, int B, int D, int d);
size_t project_workspace_bytes(int device, DType dtype, int B, int D, int d);

}  // namespace gapkern
