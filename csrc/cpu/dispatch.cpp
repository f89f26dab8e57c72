// Token dispatch: group the N = T * k (token, slot) pairs of a routing by expert, and move
// hidden rows between token order and expert order.
//
//   ids:      [T, k] int32 | int64 (any strides; made contiguous), values in [0, E).
//             Flat slot of (t, j) is s = t * k + j. Ids in a row need not be distinct.
//   order:    [N] int32, order[pos] = the slot placed at sorted row pos. A STABLE sort by
//             expert: within an expert, slots appear in increasing order.
//   offsets:  [E + 1] int64, exclusive prefix sum of the per-expert counts; rows of expert e
//             are offsets[e]:offsets[e + 1], offsets[E] = N.
//   inverse:  [T, k] int32, inverse[t, j] = the sorted row of slot (t, j):
//             order[inverse.flatten()[s]] == s.
//
//   permute:            x [T, H] -> xs [N, H],  xs[inverse[t, j]] = x[t]
//   unpermute:          ys [N, H], weights [T, k] or none (= 1) -> y [T, H],
//                       y[t] = sum_j weights[t, j] * ys[inverse[t, j]]
//   unpermute_backward: grad_ys[inverse[t, j]] = weights[t, j] * grad_y[t]
//                       grad_weights[t, j]     = dot(grad_y[t], ys[inverse[t, j]])
//   (permute's backward is unpermute with no weights: grad_x[t] = sum_j grad_xs[inverse[t, j]].)
//
// x, ys, grad_y are float32 | float64 | bfloat16 | float16 (any strides; made contiguous);
// outputs keep their dtype and are contiguous. Weights may be any float dtype; the sums run
// in float32 (float64 for float64 rows) and are rounded once. grad_weights comes back in the
// weights dtype, or as an empty [0] tensor when it is not requested.
//
// inverse must come from dispatch, i.e. be a permutation of [0, N): only then does permute
// write every row of xs exactly once and unpermute_backward every row of grad_ys. Both check
// it (IndexError for a value outside [0, N), ValueError for a repeated one); unpermute only
// reads rows and checks the range.
//
// Threads:
//   dispatch: a stable counting sort. The N slots are split into C contiguous chunks (one per
//     thread, at least kSlotsPerChunk slots each). Each chunk counts its experts in parallel; a
//     serial prefix sum over (expert, chunk) gives every chunk its first row per expert; then
//     each chunk scatters its slots in increasing order, which keeps the sort stable. The
//     result is unique (a stable sort), so it does not depend on C or the thread count.
//   Every kernel that moves rows writes its output in order, one contiguous block per task
//   (sequential stores; the first touch of a fresh output's pages often costs more than the
//   copy itself), and gathers its inputs:
//   permute, unpermute_backward: at::parallel_for over sorted rows r; slot s = order[r] is
//     rebuilt from inverse by one serial pass that also proves inverse is a permutation.
//   unpermute: at::parallel_for over tokens t; the k rows are summed kBlock elements at a
//     time, so k read streams are in flight at once and the partial sum stays in L1.
//   Rows are contiguous runs of H elements: memcpy for permute, float32 (float64) loops that
//   vectorize for the sums; bfloat16 / float16 rows are widened kChunk elements at a time.
// Reference: smoe_ops.reference.dispatch / permute / unpermute.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"

namespace smoe {
namespace {

constexpr int64_t kSlotsPerChunk = 16384;  // below this, a thread's counting sort is ~10 us
constexpr int64_t kChunk = 512;            // elements per widening buffer (bf16 / fp16 rows)
constexpr int64_t kBlock = 256;            // row elements per step of a k-row sum
constexpr int64_t kTaskElems = 16384;      // elements moved per parallel task, at least

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Items (tokens or rows) per parallel task, when each item moves rows_per_item rows of
// hidden_size elements.
int64_t task_grain(int64_t rows_per_item, int64_t hidden_size) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, rows_per_item * hidden_size));
}

// ---------------------------------------------------------------------------------------------
// dispatch

