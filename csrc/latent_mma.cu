// latents = calibrate(mean + ((hidden @ W + bias) * sigma) @ U.T), written into the masked rows of out:
// the fused latent step for bfloat16 / float16 on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
// Launch 1, project_kernel: c_raw^T = W^T @ hidden^T, split over D across blocks (split-K). Every
//   block writes its float32 partial sums; the last block of each column group to finish (an
//   arrival counter, reset for the next launch) adds the splits, bias and sigma, and writes c_raw
//   as 16-bit hi + lo parts already in mma B-fragment order.
// Launch 2, reconstruct_kernel: z^T = U @ c_raw^T (hi and lo: two mma each, so c_raw keeps ~16
//   bits) + mean, written into the masked rows of out, or, calibrated, as float32 into the
//   workspace, from which
// Launch 3 (rowwise.cu's calibrate kernel) writes z * tau / max(||z||, eps) into the masked rows
//   of out: the norm of z itself, exact for any basis and free of values cached between calls.
// W^T and U arrive prepacked in A-fragment order (gapkern/ops/_cuda.py: _pack_a): each lane
// loads one 16-byte vector per 16x16 tile, whatever d is (629 rows are not 16-byte aligned).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"
#include "shapes.h"

namespace gapkern {
namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kSmem = 40960;      // project_kernel's staging buffer (bytes)
constexpr int kMaxTiles = 8;      // 16x16 weight tiles in flight per warp in project_kernel

__host__ __device__ constexpr int recon_mb(int nt) { return nt >= 4 ? 2 : 1; }

struct Plan {
  int B, D, d;
  int NT, NG, NTW;                      // batch rows: n-tiles (8 rows) per group, groups, n-tiles in all
  int MT1, KT1, MB1, G1, S, KB, KC, pitch;  // projection: m-tiles over d, k-tiles over D, m-tiles per
                                        // block, column groups, splits, k-tiles per split and per
                                        // staged chunk, staged row pitch (elements)
  int MT2, G2;                          // reconstruction: m-tiles over D, blocks along D
  size_t off_part, off_cf, off_cnt, off_z, bytes;
};

// GAPKERN_LATENT_PLAN="mb=M,splits=S" overrides the projection's column tiles per block
// (1, 2, 4 or 8) and its split count, for tuning on a GPU without rebuilding.
struct PlanOverride {
  int mb = 0, splits = 0;
};

const PlanOverride& plan_override() {
  static const PlanOverride o = [] {
    PlanOverride r;
    if (const char* env = std::getenv("GAPKERN_LATENT_PLAN")) {
      std::sscanf(env, "mb=%d,splits=%d", &r.mb, &r.splits);
      if (r.mb != 1 && r.mb != 2 && r.mb != 4 && r.mb != 8) r.mb = 0;
    }
    return r;
  }();
  return o;
}

Plan make_plan(int B, int D, int d, int sms) {
  Plan p{};
  p.B = B; p.D = D; p.d = d;
  const int ntiles = ceil_div(B, 8);
  p.NT = ntiles <= 1 ? 1 : ntiles <= 2 ? 2 : ntiles <= 4 ? 4 : 8;
  p.NG = ceil_div(ntiles, p.NT);
  p.NTW = p.NG * p.NT;
  p.MT1 = ceil_div(d, 16);
  p.KT1 = ceil_div(D, 16);
  p.MB1 = p.NT <= 2 ? 1 : p.NT == 4 ? 2 : 4;  // more rows: more columns per block, fewer re-reads of hidden
  if (plan_override().mb) p.MB1 = plan_override().mb;
  p.G1 = ceil_div(p.MT1, p.MB1);
  const int slots = kWarps / p.MB1;
  const int rows = p.NT * 8;
  const int kc_smem = (kSmem / (rows * 2) - 8) / 16;
  const int kc_max = std::max(4, (std::min(kMaxTiles * slots, kc_smem) / 4) * 4);
  // Enough blocks to fill the GPU at B = 1; fewer splits as B grows (partials cost S * B * d).
  const int want = ceil_div(2 * sms, p.G1 * p.NG);
  const int cap = std::max(1, D / (8 * rows));
  const int S = std::max(1, std::min(plan_override().splits > 0 ? plan_override().splits : std::min(want, cap), p.KT1));
  p.KB = ceil_div(p.KT1, S);
  p.S = ceil_div(p.KT1, p.KB);
  p.KC = std::min(kc_max, (p.KB + 3) / 4 * 4);
  p.pitch = p.KC * 16 + 8;  // +8: the B-fragment loads of 8 rows x 4 lanes hit 32 distinct banks
  p.MT2 = ceil_div(D, 16);
  p.G2 = ceil_div(p.MT2, recon_mb(p.NT));
  size_t off = 0;
  p.off_part = off; off += round_up(sizeof(float) * size_t(p.NG) * p.S * p.MT1 * p.NT * 128, 256);
  p.off_cf = off;   off += round_up(size_t(p.MT1) * p.NTW * 32 * 8 * 2, 256);
  p.off_cnt = off;  off += round_up(sizeof(unsigned) * size_t(p.G1) * p.NG, 256);
  p.off_z = off;    off += round_up(sizeof(float) * size_t(B) * D, 256);  // unscaled latents, calibrated steps
  p.bytes = off;
  return p;
}

// -- launch 1: projection ------------------------------------------------------

template <typename T>
struct ProjectArgs {
  const T* hidden; int64_t hs0, hs1;
  int hvec;                 // hidden rows are 16-byte aligned with unit stride: stage by uint4
  const uint4* w;           // packed weight.T: [MT1][KT1][32 lanes] x 16 bytes
  const T* bias; int64_t sb;
  const T* sigma; int64_t ssg;
  float* part;              // [NG][S][MT1][NT][32][4] partial sums (C-fragment order)
  T* cf;                    // [MT1][NTW][32][8]: c_raw * cscale, hi (4) + lo (4) per lane
  unsigned* cnt;            // [NG][G1] arrival counters, zero between launches
  float cscale;
  T* out; int64_t os0, os1; // pca_project: write coeffs (B, d) here instead of cf
  Plan pl;
};

// hidden[row0 : row0 + 8 NT, 16 c0 : 16 (c0 + nck)] -> hs, zero outside hidden. The caller
// waits (cp.async.wait_all) and synchronises the block before reading hs.
template <typename T, int NT>
__device__ __forceinline__ void stage_hidden(const ProjectArgs<T>& a, T* hs, int row0, int c0, int nck) {
  const Plan& pl = a.pl;
  const int cols = nck * 16;
  if (a.hvec) {  // 16-byte asynchronous copies, all in flight at once
    const int per_row = cols / 8;
    for (int v = threadIdx.x; v < NT * 8 * per_row; v += kThreads) {
      const int r = v / per_row, cv = v - r * per_row;
      const int b = row0 + r, k = c0 * 16 + cv * 8;
      const bool ok = b < pl.B && k < pl.D;
      cp_async16(hs + r * pl.pitch + cv * 8, ok ? a.hidden + b * a.hs0 + k : a.hidden, ok);
    }
  } else {  // any strides: element by element, eight loads in flight per thread
    constexpr int kBatch = 8;
    for (int e0 = threadIdx.x; e0 < NT * 8 * cols; e0 += kThreads * kBatch) {
      T x[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int e = e0 + q * kThreads, r = e / cols, kk = e - r * cols;
        const int b = row0 + r, k = c0 * 16 + kk;
        x[q] = (e < NT * 8 * cols && b < pl.B && k < pl.D) ? a.hidden[b * a.hs0 + k * a.hs1] : from_f<T>(0.f);
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int e = e0 + q * kThreads, r = e / cols, kk = e - r * cols;
        if (e < NT * 8 * cols) hs[r * pl.pitch + kk] = x[q];
      }
    }
  }
}

// Element (row 8 ntg + 2 (ln & 3) + (i & 1), column 16 kt + (ln >> 2) + 8 (i >> 1)) of c_raw, given
// in C-fragment order (lane ln, register i), goes to its place in B-fragment order.
template <typename T>
__device__ __forceinline__ void store_fragment(T* cf, int ntw, int kt, int ntg, int ln, int i, float x) {
  const int jj = (ln >> 2) + 8 * (i >> 1);
  const int lane = (2 * (ln & 3) + (i & 1)) * 4 + ((jj & 7) >> 1);
  const int elem = (jj >> 3) * 2 + (jj & 1);
  T* p = cf + ((int64_t(kt) * ntw + ntg) * 32 + lane) * 8 + elem;
  const T hi = from_f<T>(x);
  p[0] = hi;
  p[4] = from_f<T>(x - to_f(hi));
}

// Adds up the per-warp accumulators of a block's k-slots through shared memory `red`
// ([warps][NT][32][4] floats): the warps with wk == 0 end with the block's sums.
template <int NT>
__device__ __forceinline__ void reduce_slots(float (&acc)[NT][4], float* red, int warp, int lane, int wk,
                                             int slots, int MB) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    *reinterpret_cast<float4*>(red + ((warp * NT + nt) * 32 + lane) * 4) =
        make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
  __syncthreads();
  if (wk != 0) return;
  for (int q = 1; q < slots; ++q) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float4 v = *reinterpret_cast<const float4*>(red + (((warp + q * MB) * NT + nt) * 32 + lane) * 4);
      acc[nt][0] += v.x; acc[nt][1] += v.y; acc[nt][2] += v.z; acc[nt][3] += v.w;
    }
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) project_kernel(const ProjectArgs<T> a) {
  __shared__ __align__(16) unsigned char smem[kSmem];
  __shared__ int last;
  const Plan& pl = a.pl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int MB = pl.MB1, slots = kWarps / MB, mi = warp % MB, wk = warp / MB;
  const int mt = blockIdx.x * MB + mi, s = blockIdx.y, ng = blockIdx.z;
  const int row0 = ng * NT * 8;
  const bool active = mt < pl.MT1;
  const int kb0 = s * pl.KB, kb1 = min(kb0 + pl.KB, pl.KT1);

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  T* hs = reinterpret_cast<T*>(smem);
  for (int c0 = kb0; c0 < kb1; c0 += pl.KC) {
    const int nck = min(pl.KC, kb1 - c0);
    uint4 af[kMaxTiles];  // issued before staging hidden, so both are in flight together
#pragma unroll
    for (int i = 0; i < kMaxTiles; ++i) {
      const int kl = wk + i * slots;
      const bool ok = active && kl < nck;
      af[i] = load16_stream(a.w + (int64_t(mt) * pl.KT1 + c0 + (ok ? kl : 0)) * 32 + lane, ok);
    }
    stage_hidden<T, NT>(a, hs, row0, c0, nck);
    cp_async_wait_all();
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxTiles; ++i) {
      const int kl = wk + i * slots;
      if (kl < nck) {  // warp-uniform
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const T* hp = hs + (nt * 8 + g) * pl.pitch + kl * 16 + 2 * t;
          mma<T>(acc[nt], af[i], *reinterpret_cast<const uint32_t*>(hp),
                 *reinterpret_cast<const uint32_t*>(hp + 8));
        }
      }
    }
    __syncthreads();
  }

  // Add up the k-slots of the block: warps with wk == 0 end with the block's sums.
  float* red = reinterpret_cast<float*>(smem);  // [warps][NT][32][4]
  if (slots > 1) reduce_slots<NT>(acc, red, warp, lane, wk, slots, MB);
  const int per_mt = NT * 128;
  if (wk == 0 && active) {
    float* dst = a.part + ((int64_t(ng) * pl.S + s) * pl.MT1 + mt) * per_mt;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      __stcg(reinterpret_cast<float4*>(dst + (nt * 32 + lane) * 4),
             make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]));
  }

  // The last split of this column group to arrive finishes it.
  __threadfence();
  __syncthreads();
  unsigned* counter = a.cnt + ng * pl.G1 + blockIdx.x;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == unsigned(pl.S - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) atomicExch(counter, 0u);  // ready for the next launch or graph replay

  for (int e = threadIdx.x; e < MB * per_mt; e += kThreads) {
    const int mi2 = e / per_mt, r = e - mi2 * per_mt;
    const int nt = r >> 7, ln = (r & 127) >> 2, i = r & 3;
    const int jl = mi2 * 16 + (ln >> 2) + 8 * (i >> 1), bl = nt * 8 + 2 * (ln & 3) + (i & 1);
    const int mt2 = blockIdx.x * MB + mi2, j = blockIdx.x * 16 * MB + jl;
    float v = 0.f;
    if (j < pl.d) {
      const float* src = a.part + (int64_t(ng) * pl.S * pl.MT1 + mt2) * per_mt + r;
      const int64_t split_stride = int64_t(pl.MT1) * per_mt;
#pragma unroll 4
      for (int s2 = 0; s2 < pl.S; ++s2) v += __ldcg(src + s2 * split_stride);
      if (a.bias) v += to_f(a.bias[j * a.sb]);
      if (a.sigma) v *= to_f(a.sigma[j * a.ssg]);
    }
    if (a.out) {
      const int b = row0 + bl;
      if (j < pl.d && b < pl.B) a.out[b * a.os0 + j * a.os1] = from_f<T>(v);
      continue;
    }
    if (mt2 < pl.MT1) store_fragment(a.cf, pl.NTW, mt2, ng * NT + nt, ln, i, v * a.cscale);
  }
}

