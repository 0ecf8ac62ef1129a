// C[m, n] = ((sum_k A[m, k] * kscale[k] * B[k, n]) + nbias[n]) * nscale[n], rows m with mask[m] == 0
// left untouched: a strided GEMM on CUDA cores with float32 accumulation, for pca_project,
// pca_reconstruct and the float32 latent step.
#include <string>

#include "common.cuh"
#include "shapes.h"

namespace gapkern {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

template <typename T>
struct GemmArgs {
  const T* a; int64_t sa0, sa1;            // A (M, K)
  const T* b; int64_t sb0, sb1;            // B (K, N)
  const T* kscale; int64_t sks;            // (K,) or null
  const T* nbias; int64_t snb;             // (N,) or null
  const T* nscale; int64_t sns;            // (N,) or null
  T* c; int64_t sc0, sc1;                  // C (M, N)
  int M, N, K;
  const uint8_t* mask; int64_t smask;      // null: write every row
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs<T> p) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  __shared__ uint8_t rowwrite[kBM];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  if (tid < kBM) rowwrite[tid] = m0 + tid < p.M && (!p.mask || p.mask[(m0 + tid) * p.smask] != 0);
  __syncthreads();

  // Neighbouring threads walk the unit-stride dimension, so the loads coalesce.
  const bool a_along_k = (p.sa1 < 0 ? -p.sa1 : p.sa1) <= (p.sa0 < 0 ? -p.sa0 : p.sa0);
  const bool b_along_n = (p.sb1 < 0 ? -p.sb1 : p.sb1) <= (p.sb0 < 0 ? -p.sb0 : p.sb0);
  float acc[4][4] = {};
  for (int k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
    for (int q = 0; q < kBM * kBK / kThreads; ++q) {
      const int e = tid + kThreads * q;
      const int kk = a_along_k ? e % kBK : e / kBM, mi = a_along_k ? e / kBK : e % kBM;
      const int m = m0 + mi, k = k0 + kk;
      float v = 0.f;
      if (m < p.M && k < p.K) {
        v = to_f(p.a[m * p.sa0 + k * p.sa1]);
        if (p.kscale) v *= to_f(p.kscale[k * p.sks]);
      }
      As[kk][mi] = v;
    }
#pragma unroll
    for (int q = 0; q < kBN * kBK / kThreads; ++q) {
      const int e = tid + kThreads * q;
      const int kk = b_along_n ? e / kBN : e % kBK, ni = b_along_n ? e % kBN : e / kBK;
      const int n = n0 + ni, k = k0 + kk;
      Bs[kk][ni] = (n < p.N && k < p.K) ? to_f(p.b[k * p.sb0 + n * p.sb1]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i, m = m0 + r;
    if (m >= p.M || !rowwrite[r]) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      float v = acc[i][j];
      if (p.nbias) v += to_f(p.nbias[n * p.snb]);
      if (p.nscale) v *= to_f(p.nscale[n * p.sns]);
      p.c[m * p.sc0 + n * p.sc1] = from_f<T>(v);
    }
  }
}

template <typename T>
void launch(const GemmArgs<T>& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.N, kBN), ceil_div(p.M, kBM));
  launch_kernel(gemm_kernel<T>, grid, dim3(kThreads), stream, p);
  check_launch("gemm_kernel");
}

// C = A @ B for views A (M, K), B (K, N) and C (M, N) whose sizes agree (checked by the callers).
template <typename T>
GemmArgs<T> plain(Mat a, Mat b, OutMat c) {
  GemmArgs<T> p{};
  p.a = static_cast<const T*>(a.p); p.sa0 = a.s0; p.sa1 = a.s1;
  p.b = static_cast<const T*>(b.p); p.sb0 = b.s0; p.sb1 = b.s1;
  p.c = static_cast<T*>(c.p); p.sc0 = c.s0; p.sc1 = c.s1;
  p.M = int(a.rows); p.N = int(b.cols); p.K = int(a.cols);
  return p;
}

Mat transposed(Mat m) { return Mat{m.p, m.cols, m.rows, m.s1, m.s0}; }

