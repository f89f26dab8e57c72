// CUDA glue of swiglu: validation, allocation and the launch on the current stream of the
// input's device. Kernels and their math: csrc/cuda/swiglu.cu.
#include <torch/library.h>

#include "cuda/common.h"

namespace smoe {
namespace {

void check_gate_up(const char* op, const at::Tensor& gate_up) {
  check_cuda(op, "gate_up", gate_up);
  check_rank(op, "gate_up", gate_up, 2, "[num_rows, 2 * ffn_size]");
  check_floating(op, "gate_up", gate_up);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, op, ": gate_up.shape[1] must be even ",
                    "([num_rows, 2 * ffn_size]), got shape ", shape_str(gate_up));
}

at::Tensor swiglu_cuda(const at::Tensor& gate_up_in) {
  // validate
  const char* op = "smoe_ops.swiglu";
  check_gate_up(op, gate_up_in);
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
  check_gate_up(op, gate_up_in);
  check_cuda(op, "grad_out", grad_out_in);
  check_same_device(op, "grad_out", grad_out_in, "gate_up", gate_up_in);
  check_same_dtype(op, "grad_out", grad_out_in, "gate_up", gate_up_in);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == gate_up_in.size(0) &&
                        grad_out_in.size(1) * 2 == gate_up_in.size(1),
                    op, ": grad_out must have shape [", gate_up_in.size(0), ", ",
                    gate_up_in.size(1) / 2, "], got ", shape_str(grad_out_in));
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