// -- launch 2: reconstruction, masked write ------------------------------------

template <typename T, typename O>
struct ReconArgs {
  const uint4* u;           // packed basis: [MT2][MT1][32 lanes] x 16 bytes
  const T* cf;
  const T* mean; int64_t sm;
  const uint8_t* mask; int64_t smask;
  float cinv;               // 1 / cscale
  O* out; int64_t os0, os1; // out (O = T), or the float32 latents a calibration reads (O = float)
  Plan pl;
};

template <typename T, int NT, typename O>
__global__ void __launch_bounds__(kThreads) reconstruct_kernel(const ReconArgs<T, O> a) {
  constexpr int MB = recon_mb(NT), slots = kWarps / MB;
  constexpr int KW = NT >= 4 ? 4 : 8;  // k-tiles in flight per warp (1 + NT loads each)
  constexpr int ROWS = NT * 8, COLS = 16 * MB, ZP = COLS + 1;
  __shared__ __align__(16) float red[kWarps * NT * 128];
  __shared__ float zt[ROWS * ZP];
  __shared__ int rowwrite[ROWS];
  __shared__ float s_zero[kWarps];
  const Plan& pl = a.pl;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int mi = warp % MB, wk = warp / MB;
  if (lane == 0) s_zero[warp] = 0.f;
  const int mt = blockIdx.x * MB + mi, ng = blockIdx.y, row0 = ng * ROWS;
  const int KT = pl.MT1;
  const bool active = mt < pl.MT2;
  const uint4* cf4 = reinterpret_cast<const uint4*>(a.cf);

  if (threadIdx.x < ROWS) {
    const int b = row0 + threadIdx.x;
    rowwrite[threadIdx.x] = b < pl.B && (!a.mask || a.mask[b * a.smask] != 0);
  }

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  for (int k0 = wk; k0 < KT; k0 += KW * slots) {
    uint4 af[KW], bf[KW][NT];
#pragma unroll
    for (int i = 0; i < KW; ++i) {
      const int kt = k0 + i * slots;
      const bool ok = active && kt < KT;
      const int ktc = ok ? kt : 0;
      af[i] = load16_stream(a.u + (int64_t(mt) * KT + ktc) * 32 + lane, ok);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) bf[i][nt] = load16(cf4 + (int64_t(ktc) * pl.NTW + ng * NT + nt) * 32 + lane, ok);
    }
    // Keep all these loads in flight together: ptxas would otherwise place each mma right after
    // its own loads (fewest registers, one load in flight). Loads cannot cross this per-warp
    // barrier, and the mma chain depends on a zero read after it.
    warp_barrier(1 + warp);
    const float zero = s_zero[warp];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] += zero;