// Counts the experts of slots [begin, end) into count[E]. Returns the first slot whose id is
// out of [0, E), or -1.
template <typename id_t>
int64_t count_experts(const id_t* ids, int64_t begin, int64_t end, int64_t num_experts,
                      int64_t* count) {
  for (int64_t s = begin; s < end; ++s) {
    const int64_t e = static_cast<int64_t>(ids[s]);
    if (e < 0 || e >= num_experts) return s;
    ++count[e];
  }
  return -1;
}

template <typename id_t>
void dispatch_kernel(const id_t* ids, int64_t topk, int64_t num_slots, int64_t num_experts,
                     int32_t* order, int64_t* offsets, int32_t* inverse) {
  const int64_t num_chunks = std::clamp<int64_t>(ceil_div(num_slots, kSlotsPerChunk), 1,
                                                 at::get_num_threads());
  const int64_t chunk_size = ceil_div(num_slots, num_chunks);
  // first_row[c * E + e]: expert e's count in chunk c, then the row its first slot goes to.
  std::vector<int64_t> first_row(num_chunks * num_experts, 0);
  std::vector<int64_t> bad_slot(num_chunks, -1);

  // Per-chunk histograms. Each task counts into its own vector: no false sharing.
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> count(num_experts);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(count.begin(), count.end(), 0);
      const int64_t lo = c * chunk_size, hi = std::min(num_slots, lo + chunk_size);
      bad_slot[c] = count_experts(ids, lo, hi, num_experts, count.data());
      std::copy(count.begin(), count.end(), first_row.begin() + c * num_experts);
    }
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t s = bad_slot[c];
    TORCH_CHECK_INDEX(s < 0, "smoe_ops.dispatch: ids[", s / topk, ", ", s % topk, "] = ",
                      static_cast<int64_t>(ids[s]),
                      " is out of range, expected values in [0, num_experts) with num_experts = ",
                      num_experts);
  }

  // Exclusive prefix sum in (expert, chunk) order: chunk c of expert e starts after every
  // earlier expert and after the slots of expert e in chunks before c.
  int64_t row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    offsets[e] = row;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t n = first_row[c * num_experts + e];
      first_row[c * num_experts + e] = row;
      row += n;
    }
  }
  offsets[num_experts] = row;

  // Scatter, each chunk in increasing slot order: stable.
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> next(num_experts);
    for (int64_t c = begin; c < end; ++c) {
      std::copy_n(first_row.begin() + c * num_experts, num_experts, next.begin());
      const int64_t lo = c * chunk_size, hi = std::min(num_slots, lo + chunk_size);
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t pos = next[static_cast<int64_t>(ids[s])]++;
        order[pos] = static_cast<int32_t>(s);
        inverse[s] = static_cast<int32_t>(pos);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& ids_in,
                                                            int64_t num_experts) {
  // validate
  check_dispatch_ids("smoe_ops.dispatch", ids_in, num_experts, Placement::cpu());

  // allocate
  auto ids = ids_in.contiguous();
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), num_slots = ids.numel();
  auto order = at::empty({num_slots}, ids.options().dtype(at::kInt));
  auto offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  auto inverse = at::empty({num_tokens, topk}, ids.options().dtype(at::kInt));

  // launch
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "dispatch", [&] {
    dispatch_kernel(ids.data_ptr<index_t>(), topk, num_slots, num_experts,
                    order.data_ptr<int32_t>(), offsets.data_ptr<int64_t>(),
                    inverse.data_ptr<int32_t>());
  });
  return {order, offsets, inverse};
}

// ---------------------------------------------------------------------------------------------
// The values of inverse, checked on the host by permute, unpermute and unpermute_backward
// (their layouts: checks.h).

void check_row_index(const char* op, const at::Tensor& inverse, int64_t slot, int32_t row) {
  const int64_t num_rows = inverse.numel(), topk = inverse.size(1);
  TORCH_CHECK_INDEX(row >= 0 && row < num_rows, op, ": inverse[", slot / topk, ", ",
                    slot % topk, "] = ", row, " is out of range, expected a row in [0, ",
                    num_rows, ") (inverse must come from smoe_ops.dispatch)");
}

