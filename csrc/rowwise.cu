// The row-wise ops: norm calibration (also the identity-head latent step),
// the running calibration target, and re-embedding.
#include <cstdio>
#include <string>

#include "common.cuh"

namespace gapkern {
namespace {

constexpr int kThreads = 256;

// dst[b] = src[b] * tau[b] / max(||src[b]||, eps) (tau[b] <= 0 or no tau: a copy), stored as T;
// rows with mask[b] == 0 are left untouched. One block per row; in place is fine.
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
calibrate_kernel(const S* src, int64_t ss0, int64_t ss1, T* dst, int64_t ds0, int64_t ds1, int D,
                 const float* tau, int64_t stau, const uint8_t* mask, int64_t smask, float eps) {
  const int b = blockIdx.x;
  if (mask && !mask[b * smask]) return;
  const S* row = src + b * ss0;
  float scale = 1.f;
  const float t = tau ? tau[b * stau] : 0.f;
  if (t > 0.f) {  // block-uniform
    Norm n;
    for (int k = threadIdx.x; k < D; k += kThreads) norm_add(n, to_f(row[k * ss1]));
    scale = calibration_scale(block_norm(n), t, eps);
  }
  T* out = dst + b * ds0;
  for (int k = threadIdx.x; k < D; k += kThreads) out[k * ds1] = from_f<T>(to_f(row[k * ss1]) * scale);
}

// tau <- decay * tau + (1 - decay) * mean(observed); the first observation (tau 0 or NaN) initialises it.
__global__ void __launch_bounds__(kThreads)
ema_kernel(float* tau_state, const void* observed, int64_t so, int n, DType dtype, float keep, float take) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) s += load_any(observed, i * so, dtype);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const float m = s / float(n);
    const float t = *tau_state;
    *tau_state = t > 0.f ? __fadd_rn(__fmul_rn(keep, t), __fmul_rn(take, m)) : m;
  }
}

// out[b] = mask[b] ? latents[b] (converted) : embed[ids[b]]. A text row's id outside [0, V) traps
// (a sticky launch error, like torch's device-side index asserts; gapkern/ops checks CPU tensors first).
template <typename T>
__global__ void __launch_bounds__(kThreads)
reembed_kernel(const void* ids, DType ids_dtype, int64_t sid, const void* latents, DType lat_dtype, int64_t ls0,
               int64_t ls1, const uint8_t* mask, int64_t smask, const T* embed, int64_t es0, int64_t es1,
               int64_t vocab, T* out, int64_t os0, int64_t os1, int D) {
  const int b = blockIdx.x;
  const int k = blockIdx.y * kThreads + threadIdx.x;
  if (k >= D) return;
  T* o = out + b * os0 + k * os1;
  if (mask[b * smask]) {
    *o = from_f<T>(load_any(latents, b * ls0 + k * ls1, lat_dtype));
  } else {
    int64_t id = ids_dtype == DType::I64 ? static_cast<const int64_t*>(ids)[b * sid]
                                         : static_cast<const int32_t*>(ids)[b * sid];
    if (id < 0 || id >= vocab) {
      if (k == 0) printf("gapkern reembed: token id %lld of text row %d is outside [0, %lld)\n", (long long)id, b,
                         (long long)vocab);
      __trap();
    }
    *o = embed[id * es0 + k * es1];
  }
}

}  // namespace

void add_rowwise_kernels(std::vector<const void*>& out) {
  out.push_back(reinterpret_cast<const void*>(&calibrate_kernel<float, float>));
  out.push_back(reinterpret_cast<const void*>(&calibrate_kernel<bf16, bf16>));
  out.push_back(reinterpret_cast<const void*>(&calibrate_kernel<f16, f16>));
  out.push_back(reinterpret_cast<const void*>(&calibrate_kernel<float, bf16>));
  out.push_back(reinterpret_cast<const void*>(&calibrate_kernel<float, f16>));
  out.push_back(reinterpret_cast<const void*>(&ema_kernel));
  out.push_back(reinterpret_cast<const void*>(&reembed_kernel<float>));
  out.push_back(reinterpret_cast<const void*>(&reembed_kernel<bf16>));
  out.push_back(reinterpret_cast<const void*>(&reembed_kernel<f16>));
}

namespace {

template <typename S, typename T>
void launch_calibrate(const Launch& L, int B, int D, Mat src, Vec tau, float eps, Vec mask, OutMat dst) {
  launch_kernel(calibrate_kernel<S, T>, dim3(B), dim3(kThreads), L.stream, static_cast<const S*>(src.p), src.s0,
                src.s1, static_cast<T*>(dst.p), dst.s0, dst.s1, D, static_cast<const float*>(tau.p), tau.s,
                static_cast<const uint8_t*>(mask.p), mask.s, eps);
  check_launch("calibrate_kernel");
}

}  // namespace

void norm_calibrate(const Launch& L, DType dtype, int B, int D, Mat src, Vec tau, float eps, Vec mask, OutMat dst) {
  DeviceGuard guard(L.device);
  dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    launch_calibrate<T, T>(L, B, D, src, tau, eps, mask, dst);
  });
}

void calibrate_from_f32(const Launch& L, DType dtype, int B, int D, Mat src, Vec tau, float eps, Vec mask,
                        OutMat dst) {
  dispatch(dtype, [&](auto t) { launch_calibrate<float, decltype(t)>(L, B, D, src, tau, eps, mask, dst); });
}

void ema_update(const Launch& L, DType observed_dtype, int n, float* tau_state, Vec observed, double decay) {
  DeviceGuard guard(L.device);
  if (observed_dtype != DType::F32 && observed_dtype != DType::BF16 && observed_dtype != DType::F16)
    throw Error("gapkern cuda backend: ema_update: unsupported dtype code " + std::to_string(int(observed_dtype)));
  // The reference computes decay * tau + (1.0 - decay) * m in float32 with both factors rounded once.
  launch_kernel(ema_kernel, dim3(1), dim3(kThreads), L.stream, tau_state, observed.p, observed.s, n,
                observed_dtype, float(decay), float(1.0 - decay));
  check_launch("ema_kernel");
}

void reembed(const Launch& L, DType out_dtype, DType latents_dtype, DType ids_dtype, int B, int D, int64_t vocab,
             Vec ids, Mat latents, Vec mask, Mat embed, OutMat out) {
  DeviceGuard guard(L.device);
  if (ids_dtype != DType::I32 && ids_dtype != DType::I64)
    throw Error("gapkern cuda backend: reembed: token ids must be int32 or int64");
  dispatch(out_dtype, [&](auto t) {
    using T = decltype(t);
    const dim3 grid(B, ceil_div(D, kThreads));
    launch_kernel(reembed_kernel<T>, grid, dim3(kThreads), L.stream, ids.p, ids_dtype, ids.s, latents.p,
                  latents_dtype, latents.s0, latents.s1, static_cast<const uint8_t*>(mask.p), mask.s,
                  static_cast<const T*>(embed.p), embed.s0, embed.s1, vocab, static_cast<T*>(out.p), out.s0,
                  out.s1, D);
    check_launch("reembed_kernel");
  });
}

}  // namespace gapkern
