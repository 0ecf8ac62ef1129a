// gapkern._C: the pybind11 glue between gapkern/ops/_cuda.py and the launchers of csrc/.
//
// Torch-free on purpose: tensors arrive as data pointers (int) and strides in
// elements, dtypes as codes (0 float32, 1 bfloat16, 2 float16, 3 int32, 4 int64),
// the stream as torch.cuda.current_stream().cuda_stream, so the extension keeps
// working whatever torch version it runs next to. A pointer 0 is an absent tensor.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "gapkern.h"

namespace py = pybind11;
using namespace gapkern;

namespace {

constexpr int kAbiVersion = 2;  // 2: the latent steps take no norm constants

DType dtype_of(int code) {
  if (code < 0 || code > 4) throw py::value_error("gapkern._C: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

Launch launch(int device, uintptr_t stream) { return {device, reinterpret_cast<cudaStream_t>(stream)}; }
const void* ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
Mat mat(uintptr_t p, int64_t s0, int64_t s1) { return {ptr(p), s0, s1}; }
Vec vec(uintptr_t p, int64_t s) { return {ptr(p), s}; }
OutMat out_mat(uintptr_t p, int64_t s0, int64_t s1) { return {reinterpret_cast<void*>(p), s0, s1}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gapkern CUDA kernels (torch-free binding; see gapkern/ops/_cuda.py for the adapter)";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::register_exception<Error>(m, "CudaError", PyExc_RuntimeError);
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("check_device", &check_device, py::arg("device"), nogil,
        "Raise RuntimeError unless `device` can run the kernels (loads them on first use).");
  m.def(
      "cuda_versions",
      [] {
        int driver = 0, runtime = 0;
        cuda_versions(&driver, &runtime);
        return py::make_tuple(driver, runtime);
      },
      "(CUDA version of the driver, 0 without one; CUDA version of this build), as 1000 * major + 10 * minor.");

  m.def(
      "pca_project",
      [](int device, uintptr_t stream, int dtype, int B, int D, int d, uintptr_t hidden, int64_t hs0, int64_t hs1,
         uintptr_t weight, int64_t ws0, int64_t ws1, uintptr_t bias, int64_t bs, uintptr_t out, int64_t os0,
         int64_t os1) {
        pca_project(launch(device, stream), dtype_of(dtype), B, D, d, mat(hidden, hs0, hs1), mat(weight, ws0, ws1),
                    vec(bias, bs), out_mat(out, os0, os1));
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"),
      py::arg("hidden"), py::arg("hs0"), py::arg("hs1"), py::arg("weight"), py::arg("ws0"), py::arg("ws1"),
      py::arg("bias"), py::arg("bs"), py::arg("out"), py::arg("os0"), py::arg("os1"), nogil);

  m.def(
      "pca_project_packed",
      [](int device, uintptr_t stream, int dtype, int B, int D, int d, uintptr_t hidden, int64_t hs0, int64_t hs1,
         uintptr_t weight_packed, uintptr_t bias, int64_t bs, uintptr_t out, int64_t os0, int64_t os1,
         uintptr_t workspace, size_t workspace_bytes) {
        pca_project_packed(launch(device, stream), dtype_of(dtype), B, D, d, mat(hidden, hs0, hs1),
                           ptr(weight_packed), vec(bias, bs), out_mat(out, os0, os1),
                           reinterpret_cast<void*>(workspace), workspace_bytes);
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"),
      py::arg("hidden"), py::arg("hs0"), py::arg("hs1"), py::arg("weight_packed"), py::arg("bias"), py::arg("bs"),
      py::arg("out"), py::arg("os0"), py::arg("os1"), py::arg("workspace"), py::arg("workspace_bytes"), nogil);

  m.def(
      "pca_reconstruct",
      [](int device, uintptr_t stream, int dtype, int B, int D, int d, uintptr_t coeffs, int64_t cs0, int64_t cs1,
         uintptr_t basis, int64_t us0, int64_t us1, uintptr_t mean, int64_t ms, uintptr_t sigma, int64_t ss,
         uintptr_t out, int64_t os0, int64_t os1) {
        pca_reconstruct(launch(device, stream), dtype_of(dtype), B, D, d, mat(coeffs, cs0, cs1),
                        mat(basis, us0, us1), vec(mean, ms), vec(sigma, ss), out_mat(out, os0, os1));
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"),
      py::arg("coeffs"), py::arg("cs0"), py::arg("cs1"), py::arg("basis"), py::arg("us0"), py::arg("us1"),
      py::arg("mean"), py::arg("ms"), py::arg("sigma"), py::arg("ss"), py::arg("out"), py::arg("os0"),
      py::arg("os1"), nogil);

  m.def(
      "norm_calibrate",
      [](int device, uintptr_t stream, int dtype, int B, int D, uintptr_t src, int64_t ss0, int64_t ss1,
         uintptr_t tau, int64_t ts, float eps, uintptr_t mask, int64_t mks, uintptr_t dst, int64_t ds0,
         int64_t ds1) {
        norm_calibrate(launch(device, stream), dtype_of(dtype), B, D, mat(src, ss0, ss1), vec(tau, ts), eps,
                       vec(mask, mks), out_mat(dst, ds0, ds1));
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("src"),
      py::arg("ss0"), py::arg("ss1"), py::arg("tau"), py::arg("ts"), py::arg("eps"), py::arg("mask"),
      py::arg("mks"), py::arg("dst"), py::arg("ds0"), py::arg("ds1"), nogil);

  m.def(
      "ema_update",
      [](int device, uintptr_t stream, int observed_dtype, int n, uintptr_t tau_state, uintptr_t observed,
         int64_t os, double decay) {
        ema_update(launch(device, stream), dtype_of(observed_dtype), n, reinterpret_cast<float*>(tau_state),
                   vec(observed, os), decay);
      },
      py::arg("device"), py::arg("stream"), py::arg("observed_dtype"), py::arg("n"), py::arg("tau_state"),
      py::arg("observed"), py::arg("os"), py::arg("decay"), nogil);

  m.def(
      "reembed",
      [](int device, uintptr_t stream, int out_dtype, int latents_dtype, int ids_dtype, int B, int D,
         int64_t vocab, uintptr_t ids, int64_t ids_s, uintptr_t latents, int64_t ls0, int64_t ls1, uintptr_t mask,
         int64_t mks, uintptr_t embed, int64_t es0, int64_t es1, uintptr_t out, int64_t os0, int64_t os1) {
        reembed(launch(device, stream), dtype_of(out_dtype), dtype_of(latents_dtype), dtype_of(ids_dtype), B, D,
                vocab, vec(ids, ids_s), mat(latents, ls0, ls1), vec(mask, mks), mat(embed, es0, es1),
                out_mat(out, os0, os1));
      },
      py::arg("device"), py::arg("stream"), py::arg("out_dtype"), py::arg("latents_dtype"), py::arg("ids_dtype"),
      py::arg("B"), py::arg("D"), py::arg("vocab"), py::arg("ids"), py::arg("ids_s"), py::arg("latents"),
      py::arg("ls0"), py::arg("ls1"), py::arg("mask"), py::arg("mks"), py::arg("embed"), py::arg("es0"),
      py::arg("es1"), py::arg("out"), py::arg("os0"), py::arg("os1"), nogil);

  m.def(
      "latent_workspace_bytes",
      [](int device, int dtype, int B, int D, int d) { return latent_workspace_bytes(device, dtype_of(dtype), B, D, d); },
      py::arg("device"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"), nogil,
      "Bytes of the zero-initialised workspace that latent_step_* needs for these sizes on this device.");

  m.def(
      "project_workspace_bytes",
      [](int device, int dtype, int B, int D, int d) { return project_workspace_bytes(device, dtype_of(dtype), B, D, d); },
      py::arg("device"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"), nogil,
      "Bytes of the zero-initialised workspace that pca_project_packed needs for these sizes on this device.");

  m.def(
      "latent_step_packed",
      [](int device, uintptr_t stream, int dtype, int B, int D, int d, uintptr_t hidden, int64_t hs0, int64_t hs1,
         uintptr_t weight_packed, uintptr_t basis_packed, uintptr_t bias, int64_t bs, uintptr_t sigma, int64_t ss,
         uintptr_t mean, int64_t ms, uintptr_t tau, int64_t ts, float eps, uintptr_t mask,
         int64_t mks, uintptr_t out, int64_t os0, int64_t os1, uintptr_t workspace, size_t workspace_bytes) {
        const LatentArgs a{B, D, d, mat(hidden, hs0, hs1), vec(bias, bs), vec(sigma, ss), vec(mean, ms),
                           vec(tau, ts), eps, vec(mask, mks), out_mat(out, os0, os1),
                           reinterpret_cast<void*>(workspace), workspace_bytes};
        latent_step_packed(launch(device, stream), dtype_of(dtype), a, ptr(weight_packed), ptr(basis_packed));
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"),
      py::arg("hidden"), py::arg("hs0"), py::arg("hs1"), py::arg("weight_packed"), py::arg("basis_packed"),
      py::arg("bias"), py::arg("bs"), py::arg("sigma"), py::arg("ss"), py::arg("mean"), py::arg("ms"),
      py::arg("tau"), py::arg("ts"), py::arg("eps"), py::arg("mask"), py::arg("mks"),
      py::arg("out"), py::arg("os0"), py::arg("os1"), py::arg("workspace"), py::arg("workspace_bytes"), nogil);

  m.def(
      "latent_step_strided",
      [](int device, uintptr_t stream, int dtype, int B, int D, int d, uintptr_t hidden, int64_t hs0, int64_t hs1,
         uintptr_t weight, int64_t ws0, int64_t ws1, uintptr_t basis, int64_t us0, int64_t us1, uintptr_t bias,
         int64_t bs, uintptr_t sigma, int64_t ss, uintptr_t mean, int64_t ms, uintptr_t tau,
         int64_t ts, float eps, uintptr_t mask, int64_t mks, uintptr_t out, int64_t os0, int64_t os1,
         uintptr_t workspace, size_t workspace_bytes) {
        const LatentArgs a{B, D, d, mat(hidden, hs0, hs1), vec(bias, bs), vec(sigma, ss), vec(mean, ms),
                           vec(tau, ts), eps, vec(mask, mks), out_mat(out, os0, os1),
                           reinterpret_cast<void*>(workspace), workspace_bytes};
        latent_step_strided(launch(device, stream), dtype_of(dtype), a, mat(weight, ws0, ws1), mat(basis, us0, us1));
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("d"),
      py::arg("hidden"), py::arg("hs0"), py::arg("hs1"), py::arg("weight"), py::arg("ws0"), py::arg("ws1"),
      py::arg("basis"), py::arg("us0"), py::arg("us1"), py::arg("bias"), py::arg("bs"), py::arg("sigma"),
      py::arg("ss"), py::arg("mean"), py::arg("ms"), py::arg("tau"), py::arg("ts"),
      py::arg("eps"), py::arg("mask"), py::arg("mks"), py::arg("out"), py::arg("os0"), py::arg("os1"),
      py::arg("workspace"), py::arg("workspace_bytes"), nogil);
}