#pragma unroll
    for (int i = 0; i < KW; ++i)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma<T>(acc[nt], af[i], bf[i][nt].x, bf[i][nt].y);  // hi part of c_raw
        mma<T>(acc[nt], af[i], bf[i][nt].z, bf[i][nt].w);  // lo part
      }
  }

  reduce_slots<NT>(acc, red, warp, lane, wk, slots, MB);
  if (wk == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ml = mi * 16 + g + 8 * (i >> 1), bl = nt * 8 + 2 * t + (i & 1);
        const int m = blockIdx.x * COLS + ml;
        float v = acc[nt][i] * a.cinv;
        if (a.mean && m < pl.D) v += to_f(a.mean[m * a.sm]);
        zt[bl * ZP + ml] = v;
      }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int bl = e / COLS, ml = e - bl * COLS;
    const int b = row0 + bl, m = blockIdx.x * COLS + ml;
    if (b < pl.B && m < pl.D && rowwrite[bl]) a.out[b * a.os0 + m * a.os1] = from_f<O>(zt[bl * ZP + ml]);
  }
}

// -- launchers ---------------------------------------------------------------

template <typename T>
ProjectArgs<T> project_args(const Plan& pl, Mat hidden, Packed weight_t, Vec bias, Workspace workspace) {
  char* ws = static_cast<char*>(workspace.p);
  ProjectArgs<T> p{};
  p.hidden = static_cast<const T*>(hidden.p); p.hs0 = hidden.s0; p.hs1 = hidden.s1;
  p.hvec = hidden.s1 == 1 && (pl.B == 1 || hidden.s0 % 8 == 0) && reinterpret_cast<uintptr_t>(hidden.p) % 16 == 0 &&
           pl.D % 8 == 0;
  p.w = static_cast<const uint4*>(weight_t.p);
  p.bias = static_cast<const T*>(bias.p); p.sb = bias.s;
  p.part = reinterpret_cast<float*>(ws + pl.off_part);
  p.cf = reinterpret_cast<T*>(ws + pl.off_cf);
  p.cnt = reinterpret_cast<unsigned*>(ws + pl.off_cnt);
  // float16 has 5 exponent bits: scale c_raw down so its hi part cannot overflow (c_raw up to ~1e6).
  p.cscale = std::is_same<T, f16>::value ? 1.f / 16.f : 1.f;
  p.pl = pl;
  return p;
}

