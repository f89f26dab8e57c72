// CUDA glue of dispatch, permute, unpermute and unpermute_backward: validation (the CPU
// kernels' messages for everything the host can see), allocation, launches on the current
// stream of the inputs' device. Index values (ids in range, inverse a permutation) are checked
// on the device: reading them here would sync the host and break CUDA graph capture.
// Kernels and their math: csrc/cuda/dispatch.cu.
#include <torch/library.h>

#include <limits>

#include "cuda/common.h"

namespace smoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& ids_in,
                                                             int64_t num_experts) {
  // validate
  const char* op = "smoe_ops.dispatch";
  check_dispatch_ids(op, ids_in, num_experts, Placement::cuda("ids", ids_in));
  // CUDA only: the kernels hold an expert id in an int (dispatch.cu), the CPU one in int64.
  TORCH_CHECK_VALUE(num_experts <= std::numeric_limits<int32_t>::max(), op,
                    ": num_experts must fit in int32, got ", num_experts);
  const DeviceGuard guard(ids_in.device());

  // allocate
  auto ids = ids_in.contiguous();
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), num_slots = ids.numel();
  auto order = at::empty({num_slots}, ids.options().dtype(at::kInt));
  auto offsets = at::zeros({num_experts + 1}, ids.options().dtype(at::kLong));
  auto inverse = at::empty({num_tokens, topk}, ids.options().dtype(at::kInt));
  if (num_slots == 0) return {order, offsets, inverse};
  auto workspace = at::empty({cuda::dispatch_workspace_elems(num_slots, num_experts)},
                             ids.options().dtype(at::kInt));

  // launch
  SMOE_CUDA_CHECK(cuda::dispatch(ids.const_data_ptr(), ids.scalar_type() == at::kLong,
                                 num_slots, topk, num_experts,
                                 workspace.mutable_data_ptr<int32_t>(),
                                 order.mutable_data_ptr<int32_t>(),
                                 offsets.mutable_data_ptr<int64_t>(),
                                 inverse.mutable_data_ptr<int32_t>(), current_stream()));
  return {order, offsets, inverse};
}

// Weights in the accumulation type of rows of `dtype` (contiguous), or undefined for none.
at::Tensor acc_weights(const std::optional<at::Tensor>& weights, at::ScalarType dtype) {
  if (!weights) return at::Tensor();
  return weights->to(weight_dtype(dtype)).contiguous();
}

const void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& inverse_in) {
  // validate
  const char* op = "smoe_ops.permute";
  check_permute_args(op, x_in, inverse_in, Placement::cuda("x", x_in));
  const DeviceGuard guard(x_in.device());

  // allocate
  auto inverse = inverse_in.contiguous();
  auto x = x_in.contiguous();
  const int64_t num_tokens = x.size(0), topk = inverse.size(1), hidden = x.size(1);
  const int64_t num_rows = inverse.numel();
  auto xs = at::empty({num_rows, hidden}, x.options());
  if (num_rows == 0) return xs;
  auto seen = at::empty({num_rows}, inverse.options());

  // launch: the permutation check first, on the same stream.
  const auto stream = current_stream();
  SMOE_CUDA_CHECK(cuda::check_permutation(cuda::RowWriter::kPermute,
                                          inverse.const_data_ptr<int32_t>(), num_rows, topk,
                                          seen.mutable_data_ptr<int32_t>(), stream));
  if (hidden == 0) return xs;
  SMOE_CUDA_CHECK(cuda::permute(kernel_dtype(x), x.const_data_ptr(),
                                inverse.const_data_ptr<int32_t>(), num_tokens, topk, hidden,
                                xs.mutable_data_ptr(), stream));
  return xs;
}

