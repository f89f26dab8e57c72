// Torch-side helpers of the CUDA glue (csrc/cuda/*_ops.cpp): the element type code the kernels
// take, and the launch check. Only the glue includes this; the kernels see kernels.h alone.
#pragma once

#include <ATen/ATen.h>
#ifndef SMOE_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "checks.h"
#include "cuda/kernels.h"

namespace smoe {

inline cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "smoe_ops: no CUDA kernel for dtype ", t.scalar_type());
  }
}

#ifdef SMOE_CUDA_EMULATE
// The emulated device is the host (tests/cuda_emulator.py): no streams, nothing to guard.
inline cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
#else
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

}  // namespace smoe

#ifdef SMOE_CUDA_EMULATE
#define SMOE_CUDA_CHECK(expr)                                                     \
  do {                                                                            \
    const cudaError_t smoe_error_ = (expr);                                       \
    TORCH_CHECK(smoe_error_ == cudaSuccess,                                       \
                "CUDA error (emulated): ", cudaGetErrorString(smoe_error_), ": ", \
                ::smoe::emu::last_error_message());                               \
  } while (0)
// The glue's kernels register for the emulator's own library, on CPU tensors.
#define SMOE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(smoe_ops_emu, CPU, m)
#else
// Raises with the CUDA error (and the op's name through the caller's frame) if a launch failed.
#define SMOE_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define SMOE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(smoe_ops, CUDA, m)
#endif
