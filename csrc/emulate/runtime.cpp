// runtime.h for the host emulation: no device to select, nothing to load, a few "SMs" so that
// the launch plans split work the way they do on a GPU.
#include <cstdlib>

#include "../runtime.h"

namespace gapkern {

DeviceGuard::DeviceGuard(int) {}
DeviceGuard::~DeviceGuard() {}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("gapkern cuda backend (emulated): ") + what + " failed");
}

void check_launch(const char*) {}

int sm_count(int) {
  const char* sms = std::getenv("GAPKERN_EMULATE_SMS");
  return sms ? std::atoi(sms) : 4;
}

void check_device(int) {}

void cuda_versions(int* driver, int* runtime) { *driver = *runtime = CUDART_VERSION; }

}  // namespace gapkern