at::Tensor unpermute_cuda(const at::Tensor& ys_in, const at::Tensor& inverse_in,
                          const std::optional<at::Tensor>& weights_in) {
  // validate (the row range: on the device)
  const char* op = "smoe_ops.unpermute";
  const Placement where = Placement::cuda("ys", ys_in);
  check_dispatched_rows(op, ys_in, inverse_in, where);
  check_weights(op, weights_in, inverse_in, where);
  const DeviceGuard guard(ys_in.device());

  // allocate
  auto inverse = inverse_in.contiguous();
  auto ys = ys_in.contiguous();
  auto weights = acc_weights(weights_in, ys.scalar_type());
  const int64_t num_tokens = inverse.size(0), topk = inverse.size(1), hidden = ys.size(1);
  auto y = at::empty({num_tokens, hidden}, ys.options());
  if (num_tokens == 0) return y;
  if (topk == 0) return y.zero_();  // an empty sum

  // launch: also with hidden == 0, where the kernel only checks inverse's range (the CPU
  // kernel checks it whatever the width).
  SMOE_CUDA_CHECK(cuda::unpermute(kernel_dtype(ys), ys.const_data_ptr(),
                                  inverse.const_data_ptr<int32_t>(), data_or_null(weights),
                                  num_tokens, topk, hidden, inverse.numel(),
                                  y.mutable_data_ptr(), current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& ys_in, const at::Tensor& inverse_in,
    const std::optional<at::Tensor>& weights_in, bool weights_grad) {
  // validate
  const char* op = "smoe_ops.unpermute_backward";
  check_unpermute_backward_args(op, grad_y_in, ys_in, inverse_in, weights_in,
                                Placement::cuda("ys", ys_in));
  const DeviceGuard guard(ys_in.device());

  // allocate: grad_weights in the accumulation type, cast to the weights dtype at the end.
  auto inverse = inverse_in.contiguous();
  auto ys = ys_in.contiguous();
  auto grad_y = grad_y_in.contiguous();
  auto weights = acc_weights(weights_in, ys.scalar_type());
  const bool want_grad_weights = weights_in.has_value() && weights_grad;
  const auto grad_weights_dtype = weights_in ? weights_in->scalar_type() : ys.scalar_type();
  const int64_t num_rows = ys.size(0), num_tokens = inverse.size(0), topk = inverse.size(1);
  const int64_t hidden = ys.size(1);
  auto grad_ys = at::empty_like(ys);
  auto grad_weights =
      want_grad_weights ? at::empty(inverse.sizes(), ys.options().dtype(weight_dtype(
                                                         ys.scalar_type())))
                        : at::empty({0}, ys.options().dtype(grad_weights_dtype));
  if (num_rows == 0) {
    return {grad_ys, want_grad_weights ? grad_weights.to(grad_weights_dtype) : grad_weights};
  }

  // launch
  const auto stream = current_stream();
  auto seen = at::empty({num_rows}, inverse.options());
  SMOE_CUDA_CHECK(cuda::check_permutation(cuda::RowWriter::kUnpermuteBackward,
                                          inverse.const_data_ptr<int32_t>(), num_rows, topk,
                                          seen.mutable_data_ptr<int32_t>(), stream));
  if (hidden == 0) {
    if (want_grad_weights) grad_weights.zero_();  // empty dot products
  } else {
    SMOE_CUDA_CHECK(cuda::unpermute_backward(
        kernel_dtype(ys), grad_y.const_data_ptr(), ys.const_data_ptr(),
        inverse.const_data_ptr<int32_t>(), data_or_null(weights), num_tokens, topk, hidden,
        grad_ys.mutable_data_ptr(),
        want_grad_weights ? grad_weights.mutable_data_ptr() : nullptr, stream));
  }
  if (want_grad_weights) grad_weights = grad_weights.to(grad_weights_dtype);
  return {grad_ys, grad_weights};
}

}  // namespace
}  // namespace smoe

SMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("dispatch", &smoe::dispatch_cuda);
  m.impl("permute", &smoe::permute_cuda);
  m.impl("unpermute", &smoe::unpermute_cuda);
  m.impl("unpermute_backward", &smoe::unpermute_backward_cuda);
}
