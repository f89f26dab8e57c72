// Input checks shared by every kernel. Each failure names the op, the argument, what it got
// and what it expected, and raises the Python exception a caller would expect: ValueError
// for bad values and shapes, TypeError for dtypes, IndexError for indices out of range.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

namespace smoe {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", layout,
                    ", got shape ", shape_str(t));
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU for this kernel, ",
                    "got device ", t.device());
}

#ifdef SMOE_CUDA_EMULATE
// The CUDA emulator (tests/cuda_emulator.py) runs the CUDA glue on CPU tensors.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU for the CUDA ",
                    "emulator, got device ", t.device());
}
#else
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cuda(), op, ": ", name, " must be on a CUDA device for this ",
                    "kernel, got device ", t.device());
}
#endif

// Every tensor argument of a CUDA op lives on the device of its first one.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* other_name, const at::Tensor& other) {
  TORCH_CHECK_VALUE(t.device() == other.device(), op, ": ", name, " must be on the device of ",
                    other_name, " (", other.device(), "), got device ", t.device());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 ||
                       st == at::kHalf,
                   op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
                   t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* other_name, const at::Tensor& other) {
  TORCH_CHECK_TYPE(t.scalar_type() == other.scalar_type(), op, ": ", name, " must have the dtype",
                   " of ", other_name, " (", other.scalar_type(), "), got ", t.scalar_type());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must equal ",
                    what, " (", expected, "), got shape ", shape_str(t));
}

// Where an op's tensors must live: on the CPU (the CPU kernels), or on the CUDA device of the
// op's first tensor (the anchor). Validators shared by the backends take it, so that one
// text serves both and the CUDA glue adds its device checks in the same place.
class Placement {
 public:
  static Placement cpu() { return Placement(nullptr, nullptr); }
  // Keeps the anchor's address: the anchor must outlive the Placement (a temporary may not).
  static Placement cuda(const char* anchor_name, const at::Tensor& anchor) {
    return Placement(anchor_name, &anchor);
  }
  static Placement cuda(const char* anchor_name, at::Tensor&& anchor) = delete;
  void check(const char* op, const char* name, const at::Tensor& t) const {
    if (anchor_ == nullptr) return check_cpu(op, name, t);
    check_cuda(op, name, t);
    if (&t != anchor_) check_same_device(op, name, t, anchor_name_, *anchor_);
  }

 private:
  Placement(const char* anchor_name, const at::Tensor* anchor)
      : anchor_name_(anchor_name), anchor_(anchor) {}
  const char* anchor_name_;
  const at::Tensor* anchor_;
};

// Arguments of route, router_losses and their backwards, the same on every backend.
inline bool parse_score(const char* op, std::string_view score) {
  TORCH_CHECK_VALUE(score == "softmax" || score == "sigmoid", op,
                    ": score must be 'softmax' or 'sigmoid', got '", score, "'");
  return score == "sigmoid";
}

inline void check_k(const char* op, int64_t k, int64_t num_experts) {
  TORCH_CHECK_VALUE(k >= 1 && k <= num_experts, op, ": k must be in [1, num_experts = ",
                    num_experts, "], got ", k);
}

inline void check_groups(const char* op, int64_t k, int64_t num_experts, int64_t num_groups,
                         int64_t topk_groups) {
  TORCH_CHECK_VALUE(num_groups >= 1 && num_experts % num_groups == 0, op,
                    ": num_groups must be >= 1 and divide num_experts = ", num_experts,
                    ", got ", num_groups);
  TORCH_CHECK_VALUE(topk_groups >= 1 && topk_groups <= num_groups, op,
                    ": topk_groups must be in [1, num_groups = ", num_groups, "], got ",
                    topk_groups);
  const int64_t reachable = topk_groups * (num_experts / num_groups);
  TORCH_CHECK_VALUE(k <= reachable, op, ": k must be <= topk_groups * num_experts / ",
                    "num_groups = ", reachable, " (the experts of the kept groups), got ", k);
}

// Accumulation type: float64 stays float64, everything else accumulates in float32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Routing weights, losses and probabilities are float32, or float64 for float64 logits.
inline at::ScalarType weight_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// logits [T, E], floating, on `where`.
inline void check_logits(const char* op, const at::Tensor& logits, const Placement& where) {
  where.check(op, "logits", logits);
  check_rank(op, "logits", logits, 2, "[num_tokens, num_experts]");
  check_floating(op, "logits", logits);
}

// counts [E] int32, on `where`.
inline void check_counts(const char* op, const at::Tensor& counts, int64_t num_experts,
                         const Placement& where) {
  where.check(op, "counts", counts);
  check_rank(op, "counts", counts, 1, "[num_experts]");
  check_dtype(op, "counts", counts, at::kInt);
  check_size(op, "counts", counts, 0, num_experts, "num_experts");
}

