// pybind11 module _C_cuda: CUDA kernels, called with raw pointers and torch's
// current stream handle (DESIGN.md).  Errors from the runtime become RuntimeError.
#include <pybind11/pybind11.h>

namespace msf {
namespace cuda {
int device_count();
int runtime_version();
}  // namespace cuda
}  // namespace msf

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "metassl_fast CUDA kernels (build skeleton; kernels arrive with the GPU issue)";
  m.def("device_count", &msf::cuda::device_count, "CUDA devices visible to the runtime (0 without a driver)");
  m.def("runtime_version", &msf::cuda::runtime_version, "CUDA runtime version this module was built with");
}