template <typename T, int NT, typename O>
void run_reconstruct(const Launch& L, const LatentArgs& a, const Plan& pl, const T* cf, float cinv, Packed basis,
                     O* out, int64_t os0, int64_t os1) {
  ReconArgs<T, O> r{};
  r.u = static_cast<const uint4*>(basis.p);
  r.cf = cf;
  r.mean = static_cast<const T*>(a.mean.p); r.sm = a.mean.s;
  r.mask = static_cast<const uint8_t*>(a.mask.p); r.smask = a.mask.s;
  r.cinv = cinv;
  r.out = out; r.os0 = os0; r.os1 = os1;
  r.pl = pl;
  launch_kernel(reconstruct_kernel<T, NT, O>, dim3(pl.G2, pl.NG), dim3(kThreads), L.stream, r);
  check_launch("reconstruct_kernel");
}

template <typename T, int NT>
void run_latent(const Launch& L, DType dtype, const LatentArgs& a, const Plan& pl, Packed weight_t, Packed basis) {
  ProjectArgs<T> p = project_args<T>(pl, a.hidden, weight_t, a.bias, a.workspace);
  p.sigma = static_cast<const T*>(a.sigma.p); p.ssg = a.sigma.s;
  launch_kernel(project_kernel<T, NT>, dim3(pl.G1, pl.S, pl.NG), dim3(kThreads), L.stream, p);
  check_launch("project_kernel");
  const float cinv = 1.f / p.cscale;
  if (!a.tau.p) {
    run_reconstruct<T, NT, T>(L, a, pl, p.cf, cinv, basis, static_cast<T*>(a.out.p), a.out.s0, a.out.s1);
    return;
  }
  float* z = reinterpret_cast<float*>(static_cast<char*>(a.workspace.p) + pl.off_z);
  run_reconstruct<T, NT, float>(L, a, pl, p.cf, cinv, basis, z, pl.D, 1);
  calibrate_from_f32(L, dtype, Mat{z, pl.B, pl.D, pl.D, 1}, a.tau, a.eps, a.mask, a.out);
}

