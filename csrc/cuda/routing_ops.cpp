// CUDA glue of route, route_backward, router_losses and router_losses_backward: validation
// (the CPU kernels' messages), allocation, and launches on the current stream of the logits'
// device. Nothing here waits on the device. Kernels and their math: csrc/cuda/routing.cu.
#include <torch/library.h>

#include <limits>
#include <string_view>

#include "cuda/common.h"

namespace smoe {
namespace {

// Every tensor on the CUDA device of the logits.
Placement on_logits_device(const at::Tensor& logits) { return Placement::cuda("logits", logits); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& logits_in, int64_t k, c10::string_view score, bool renormalize,
    const std::optional<at::Tensor>& expert_bias, int64_t num_groups, int64_t topk_groups,
    double scale) {
  // validate
  const char* op = "smoe_ops.route";
  check_logits(op, logits_in, on_logits_device(logits_in));
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  const bool sigmoid = parse_score(op, std::string_view(score.data(), score.size()));
  check_k(op, k, num_experts);
  check_groups(op, k, num_experts, num_groups, topk_groups);
  TORCH_CHECK_VALUE(num_tokens * k <= std::numeric_limits<int32_t>::max(), op,
                    ": num_tokens * k must fit int32 counts (at most 2^31 - 1), got ",
                    num_tokens, " * ", k);
  TORCH_CHECK_VALUE(num_experts <= std::numeric_limits<int32_t>::max(), op,
                    ": num_experts must fit int32 ids, got ", num_experts);
  const DeviceGuard guard(logits_in.device());
  const auto wdtype = weight_dtype(logits_in.scalar_type());
  const auto bias = checked_expert_bias(op, expert_bias, num_experts, wdtype,
                                        on_logits_device(logits_in));

  // allocate
  auto logits = logits_in.contiguous();
  auto weights = at::empty({num_tokens, k}, logits.options().dtype(wdtype));
  auto ids = at::empty({num_tokens, k}, logits.options().dtype(at::kInt));
  auto counts = at::zeros({num_experts}, logits.options().dtype(at::kInt));
  if (num_tokens == 0) return {weights, ids, counts};
  at::Tensor group_scores;
  if (num_groups > 1) group_scores = at::empty({num_tokens, num_groups}, weights.options());

  // launch
  SMOE_CUDA_CHECK(cuda::route(kernel_dtype(logits), logits.const_data_ptr(),
                              bias.has_value() ? bias->const_data_ptr() : nullptr, num_tokens,
                              num_experts, k, sigmoid, renormalize, num_groups, topk_groups,
                              scale, group_scores.defined() ? group_scores.mutable_data_ptr()
                                                            : nullptr,
                              weights.mutable_data_ptr(), ids.mutable_data_ptr<int32_t>(),
                              counts.mutable_data_ptr<int32_t>(), current_stream()));
  return {weights, ids, counts};
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& ids_in, c10::string_view score,
                               bool renormalize, double scale) {
  // validate (id range: on the device, see routing.cu)
  const char* op = "smoe_ops.route_backward";
  check_logits(op, logits_in, on_logits_device(logits_in));
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  const bool sigmoid = parse_score(op, std::string_view(score.data(), score.size()));
  const int64_t k = check_route_backward_args(op, ids_in, grad_weights_in, logits_in,
                                              on_logits_device(logits_in));
  const DeviceGuard guard(logits_in.device());

  // allocate
  auto logits = logits_in.contiguous();
  auto ids = ids_in.contiguous();
  auto grad_weights = grad_weights_in.contiguous();
  auto grad = at::empty_like(logits);
  if (num_tokens == 0) return grad;

  // launch
  SMOE_CUDA_CHECK(cuda::route_backward(kernel_dtype(logits), grad_weights.const_data_ptr(),
                                       logits.const_data_ptr(), ids.const_data_ptr<int32_t>(),
                                       num_tokens, num_experts, k, sigmoid, renormalize, scale,
                                       grad.mutable_data_ptr(), current_stream()));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> router_losses_cuda(const at::Tensor& logits_in,
                                                      const at::Tensor& counts_in, int64_t k) {
  // validate
  const char* op = "smoe_ops.router_losses";
  check_logits(op, logits_in, on_logits_device(logits_in));
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  check_counts(op, counts_in, num_experts, on_logits_device(logits_in));
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  const DeviceGuard guard(logits_in.device());

  // allocate
  auto logits = logits_in.contiguous();
  auto counts = counts_in.contiguous();
  const auto options = logits.options().dtype(weight_dtype(logits.scalar_type()));
  auto losses = at::empty({4}, options);
  auto mean_probs = at::empty({num_experts}, options);
  auto workspace = at::empty({cuda::router_losses_workspace_bytes(num_tokens, num_experts)},
                             logits.options().dtype(at::kByte));

  // launch
  SMOE_CUDA_CHECK(cuda::router_losses(kernel_dtype(logits), logits.const_data_ptr(),
                                      counts.const_data_ptr<int32_t>(), num_tokens, num_experts,
                                      k, workspace.mutable_data_ptr(), losses.mutable_data_ptr(),
                                      mean_probs.mutable_data_ptr(), current_stream()));
  return {losses, mean_probs};
}

at::Tensor router_losses_backward_cuda(const at::Tensor& grad_losses_in,
                                       const at::Tensor& logits_in, const at::Tensor& counts_in,
                                       int64_t k, const at::Tensor& mean_probs_in) {
  // validate
  const char* op = "smoe_ops.router_losses_backward";
  check_logits(op, logits_in, on_logits_device(logits_in));
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  check_counts(op, counts_in, num_experts, on_logits_device(logits_in));
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  check_router_losses_backward_args(op, grad_losses_in, mean_probs_in, logits_in,
                                    on_logits_device(logits_in));
  const auto wdtype = weight_dtype(logits_in.scalar_type());
  const DeviceGuard guard(logits_in.device());

  // allocate
  auto logits = logits_in.contiguous();
  auto grad = at::empty_like(logits);
  if (grad.numel() == 0) return grad;  // no tokens, or no experts: nothing to launch
  auto counts = counts_in.contiguous();
  auto grad_losses = grad_losses_in.contiguous();
  auto mean_probs = mean_probs_in.contiguous();
  auto workspace = at::empty({num_experts}, logits.options().dtype(wdtype));

  // launch
  SMOE_CUDA_CHECK(cuda::router_losses_backward(
      kernel_dtype(logits), grad_losses.const_data_ptr(), logits.const_data_ptr(),
      counts.const_data_ptr<int32_t>(), num_tokens, num_experts, k, mean_probs.const_data_ptr(),
      workspace.mutable_data_ptr(), grad.mutable_data_ptr(), current_stream()));
  return grad;
}

}  // namespace
}  // namespace smoe

SMOE_CUDA_LIBRARY_IMPL(m) {
  m.impl("route", &smoe::route_cuda);
  m.impl("route_backward", &smoe::route_backward_cuda);
  m.impl("router_losses", &smoe::router_losses_cuda);
  m.impl("router_losses_backward", &smoe::router_losses_backward_cuda);
}
