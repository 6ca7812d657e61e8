// Runtime queries for tallow._C_cuda (device count, properties, errors).
// A machine without a GPU or driver answers 0 devices, never an exception:
// the Python layer then reports the cuda backend as unavailable.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace tallow {
namespace cuda {

int device_count(int* err) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  *err = (int)e;
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  return n;
}

int device_info(int device, int* major, int* minor, int* sms) {
  cudaError_t e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  return (int)e;
}

const char* error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

}  // namespace cuda
}  // namespace tallow