template <typename T, int NT>
void run_project(const Launch& L, const Plan& pl, Mat hidden, Packed weight_t, Vec bias, OutMat out,
                 Workspace workspace) {
  ProjectArgs<T> p = project_args<T>(pl, hidden, weight_t, bias, workspace);
  p.out = static_cast<T*>(out.p); p.os0 = out.s0; p.os1 = out.s1;
  launch_kernel(project_kernel<T, NT>, dim3(pl.G1, pl.S, pl.NG), dim3(kThreads), L.stream, p);
  check_launch("project_kernel");
}

// f(tag) with tag::value the plan's n-tiles per row group, the kernels' template argument.
template <typename F>
void with_row_tiles(int nt, F&& f) {
  switch (nt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <typename F>
void with_half_type(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::BF16: f(bf16{}); break;
    case DType::F16: f(f16{}); break;
    default: throw Error(std::string("gapkern cuda backend: ") + op + " runs bfloat16 and float16 only");
  }
}

// latents: whether the workspace must hold the float32 latents of a calibrated step (the last region).
Plan checked_plan(int device, Sizes n, size_t workspace_bytes, bool latents) {
  const Plan pl = make_plan(n.B, n.D, n.d, sm_count(device));
  if (workspace_bytes < (latents ? pl.bytes : pl.off_z))
    throw Error("gapkern cuda backend: workspace too small for these sizes");
  return pl;
}

template <typename T>
void add_kernels(std::vector<const void*>& out) {
  out.push_back(reinterpret_cast<const void*>(&project_kernel<T, 1>));
  out.push_back(reinterpret_cast<const void*>(&project_kernel<T, 2>));
  out.push_back(reinterpret_cast<const void*>(&project_kernel<T, 4>));
  out.push_back(reinterpret_cast<const void*>(&project_kernel<T, 8>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 1, T>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 2, T>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 4, T>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 8, T>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 1, float>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 2, float>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 4, float>));
  out.push_back(reinterpret_cast<const void*>(&reconstruct_kernel<T, 8, float>));
}

}  // namespace