// expert_bias [E], floating, on `where`; returned contiguous in the weight type `wdtype`.
inline std::optional<at::Tensor> checked_expert_bias(const char* op,
                                                     const std::optional<at::Tensor>& bias,
                                                     int64_t num_experts,
                                                     at::ScalarType wdtype,
                                                     const Placement& where) {
  if (!bias.has_value()) return std::nullopt;
  where.check(op, "expert_bias", *bias);
  check_rank(op, "expert_bias", *bias, 1, "[num_experts]");
  check_floating(op, "expert_bias", *bias);
  check_size(op, "expert_bias", *bias, 0, num_experts, "num_experts");
  return bias->to(wdtype).contiguous();
}

// ---------------------------------------------------------------------------------------------
// Arguments of dispatch, permute, unpermute and unpermute_backward. Index values (ids in
// range, inverse a permutation of [0, T * k)) are checked by each backend where it reads
// them: the CPU on the host, CUDA on the device, without a host sync.

// ids of dispatch: [num_tokens, topk] int32 or int64 on `where`, at most int32-many rows in all.
inline void check_dispatch_ids(const char* op, const at::Tensor& ids, int64_t num_experts,
                               const Placement& where) {
  where.check(op, "ids", ids);
  check_rank(op, "ids", ids, 2, "[num_tokens, topk]");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                   ": ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(ids.numel() <= std::numeric_limits<int32_t>::max(), op,
                    ": ids.numel() must fit in int32 (the sorted rows are int32), got ",
                    ids.numel());
}

// inverse [num_tokens, topk] int32 (from dispatch), on `where`.
inline void check_inverse(const char* op, const at::Tensor& inverse, const Placement& where) {
  where.check(op, "inverse", inverse);
  check_rank(op, "inverse", inverse, 2, "[num_tokens, topk] (from smoe_ops.dispatch)");
  check_dtype(op, "inverse", inverse, at::kInt);
  TORCH_CHECK_VALUE(inverse.numel() <= std::numeric_limits<int32_t>::max(), op,
                    ": inverse.numel() must fit in int32 (it indexes int32 rows), got ",
                    inverse.numel());
}

// Hidden rows `name` (x, ys, grad_y): [num_rows, hidden_size] floating, on `where`.
inline void check_rows(const char* op, const char* name, const at::Tensor& t,
                       const Placement& where) {
  where.check(op, name, t);
  check_rank(op, name, t, 2, "[num_rows, hidden_size]");
  check_floating(op, name, t);
}

// weights of unpermute and unpermute_backward, or none: one per slot, the shape of inverse,
// any floating dtype, on `where`.
inline void check_weights(const char* op, const std::optional<at::Tensor>& weights,
                          const at::Tensor& inverse, const Placement& where) {
  if (!weights.has_value()) return;
  where.check(op, "weights", *weights);
  check_floating(op, "weights", *weights);
  TORCH_CHECK_VALUE(weights->sizes() == inverse.sizes(), op,
                    ": weights must have the shape of inverse (", shape_str(inverse),
                    ", [num_tokens, topk]), got shape ", shape_str(*weights));
}

// permute(x [T, H], inverse [T, k]).
inline void check_permute_args(const char* op, const at::Tensor& x, const at::Tensor& inverse,
                               const Placement& where) {
  check_rows(op, "x", x, where);
  check_inverse(op, inverse, where);
  check_size(op, "x", x, 0, inverse.size(0), "inverse.shape[0], the number of tokens");
}

// ys [T * k, H], the dispatched rows of inverse [T, k] (unpermute: with check_weights).
inline void check_dispatched_rows(const char* op, const at::Tensor& ys, const at::Tensor& inverse,
                                  const Placement& where) {
  check_rows(op, "ys", ys, where);
  check_inverse(op, inverse, where);
  check_size(op, "ys", ys, 0, inverse.numel(), "inverse.numel(), the dispatched rows");
}

// unpermute_backward(grad_y [T, H] in the dtype of ys, ys, inverse, weights).
inline void check_unpermute_backward_args(const char* op, const at::Tensor& grad_y,
                                          const at::Tensor& ys, const at::Tensor& inverse,
                                          const std::optional<at::Tensor>& weights,
                                          const Placement& where) {
  check_dispatched_rows(op, ys, inverse, where);
  check_rows(op, "grad_y", grad_y, where);
  check_same_dtype(op, "grad_y", grad_y, "ys", ys);
  check_size(op, "grad_y", grad_y, 0, inverse.size(0), "inverse.shape[0]");
  check_size(op, "grad_y", grad_y, 1, ys.size(1), "ys.shape[1]");
  check_weights(op, weights, inverse, where);
}

// ---------------------------------------------------------------------------------------------
// Arguments of grouped_mm and grouped_mm_backward. The values of offsets (offsets[0] = 0,
// non-decreasing, offsets[E] = N) are the backend's to check: the CPU reads them on the host,
// CUDA checks them on the device.

// x [N, K] floating; w [E, K, M] in the dtype of x; offsets [E + 1] int64; all on `where`.
inline void check_grouped_mm_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& offsets, const Placement& where) {
  where.check(op, "x", x);
  where.check(op, "w", w);
  check_rank(op, "x", x, 2, "[num_rows, in_features]");
  check_rank(op, "w", w, 3, "[num_experts, in_features, out_features]");
  check_floating(op, "x", x);
  check_same_dtype(op, "w", w, "x", x);
  check_size(op, "w", w, 1, x.size(1), "x.shape[1]");
  where.check(op, "offsets", offsets);
  check_rank(op, "offsets", offsets, 1, "[num_experts + 1]");
  check_dtype(op, "offsets", offsets, at::kLong);
  check_size(op, "offsets", offsets, 0, w.size(0) + 1, "w.shape[0] + 1");
}