// An optional vector of a GEMM (kscale, nbias, nscale): its pointer and stride fields from a view.
template <typename T>
void set(const T*& p, int64_t& stride, Vec v) {
  p = static_cast<const T*>(v.p);
  stride = v.s;
}

// C = A @ B in dtype on L; vectors(p) fills in the optional vectors of the GemmArgs p.
template <typename F>
void gemm(const Launch& L, DType dtype, Mat a, Mat b, OutMat c, F&& vectors) {
  DeviceGuard guard(L.device);
  dispatch(dtype, [&](auto t) {
    auto p = plain<decltype(t)>(a, b, c);
    vectors(p);
    launch(p, L.stream);
  });
}

}  // namespace

void add_gemm_kernels(std::vector<const void*>& out) {
  out.push_back(reinterpret_cast<const void*>(&gemm_kernel<float>));
  out.push_back(reinterpret_cast<const void*>(&gemm_kernel<bf16>));
  out.push_back(reinterpret_cast<const void*>(&gemm_kernel<f16>));
}

void pca_project(const Launch& L, DType dtype, Mat hidden, Mat weight, Vec bias, OutMat out) {
  const int B = size_of("hidden rows", hidden.rows), D = size_of("hidden columns", hidden.cols);
  const int d = size_of("weight columns", weight.cols);
  expect_size("weight", "rows", weight.rows, D, "D, the columns of hidden");
  expect_shape("out", out, B, d, "B, the rows of hidden", "d, the columns of weight");
  gemm(L, dtype, hidden, weight, out, [&](auto& p) { set(p.nbias, p.snb, bias); });
}

void pca_reconstruct(const Launch& L, DType dtype, Mat coeffs, Mat basis, Vec mean, Vec sigma, OutMat out) {
  const int B = size_of("coeffs rows", coeffs.rows), d = size_of("coeffs columns", coeffs.cols);
  const int D = size_of("basis rows", basis.rows);
  expect_size("basis", "columns", basis.cols, d, "d, the columns of coeffs");
  expect_shape("out", out, B, D, "B, the rows of coeffs", "D, the rows of basis");
  gemm(L, dtype, coeffs, transposed(basis), out, [&](auto& p) {
    set(p.kscale, p.sks, sigma);
    set(p.nbias, p.snb, mean);
  });
}

size_t strided_workspace_bytes(int B, int D, int d) {
  return round_up(sizeof(float) * size_t(B) * d, 256) + round_up(sizeof(float) * size_t(B) * D, 256);
}

// Launch 1: c_raw = (hidden @ weight + bias) * sigma into the float32 workspace.
// Launch 2: mean + c_raw @ basis.T into the masked rows of out, or, calibrated, of the workspace's
// latents, which launch 3 scales by tau / max(||z||, eps) into out.
void latent_step_strided(const Launch& L, const LatentArgs& a, Mat weight, Mat basis) {
  const Sizes n = latent_sizes(a, weight.rows, weight.cols, basis.rows, basis.cols);
  if (a.workspace.bytes < strided_workspace_bytes(n.B, n.D, n.d))
    throw Error("gapkern cuda backend: latent_step workspace too small");
  DeviceGuard guard(L.device);
  char* ws = static_cast<char*>(a.workspace.p);
  const OutMat coeffs{ws, n.B, n.d, n.d, 1};
  const OutMat z{ws + round_up(sizeof(float) * size_t(n.B) * n.d, 256), n.B, n.D, n.D, 1};
  auto p1 = plain<float>(a.hidden, weight, coeffs);
  set(p1.nbias, p1.snb, a.bias);
  set(p1.nscale, p1.sns, a.sigma);
  launch(p1, L.stream);

  auto p2 = plain<float>(readable(coeffs), transposed(basis), a.tau.p ? z : a.out);
  set(p2.nbias, p2.snb, a.mean);
  set(p2.mask, p2.smask, a.mask);
  launch(p2, L.stream);
  if (a.tau.p) calibrate_from_f32(L, DType::F32, readable(z), a.tau, a.eps, a.mask, a.out);
}

}  // namespace gapkern
