// gapkern._C: the pybind11 glue between gapkern/ops/_cuda.py and the launchers of csrc/.
//
// Torch-free on purpose: tensors arrive as typed views (Mat, OutMat, Vec, Packed: data pointers as
// int, shapes, strides in elements), dtypes as the DType enum, the stream as
// torch.cuda.current_stream().cuda_stream, so the extension keeps working whatever torch version
// it runs next to. A Vec without a pointer is an absent tensor.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "gapkern.h"

namespace py = pybind11;
using namespace gapkern;

namespace {

void* address(uintptr_t p) { return reinterpret_cast<void*>(p); }

// Mat and OutMat: the same Python signature, (ptr, rows, cols, s0, s1).
template <typename M>
void bind_matrix(py::module_& m, const char* name, const char* doc) {
  py::class_<M>(m, name, doc, py::module_local())
      .def(py::init([](uintptr_t p, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
             return M{address(p), rows, cols, s0, s1};
           }),
           py::arg("ptr"), py::arg("rows"), py::arg("cols"), py::arg("s0"), py::arg("s1"))
      .def_readonly("rows", &M::rows)
      .def_readonly("cols", &M::cols);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gapkern CUDA kernels (torch-free binding; see gapkern/ops/_cuda.py for the adapter)";
  m.attr("ABI_VERSION") = kAbiVersion;
  py::register_exception<Error>(m, "CudaError", PyExc_RuntimeError);
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  // Types local to this module: two builds loaded side by side (tests load the host emulation next to
  // an installed extension) must not share pybind11's type registry.
  const auto local = py::module_local();

  py::enum_<DType>(m, "DType", "Storage dtypes, named as torch names them.", local)
      .value("float32", DType::F32)
      .value("bfloat16", DType::BF16)
      .value("float16", DType::F16)
      .value("int32", DType::I32)
      .value("int64", DType::I64);
  py::class_<Launch>(m, "Launch", "Where a launch runs: a device index and a cudaStream_t handle.", local)
      .def(py::init([](int device, uintptr_t stream) { return Launch{device, static_cast<cudaStream_t>(address(stream))}; }),
           py::arg("device"), py::arg("stream"))
      .def_readonly("device", &Launch::device);
  bind_matrix<Mat>(m, "Mat", "A (rows, cols) view read by a launch: element (i, j) at ptr[i * s0 + j * s1].");
  bind_matrix<OutMat>(m, "OutMat", "A (rows, cols) view written by a launch: element (i, j) at ptr[i * s0 + j * s1].");
  py::class_<Vec>(m, "Vec", "A vector view: element i at ptr[i * stride]; Vec() is an absent tensor.", local)
      .def(py::init<>())
      .def(py::init([](uintptr_t p, int64_t stride) { return Vec{address(p), stride}; }), py::arg("ptr"),
           py::arg("stride"));
  py::class_<Packed>(m, "Packed", "A (rows, cols) matrix prepacked in mma A-fragment order.", local)
      .def(py::init([](uintptr_t p, int64_t rows, int64_t cols) { return Packed{address(p), rows, cols}; }),
           py::arg("ptr"), py::arg("rows"), py::arg("cols"));
  py::class_<Workspace>(m, "Workspace", "Scratch memory a launcher reuses: zero-filled once, then kept.", local)
      .def(py::init([](uintptr_t p, size_t bytes) { return Workspace{address(p), bytes}; }), py::arg("ptr"),
           py::arg("bytes"));
  py::class_<LatentArgs>(m, "LatentArgs", "The tensors of one latent step besides the head's weight and basis.", local)
      .def(py::init([](Mat hidden, Vec bias, Vec sigma, Vec mean, Vec tau, float eps, Vec mask, OutMat out,
                       Workspace workspace) {
             return LatentArgs{hidden, bias, sigma, mean, tau, eps, mask, out, workspace};
           }),
           py::arg("hidden"), py::arg("bias"), py::arg("sigma"), py::arg("mean"), py::arg("tau"), py::arg("eps"),
           py::arg("mask"), py::arg("out"), py::arg("workspace"));

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

  m.def("pca_project", &pca_project, py::arg("launch"), py::arg("dtype"), py::arg("hidden"), py::arg("weight"),
        py::arg("bias"), py::arg("out"), nogil);
  m.def("pca_project_packed", &pca_project_packed, py::arg("launch"), py::arg("dtype"), py::arg("hidden"),
        py::arg("weight_t"), py::arg("bias"), py::arg("out"), py::arg("workspace"), nogil);
  m.def("pca_reconstruct", &pca_reconstruct, py::arg("launch"), py::arg("dtype"), py::arg("coeffs"),
        py::arg("basis"), py::arg("mean"), py::arg("sigma"), py::arg("out"), nogil);
  m.def("norm_calibrate", &norm_calibrate, py::arg("launch"), py::arg("dtype"), py::arg("src"), py::arg("tau"),
        py::arg("eps"), py::arg("mask"), py::arg("dst"), nogil);
  m.def(
      "ema_update",
      [](const Launch& launch, DType observed_dtype, int64_t n, uintptr_t tau_state, Vec observed, double decay) {
        ema_update(launch, observed_dtype, n, static_cast<float*>(address(tau_state)), observed, decay);
      },
      py::arg("launch"), py::arg("observed_dtype"), py::arg("n"), py::arg("tau_state"), py::arg("observed"),
      py::arg("decay"), nogil);
  m.def("reembed", &reembed, py::arg("launch"), py::arg("out_dtype"), py::arg("latents_dtype"),
        py::arg("ids_dtype"), py::arg("ids"), py::arg("latents"), py::arg("mask"), py::arg("embed"), py::arg("out"),
        nogil);
  m.def("latent_step_packed", &latent_step_packed, py::arg("launch"), py::arg("dtype"), py::arg("args"),
        py::arg("weight_t"), py::arg("basis"), nogil);
  m.def("latent_step_strided", &latent_step_strided, py::arg("launch"), py::arg("args"), py::arg("weight"),
        py::arg("basis"), nogil, "float32 only.");
  m.def("latent_workspace_bytes", &latent_workspace_bytes, py::arg("device"), py::arg("dtype"), py::arg("B"),
        py::arg("D"), py::arg("d"), nogil,
        "Bytes of the zero-initialised workspace that latent_step_* needs for these sizes on this device.");
  m.def("project_workspace_bytes", &project_workspace_bytes, py::arg("device"), py::arg("dtype"), py::arg("B"),
        py::arg("D"), py::arg("d"), nogil,
        "Bytes of the zero-initialised workspace that pca_project_packed needs for these sizes on this device.");
}