// bias [E, M] in the dtype of x, on `where`, or none.
inline void check_grouped_mm_bias(const char* op, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& x, const at::Tensor& w,
                                  const Placement& where) {
  if (!bias.has_value()) return;
  where.check(op, "bias", *bias);
  check_rank(op, "bias", *bias, 2, "[num_experts, out_features]");
  check_same_dtype(op, "bias", *bias, "x", x);
  check_size(op, "bias", *bias, 0, w.size(0), "w.shape[0]");
  check_size(op, "bias", *bias, 1, w.size(2), "w.shape[2]");
}

// grad_out [N, M] of grouped_mm_backward, in the dtype of x, on `where`.
inline void check_grouped_mm_grad_out(const char* op, const at::Tensor& grad_out,
                                      const at::Tensor& x, const at::Tensor& w,
                                      const Placement& where) {
  const int64_t num_rows = x.size(0), out_features = w.size(2);
  where.check(op, "grad_out", grad_out);
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  TORCH_CHECK_VALUE(
      grad_out.dim() == 2 && grad_out.size(0) == num_rows && grad_out.size(1) == out_features, op,
      ": grad_out must have shape [", num_rows, ", ", out_features,
      "] (x.shape[0], w.shape[2]), got ", shape_str(grad_out));
}

// ---------------------------------------------------------------------------------------------
// Arguments of swiglu and swiglu_backward.

// gate_up [num_rows, 2 * ffn_size] floating, on `where`.
inline void check_swiglu_input(const char* op, const at::Tensor& gate_up, const Placement& where) {
  where.check(op, "gate_up", gate_up);
  check_rank(op, "gate_up", gate_up, 2, "[num_rows, 2 * ffn_size]");
  check_floating(op, "gate_up", gate_up);
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0, op, ": gate_up.shape[1] must be even ",
                    "([num_rows, 2 * ffn_size]), got shape ", shape_str(gate_up));
}

// grad_out [num_rows, ffn_size] of swiglu_backward, in the dtype of gate_up, on `where`.
inline void check_swiglu_grad_out(const char* op, const at::Tensor& grad_out,
                                  const at::Tensor& gate_up, const Placement& where) {
  where.check(op, "grad_out", grad_out);
  check_same_dtype(op, "grad_out", grad_out, "gate_up", gate_up);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == gate_up.size(0) &&
                        grad_out.size(1) * 2 == gate_up.size(1),
                    op, ": grad_out must have shape [", gate_up.size(0), ", ", gate_up.size(1) / 2,
                    "], got ", shape_str(grad_out));
}

// route_backward's ids [num_tokens, k] int32 and grad_weights (the shape of ids, the weight
// type of the logits), on `where`; returns k. The ids' values are the backend's to check.
inline int64_t check_route_backward_args(const char* op, const at::Tensor& ids,
                                         const at::Tensor& grad_weights, const at::Tensor& logits,
                                         const Placement& where) {
  where.check(op, "ids", ids);
  check_rank(op, "ids", ids, 2, "[num_tokens, k]");
  check_dtype(op, "ids", ids, at::kInt);
  check_size(op, "ids", ids, 0, logits.size(0), "num_tokens");
  const int64_t k = ids.size(1);
  check_k(op, k, logits.size(1));
  where.check(op, "grad_weights", grad_weights);
  check_rank(op, "grad_weights", grad_weights, 2, "[num_tokens, k]");
  check_dtype(op, "grad_weights", grad_weights, weight_dtype(logits.scalar_type()));
  TORCH_CHECK_VALUE(grad_weights.sizes() == ids.sizes(), op,
                    ": grad_weights must have the shape of ids ", shape_str(ids), ", got ",
                    shape_str(grad_weights));
  return k;
}

// router_losses_backward's grad_losses [4] and mean_probs [num_experts], both in the weight
// type of the logits, on `where`.
inline void check_router_losses_backward_args(const char* op, const at::Tensor& grad_losses,
                                              const at::Tensor& mean_probs,
                                              const at::Tensor& logits, const Placement& where) {
  const auto wdtype = weight_dtype(logits.scalar_type());
  where.check(op, "grad_losses", grad_losses);
  check_rank(op, "grad_losses", grad_losses, 1, "[4]");
  check_size(op, "grad_losses", grad_losses, 0, 4, "the number of losses");
  check_dtype(op, "grad_losses", grad_losses, wdtype);
  where.check(op, "mean_probs", mean_probs);
  check_rank(op, "mean_probs", mean_probs, 1, "[num_experts]");
  check_size(op, "mean_probs", mean_probs, 0, logits.size(1), "num_experts");
  check_dtype(op, "mean_probs", mean_probs, wdtype);
}

}  // namespace smoe
