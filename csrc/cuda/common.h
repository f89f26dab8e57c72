// Torch-side helpers of the CUDA glue (csrc/cuda/*_ops.cpp): the element type code the kernels
// take, and the launch check. Only the glue includes this; the kernels see kernels.h alone.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace smoe

// Raises with the CUDA error (and the op's name through the caller's frame) if a launch failed.
#define SMOE_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