// unpermute only reads rows: indices in range are all it needs. A vectorizable min / max pass
// over the [T, k] indices, 1/H of the traffic of the kernel it guards.
void check_inverse_range(const char* op, const at::Tensor& inverse) {
  const int32_t* rows = inverse.data_ptr<int32_t>();
  const int64_t n = inverse.numel();
  int32_t lo = 0, hi = 0;
  for (int64_t s = 0; s < n; ++s) {
    lo = std::min(lo, rows[s]);
    hi = std::max(hi, rows[s]);
  }
  if (lo >= 0 && hi < n) return;
  for (int64_t s = 0; s < n; ++s) check_row_index(op, inverse, s, rows[s]);
}

// The slot held by each sorted row (dispatch's order), rebuilt from inverse for the kernels
// that write rows. Checks that inverse is a permutation of [0, N) -- in range, no row twice --
// so that writing row r from slot_of_row[r] for every r leaves no row unwritten. One serial
// pass over the N indices.
std::vector<int32_t> slot_of_rows(const char* op, const at::Tensor& inverse) {
  const int32_t* rows = inverse.data_ptr<int32_t>();
  const int64_t n = inverse.numel(), topk = inverse.size(1);
  std::vector<int32_t> slot_of_row(n, -1);
  for (int64_t s = 0; s < n; ++s) {
    const int32_t r = rows[s];
    if (r < 0 || r >= n) check_row_index(op, inverse, s, r);
    const int32_t other = slot_of_row[r];
    TORCH_CHECK_VALUE(other < 0, op, ": inverse[", s / topk, ", ", s % topk, "] = ", r,
                      " repeats inverse[", other / topk, ", ", other % topk,
                      "], expected a permutation of [0, ", n, ") (from smoe_ops.dispatch)");
    slot_of_row[r] = static_cast<int32_t>(s);
  }
  return slot_of_row;
}

// Weights in the accumulation type of rows of `dtype` (contiguous), or undefined for none.
at::Tensor acc_weights(const std::optional<at::Tensor>& weights, at::ScalarType dtype) {
  if (!weights) return at::Tensor();
  return weights->to(weight_dtype(dtype)).contiguous();
}

template <typename scalar_t>
const acc_t<scalar_t>* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t<scalar_t>>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// permute

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& inverse_in) {
  // validate
  const char* op = "smoe_ops.permute";
  check_permute_args(op, x_in, inverse_in, Placement::cpu());
  auto inverse = inverse_in.contiguous();
  const std::vector<int32_t> slot_of_row = slot_of_rows(op, inverse);

  // allocate
  auto x = x_in.contiguous();
  const int64_t num_rows = inverse.numel(), topk = inverse.size(1), hidden = x.size(1);
  auto xs = at::empty({num_rows, hidden}, x.options());
  if (xs.numel() == 0) return xs;

  // launch: a gather in sorted-row order, so each task writes one contiguous block of xs
  // (sequential stores and first-touch page faults; x is k times smaller and is reread).
  const int64_t row_bytes = hidden * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(xs.data_ptr());
  at::parallel_for(0, num_rows, task_grain(1, hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(dst + r * row_bytes, src + slot_of_row[r] / topk * row_bytes, row_bytes);
    }
  });
  return xs;
}

// ---------------------------------------------------------------------------------------------
// unpermute: y[t] from the token's k rows `rows` and weights `weights` (accumulation type, or
// nullptr for ones).

SMOE_MULTIVERSION
void scale_row_f32(const float* x, float w, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = w * x[i];
}

SMOE_MULTIVERSION
void axpy_row_f32(const float* x, float w, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += w * x[i];
}

