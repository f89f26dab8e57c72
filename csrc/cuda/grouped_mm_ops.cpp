// CUDA glue of grouped_mm and grouped_mm_backward: validation, allocation, launches on the
// current stream of x's device. offsets stay on the device (their values are checked there,
// csrc/cuda/grouped_mm.cu), so a whole MoE layer runs without a host sync. w is read through
// its strides (a transposed view needs no copy). Kernels and their math: grouped_mm.cu.
#include <torch/library.h>

#include <array>

#include "cuda/common.h"

namespace smoe {
namespace {

// Every tensor on the CUDA device of x.
Placement on_x_device(const at::Tensor& x) { return Placement::cuda("x", x); }

// CUDA only: offsets[0] = 0 and offsets[E] = N, so with no experts there can be no rows. The
// device checks the offsets' values; this one the host checks from the shapes alone, before
// any launch. The CPU reads the values and fails on them instead.
void check_rows_without_experts(const char* op, const at::Tensor& x, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts > 0 || x.size(0) == 0, op, ": offsets[0] must equal ",
                    "x.shape[0] (", x.size(0), ") when w has no experts");
}

// CUDA only: a product's column tiles are its grid's y dimension (at most 65535).
void check_columns(const char* op, const char* name, int64_t columns) {
  TORCH_CHECK_VALUE(columns <= cuda::kGroupedMmMaxCols, op, ": ", name, " must be at most ",
                    cuda::kGroupedMmMaxCols, " on CUDA (65535 tiles of 64 columns), got ",
                    columns);
}

// The device-side check of offsets, alone: for a launch that computes nothing, or before
// kernels that trust offsets (grad_w, grad_bias).
void check_offsets_alone(const at::Tensor& offsets, int64_t num_rows, int64_t num_experts) {
  auto workspace = at::empty({cuda::grouped_mm_workspace_elems(num_experts)},
                             offsets.options().dtype(at::kInt));
  SMOE_CUDA_CHECK(cuda::grouped_mm_check_offsets(offsets.const_data_ptr<int64_t>(), num_rows,
                                                 num_experts,
                                                 workspace.mutable_data_ptr<int32_t>(),
                                                 current_stream()));
}

at::Tensor empty_unless(bool needed, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return needed ? at::empty(sizes, options) : at::empty({0}, options);
}

// rows [N, K_] @ b[e] -> out [N, M_] per expert; b given as (tensor, strides of [E, K_, M_]).
void launch_rows(const at::Tensor& rows, const at::Tensor& b, std::array<int64_t, 3> b_strides,
                 const at::Tensor& bias, const at::Tensor& offsets, at::Tensor& out) {
  const int64_t num_rows = rows.size(0), depth = rows.size(1), cols = out.size(1);
  const int64_t num_experts = offsets.size(0) - 1;
  auto workspace = at::empty({cuda::grouped_mm_workspace_elems(num_experts)},
                             offsets.options().dtype(at::kInt));
  SMOE_CUDA_CHECK(cuda::grouped_mm(kernel_dtype(rows), rows.const_data_ptr(), b.const_data_ptr(),
                                   b_strides[0], b_strides[1], b_strides[2],
                                   bias.defined() ? bias.const_data_ptr() : nullptr,
                                   offsets.const_data_ptr<int64_t>(), num_rows, depth, cols,
                                   num_experts, workspace.mutable_data_ptr<int32_t>(),
                                   out.mutable_data_ptr(), current_stream()));
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& w,
                           const at::Tensor& offsets_in, const std::optional<at::Tensor>& bias) {
  // validate
  const char* op = "smoe_ops.grouped_mm";
  check_grouped_mm_args(op, x_in, w, offsets_in, on_x_device(x_in));
  check_rows_without_experts(op, x_in, w.size(0));
  check_grouped_mm_bias(op, bias, x_in, w, on_x_device(x_in));
  check_columns(op, "w.shape[2]", w.size(2));
  const DeviceGuard guard(x_in.device());

  // allocate
  auto out = at::empty({x_in.size(0), w.size(2)}, x_in.options());
  auto offsets = offsets_in.contiguous();
  if (out.numel() == 0) {
    // Nothing to compute (no rows, no columns, or no experts), but offsets are checked, as
    // the CPU kernel and the backward check them.
    check_offsets_alone(offsets, x_in.size(0), w.size(0));
    return out;
  }
  auto x = x_in.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  // launch
  launch_rows(x, w, {w.stride(0), w.stride(1), w.stride(2)}, b, offsets, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& w,
    const at::Tensor& offsets_in, std::array<bool, 3> output_mask) {
  // validate
  const char* op = "smoe_ops.grouped_mm_backward";
  check_grouped_mm_args(op, x_in, w, offsets_in, on_x_device(x_in));
  check_rows_without_experts(op, x_in, w.size(0));
  check_grouped_mm_grad_out(op, grad_out_in, x_in, w, on_x_device(x_in));
  if (output_mask[0]) check_columns(op, "w.shape[1]", w.size(1));  // grad_x's columns
  const int64_t num_rows = x_in.size(0), num_experts = w.size(0);
  const int64_t in_features = w.size(1), out_features = w.size(2);
  const DeviceGuard guard(x_in.device());

  // allocate: unrequested gradients are empty [0] tensors
  const auto options = x_in.options();
  auto grad_x = empty_unless(output_mask[0], {num_rows, in_features}, options);
  auto grad_w = empty_unless(output_mask[1], {num_experts, in_features, out_features}, options);
  auto grad_bias = empty_unless(output_mask[2], {num_experts, out_features}, options);
  auto grad_out = grad_out_in.contiguous();
  auto offsets = offsets_in.contiguous();
  const auto stream = current_stream();

  // launch. grad_w and grad_bias trust offsets: the grad_x launch checks them first, or the
  // check runs alone.
  if (!(output_mask[0] && grad_x.numel() > 0)) {
    check_offsets_alone(offsets, num_rows, num_experts);
  } else {
    // grad_x = grad_out @ w[e]^T: w^T's view [E, M, K] through strides, no copy.
    launch_rows(grad_out, w, {w.stride(0), w.stride(2), w.stride(1)}, at::Tensor(), offsets,
                grad_x);
  }
  if (output_mask[1] && grad_w.numel() > 0) {
    auto x = x_in.contiguous();
    SMOE_CUDA_CHECK(cuda::grouped_mm_grad_w(kernel_dtype(x), x.const_data_ptr(),
                                            grad_out.const_data_ptr(),
                                            offsets.const_data_ptr<int64_t>(), num_rows,
                                            in_features, out_features, num_experts,
                                            grad_w.mutable_data_ptr(), stream));
  }
  if (output_mask[2] && grad_bias.numel() > 0) {
    SMOE_CUDA_CHECK(cuda::grouped_mm_grad_bias(kernel_dtype(grad_out), grad_out.const_data_ptr(),
                                               offsets.const_data_ptr<int64_t>(), num_rows,
                                               out_features, num_experts,
                                               grad_bias.mutable_data_ptr(), stream));
  }
  return {grad_x, grad_w, grad_bias};
}

}  // namespace
}  // namespace smoe

SMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("grouped_mm", &smoe::grouped_mm_cuda);
  m.impl("grouped_mm_backward", &smoe::grouped_mm_backward_cuda);
}
