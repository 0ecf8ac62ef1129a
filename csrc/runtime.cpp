// Device selection, error messages and one-time kernel loading for the launchers.
#include "runtime.h"

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

namespace gapkern {
namespace {

constexpr int kMaxDevices = 64;
std::atomic<bool> g_ready[kMaxDevices];
int g_sms[kMaxDevices];
std::mutex g_mutex;

// Errors that mean "there is no usable GPU here", whatever the exact cause.
bool no_device(cudaError_t err) {
  switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError:
      return true;
    default:
      return false;
  }
}

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

[[noreturn]] void fail(cudaError_t err, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  if (no_device(err)) throw Error("gapkern cuda backend: no CUDA device (" + describe(err) + ")");
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidKernelImage)
    throw Error("gapkern cuda backend: gapkern._C has no kernels for this GPU (" + describe(err) +
                "); it is built for sm_80 and sm_90: rebuild with CMAKE_CUDA_ARCHITECTURES set for this GPU");
  throw Error("gapkern cuda backend: " + what + " failed (" + describe(err) + ")");
}

void load_kernels(int device) {
  std::vector<const void*> kernels;
  add_gemm_kernels(kernels);
  add_latent_mma_kernels(kernels);
  add_rowwise_kernels(kernels);
  for (const void* k : kernels) {
    cudaFuncAttributes attr;
    check_cuda(cudaFuncGetAttributes(&attr, k), "loading the kernels");
  }
  check_cuda(cudaDeviceGetAttribute(&g_sms[device], cudaDevAttrMultiProcessorCount, device),
             "reading the multiprocessor count");
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(err, what);
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(err, std::string("launching ") + kernel);
}

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "selecting the device");
  if (device < 0 || device >= kMaxDevices) throw Error("gapkern cuda backend: bad device index " + std::to_string(device));
  if (current != device) {
    check_cuda(cudaSetDevice(device), "selecting the device");
    previous_ = current;
  }
  if (g_ready[device].load(std::memory_order_acquire)) return;
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_ready[device].load(std::memory_order_relaxed)) {
      load_kernels(device);
      g_ready[device].store(true, std::memory_order_release);
    }
  } catch (...) {
    if (previous_ >= 0) cudaSetDevice(previous_);
    throw;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

int sm_count(int device) { return g_sms[device]; }  // valid once a DeviceGuard ran for device

void check_device(int device) { DeviceGuard guard(device); }

void cuda_versions(int* driver, int* runtime) {
  *driver = 0;
  if (cudaDriverGetVersion(driver) != cudaSuccess) *driver = 0;
  cudaGetLastError();
  *runtime = CUDART_VERSION;
}

}  // namespace gapkern