void add_latent_mma_kernels(std::vector<const void*>& out) {
  add_kernels<bf16>(out);
  add_kernels<f16>(out);
}

size_t latent_workspace_bytes(int device, DType dtype, int B, int D, int d) {
  if (dtype == DType::F32) return strided_workspace_bytes(B, D, d);
  DeviceGuard guard(device);
  return make_plan(B, D, d, sm_count(device)).bytes;
}

size_t project_workspace_bytes(int device, DType dtype, int B, int D, int d) {
  if (dtype == DType::F32) return 0;
  DeviceGuard guard(device);
  return make_plan(B, D, d, sm_count(device)).off_z;
}

void latent_step_packed(const Launch& L, DType dtype, const LatentArgs& a, Packed weight_t, Packed basis) {
  // weight_t is weight.T: its (rows, cols) are (d, D).
  const Sizes n = latent_sizes(a, weight_t.cols, weight_t.rows, basis.rows, basis.cols);
  DeviceGuard guard(L.device);
  const Plan pl = checked_plan(L.device, n, a.workspace.bytes, a.tau.p != nullptr);
  with_half_type(dtype, "latent_step_packed", [&](auto t) {
    with_row_tiles(pl.NT, [&](auto nt) {
      run_latent<decltype(t), decltype(nt)::value>(L, dtype, a, pl, weight_t, basis);
    });
  });
}

void pca_project_packed(const Launch& L, DType dtype, Mat hidden, Packed weight_t, Vec bias, OutMat out,
                        Workspace workspace) {
  const Sizes n{size_of("hidden rows", hidden.rows), size_of("hidden columns", hidden.cols),
                size_of("weight_t rows", weight_t.rows)};
  expect_size("weight_t", "columns", weight_t.cols, n.D, "D, the columns of hidden");
  expect_shape("out", out, n.B, n.d, "B, the rows of hidden", "d, the rows of weight_t");
  DeviceGuard guard(L.device);
  const Plan pl = checked_plan(L.device, n, workspace.bytes, false);
  with_half_type(dtype, "pca_project_packed", [&](auto t) {
    with_row_tiles(pl.NT, [&](auto nt) {
      run_project<decltype(t), decltype(nt)::value>(L, pl, hidden, weight_t, bias, out, workspace);
    });
  });
}

}  // namespace gapkern