// out = w * g, and returns dot(g, y): one pass over g for both. `omp simd reduction` lets
// the compiler split the sum into vector lanes (a float reduction does not vectorize without
// reassociation); the summation order then depends on the vector width of the clone.
SMOE_MULTIVERSION
float scale_dot_row_f32(const float* g, const float* y, float w, float* out, int64_t n) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = w * g[i];
    dot += g[i] * y[i];
  }
  return dot;
}

void unpermute_token(const float* ys, int64_t hidden, const int32_t* rows, const float* weights,
                     int64_t topk, float* out) {
  for (int64_t start = 0; start < hidden; start += kBlock) {
    const int64_t len = std::min(kBlock, hidden - start);
    scale_row_f32(ys + rows[0] * hidden + start, weights ? weights[0] : 1.0f, out + start, len);
    for (int64_t j = 1; j < topk; ++j) {
      axpy_row_f32(ys + rows[j] * hidden + start, weights ? weights[j] : 1.0f, out + start, len);
    }
  }
}

void unpermute_token(const double* ys, int64_t hidden, const int32_t* rows,
                     const double* weights, int64_t topk, double* out) {
  std::fill(out, out + hidden, 0.0);
  for (int64_t j = 0; j < topk; ++j) {
    const double w = weights ? weights[j] : 1.0;
    const double* row = ys + rows[j] * hidden;
    for (int64_t i = 0; i < hidden; ++i) out[i] += w * row[i];
  }
}

// Reduced precision: widen kChunk elements of each row, accumulate in float32, round once.
template <typename scalar_t>
void unpermute_token(const scalar_t* ys, int64_t hidden, const int32_t* rows,
                     const float* weights, int64_t topk, scalar_t* out) {
  float row[kChunk], acc[kChunk];
  for (int64_t start = 0; start < hidden; start += kChunk) {
    const int64_t len = std::min(kChunk, hidden - start);
    std::fill(acc, acc + len, 0.0f);
    for (int64_t j = 0; j < topk; ++j) {
      const scalar_t* src = ys + rows[j] * hidden + start;
      for (int64_t i = 0; i < len; ++i) row[i] = static_cast<float>(src[i]);
      axpy_row_f32(row, weights ? weights[j] : 1.0f, acc, len);
    }
    for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<scalar_t>(acc[i]);
  }
}

