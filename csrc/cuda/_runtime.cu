// The CUDA runtime calls of _C_cuda that are no kernel's: the error check every launch
// uses, and the device count and runtime version the Python side asks for.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace msf {
namespace cuda {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("metassl_fast._C_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
}

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky error: no device is an answer, not a failure
    return 0;
  }
  check(err, "cudaGetDeviceCount");
  return n;
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

}  // namespace cuda
}  // namespace msf
