// CUDA glue of swiglu: validation, allocation and the launch on the current stream of the
// input's device. Kernels and their math: csrc/cuda/swiglu.cu.
#include <torch/library.h>

#include "cuda/common.h"

namespace smoe {
namespace {

// Every tensor on the CUDA device of gate_up.
Placement on_gate_up_device(const at::Tensor& gate_up) {
  return Placement::cuda("gate_up", gate_up);
}

at::Tensor swiglu_cuda(const at::Tensor& gate_up_in) {
  // validate
  check_swiglu_input("smoe_ops.swiglu", gate_up_in, on_gate_up_device(gate_up_in));
  const DeviceGuard guard(gate_up_in.device());

  // allocate
  auto gate_up = gate_up_in.contiguous();
  const int64_t rows = gate_up.size(0), ffn = gate_up.size(1) / 2;
  auto out = at::empty({rows, ffn}, gate_up.options());
  if (out.numel() == 0) return out;

  // launch
  SMOE_CUDA_CHECK(cuda::swiglu(kernel_dtype(gate_up), gate_up.const_data_ptr(), rows, ffn,
                               out.mutable_data_ptr(), current_stream()));
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& gate_up_in) {
  // validate
  const char* op = "smoe_ops.swiglu_backward";
  check_swiglu_input(op, gate_up_in, on_gate_up_device(gate_up_in));
  check_swiglu_grad_out(op, grad_out_in, gate_up_in, on_gate_up_device(gate_up_in));
  const DeviceGuard guard(gate_up_in.device());

  // allocate
  auto gate_up = gate_up_in.contiguous();
  auto grad_out = grad_out_in.contiguous();
  const int64_t rows = gate_up.size(0), ffn = gate_up.size(1) / 2;
  auto grad_in = at::empty_like(gate_up);
  if (grad_in.numel() == 0) return grad_in;

  // launch
  SMOE_CUDA_CHECK(cuda::swiglu_backward(kernel_dtype(gate_up), grad_out.const_data_ptr(),
                                        gate_up.const_data_ptr(), rows, ffn,
                                        grad_in.mutable_data_ptr(), current_stream()));
  return grad_in;
}

}  // namespace
}  // namespace smoe

SMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("swiglu", &smoe::swiglu_cuda);
  m.impl("swiglu_backward", &smoe::swiglu_backward_cuda);
}