at::Tensor unpermute_cpu(const at::Tensor& ys_in, const at::Tensor& inverse_in,
                         const std::optional<at::Tensor>& weights_in) {
  // validate
  const char* op = "smoe_ops.unpermute";
  check_dispatched_rows(op, ys_in, inverse_in, Placement::cpu());
  check_weights(op, weights_in, inverse_in, Placement::cpu());
  auto inverse = inverse_in.contiguous();
  check_inverse_range(op, inverse);

  // allocate
  auto ys = ys_in.contiguous();
  auto weights = acc_weights(weights_in, ys.scalar_type());
  const int64_t num_tokens = inverse.size(0), topk = inverse.size(1), hidden = ys.size(1);
  auto y = at::empty({num_tokens, hidden}, ys.options());
  if (y.numel() == 0) return y;
  if (topk == 0) return y.zero_();  // an empty sum

  // launch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "unpermute", [&] {
    const scalar_t* src = ys.data_ptr<scalar_t>();
    const int32_t* rows = inverse.data_ptr<int32_t>();
    const acc_t<scalar_t>* w = data_or_null<scalar_t>(weights);
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, task_grain(topk, hidden), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        unpermute_token(src, hidden, rows + t * topk, w ? w + t * topk : nullptr, topk,
                        out + t * hidden);
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// unpermute_backward, one sorted row at a time: grad_ys_row = w * grad_y_row and, when
// grad_w is not null, *grad_w = dot(grad_y_row, ys_row).

void unpermute_backward_row(const float* grad_y, const float* ys, int64_t hidden, float w,
                            float* grad_ys, float* grad_w) {
  if (grad_w) {
    *grad_w = scale_dot_row_f32(grad_y, ys, w, grad_ys, hidden);
  } else {
    scale_row_f32(grad_y, w, grad_ys, hidden);
  }
}

void unpermute_backward_row(const double* grad_y, const double* ys, int64_t hidden, double w,
                            double* grad_ys, double* grad_w) {
  double dot = 0.0;
  for (int64_t i = 0; i < hidden; ++i) {
    grad_ys[i] = w * grad_y[i];
    dot += grad_y[i] * ys[i];
  }
  if (grad_w) *grad_w = dot;
}

template <typename scalar_t>
void unpermute_backward_row(const scalar_t* grad_y, const scalar_t* ys, int64_t hidden,
                            float w, scalar_t* grad_ys, float* grad_w) {
  float g[kChunk], row[kChunk], out[kChunk];
  float dot = 0.0f;
  for (int64_t start = 0; start < hidden; start += kChunk) {
    const int64_t len = std::min(kChunk, hidden - start);
    for (int64_t i = 0; i < len; ++i) g[i] = static_cast<float>(grad_y[start + i]);
    if (grad_w) {
      for (int64_t i = 0; i < len; ++i) row[i] = static_cast<float>(ys[start + i]);
      dot += scale_dot_row_f32(g, row, w, out, len);
    } else {
      scale_row_f32(g, w, out, len);
    }
    for (int64_t i = 0; i < len; ++i) grad_ys[start + i] = static_cast<scalar_t>(out[i]);
  }
  if (grad_w) *grad_w = dot;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& ys_in, const at::Tensor& inverse_in,
    const std::optional<at::Tensor>& weights_in, bool weights_grad) {
  // validate
  const char* op = "smoe_ops.unpermute_backward";
  check_unpermute_backward_args(op, grad_y_in, ys_in, inverse_in, weights_in, Placement::cpu());
  auto inverse = inverse_in.contiguous();
  const std::vector<int32_t> slot_of_row = slot_of_rows(op, inverse);

  // allocate: grad_weights in the accumulation type, cast to the weights dtype at the end.
  auto ys = ys_in.contiguous();
  auto grad_y = grad_y_in.contiguous();
  auto weights = acc_weights(weights_in, ys.scalar_type());
  const bool want_grad_weights = weights_in.has_value() && weights_grad;
  const auto grad_weights_dtype = weights_in ? weights_in->scalar_type() : ys.scalar_type();
  const int64_t num_rows = ys.size(0), topk = inverse.size(1), hidden = ys.size(1);
  auto grad_ys = at::empty_like(ys);
  auto grad_weights = want_grad_weights ? at::empty(inverse.sizes(), weights.options())
                                        : at::empty({0}, ys.options().dtype(grad_weights_dtype));

  // launch: in sorted-row order, so each task writes one contiguous block of grad_ys.
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, ys.scalar_type(), "unpermute_backward", [&] {
        using acc = acc_t<scalar_t>;
        const scalar_t* g = grad_y.data_ptr<scalar_t>();
        const scalar_t* src = ys.data_ptr<scalar_t>();
        const acc* w = data_or_null<scalar_t>(weights);
        scalar_t* dst = grad_ys.data_ptr<scalar_t>();
        acc* gw = want_grad_weights ? grad_weights.data_ptr<acc>() : nullptr;
        at::parallel_for(0, num_rows, task_grain(1, hidden), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t s = slot_of_row[r];
            unpermute_backward_row(g + s / topk * hidden, src + r * hidden, hidden,
                                   w ? w[s] : acc(1), dst + r * hidden, gw ? gw + s : nullptr);
          }
        });
      });
  if (want_grad_weights) grad_weights = grad_weights.to(grad_weights_dtype);
  return {grad_ys, grad_weights};
}

}  // namespace
}  // namespace smoe

TORCH_LIBRARY_IMPL(smoe_ops, CPU, m) {
  m.impl("dispatch", &smoe::dispatch_cpu);
  m.impl("permute", &smoe::permute_cpu);
  m.impl("unpermute", &smoe::unpermute_cpu);
  m.impl("unpermute_backward", &smoe::unpermute_backward_cpu);
}
