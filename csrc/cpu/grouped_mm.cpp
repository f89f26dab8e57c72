// grouped_mm: one GEMM per expert over the expert-sorted rows of a MoE layer.
//
//   x:       [N, K] float32 | float64 | bfloat16 | float16, rows of expert e in
//            offsets[e]:offsets[e+1] (as smoe_ops.permute lays them out); any strides
//   w:       [E, K, M] same dtype; any strides (a transposed view [E, M, K].transpose(1, 2)
//            is used as is, without a copy)
//   offsets: [E + 1] int64 on the CPU, offsets[0] = 0, non-decreasing, offsets[E] = N
//   bias:    [E, M] same dtype, or None
//   out:     [N, M] same dtype,   out[s:t] = x[s:t] @ w[e] (+ bias[e]),  s, t = offsets[e:e+2]
//
// Backward, for the rows s:t of each expert e:
//   grad_x[s:t] = grad_out[s:t] @ w[e]^T           [N, K]
//   grad_w[e]   = x[s:t]^T @ grad_out[s:t]         [E, K, M]  (zeros when s == t)
//   grad_bias[e] = sum over rows of grad_out[s:t]  [E, M]     (zeros when s == t)
//
// Work split. The GEMMs themselves are MKL's (oneDNN's for bfloat16), called through
// at::mm_out / at::addmm_out on per-expert views without copies; this file decides how the
// work is cut and scheduled:
//   - out and grad_x: (expert, row tile) tasks, tiles of at most N / (4 * threads) rows (but
//     at least kMinTileRows), so one expert holding every row still feeds every core;
//   - grad_w: a reduction over the expert's rows, so tasks are (expert, K tile, M tile)
//     blocks of grad_w[e], each summing all of the expert's rows (no partial sums to merge);
//     an expert gets blocks in proportion to its rows, small experts one block each;
//   - grad_bias: (expert, column chunk) tasks, summed in float32 (float64 for float64).
// Tasks are sorted largest first and pulled from a shared counter by every thread (dynamic
// scheduling: under skewed routing tasks differ in size, and static chunks would leave a
// core idle). at::mm inside at::parallel_for runs single-threaded, so each task is one
// single-threaded MKL call; a lone task runs on the caller, where MKL threads it itself.
//
// Measured on this 2-core AMD EPYC (Zen 4) VM, float32, GFLOP/s of ours vs one dense
// torch.mm with the same FLOPs ([N, K] @ [K, M]), interleaved in one run, median of 3-5:
//   N=8192 K=1024 M=5632 E=8     uniform: out 132/140, grad_x 170/168, grad_w 166/164
//                                one expert: out 166/162, grad_x 160/164, grad_w 163/172
//   N=16384 K=1024 M=512 E=128   uniform: out 155/157, grad_x 128/141, grad_w 94/143
//                                one expert: out 168/154, grad_x 140/148, grad_w 91/184
// So the tasks match dense even when one expert has every row, and a separate path with one
// MKL-threaded call per big expert was not needed. Single-threaded MKL per task size: 64+
// rows run at ~95% of a large GEMM, 16 rows at ~75% (hence kMinTileRows); grad_w blocks of
// 256 x 1408 ran at 92 GFLOP/s against 78 for full-width 128-row strips (hence square-ish
// blocks). grad_w at E=128 is bound by its fresh [E, K, M] output (268 MB, dense writes
// 2 MB): first touch of that much new memory costs ~157 ms here in page faults, ~56 ms with
// transparent huge pages (THP_MEM_ALLOC_ENABLE=1, grad_w then ~126 GFLOP/s). bfloat16: ~95%
// of dense at E=8, ~81% (out) at E=128, where 128 small oneDNN calls add their overhead.
//
// Precision: float32 and float64 run MKL in their own dtype. bfloat16 GEMMs go to oneDNN
// (AVX512-BF16 here), which accumulates in float32 and rounds once; bias is added inside the
// same addmm, before that rounding. float16: at::mm has no fast CPU path without AVX512-FP16
// (2 GFLOP/s measured here, versus ~180 for float32), so float16 operands are widened to
// float32 (x and grad_out once, w[e] per task), multiplied in float32 and rounded once.
// Reference: smoe_ops.reference.grouped_mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"

namespace smoe {
namespace {

constexpr int64_t kTasksPerThread = 4;  // largest task <= 1/4 of a thread's share of the work
constexpr int64_t kMinTileRows = 64;    // MKL float32 at 64 rows: ~95% of its large-GEMM speed
constexpr int64_t kMinTileCols = 64;    // grad_w tiles, either side: same reasoning
constexpr int64_t kBiasChunk = 256;     // grad_bias columns per task: 22 tasks for M = 5632

// One unit of scheduled work: the block [row_begin, row_end) x [col_begin, col_end) of one
// expert's output (rows of out or grad_x, rows of grad_w[e], or columns of grad_bias[e]).
struct Task {
  int64_t expert, row_begin, row_end, col_begin, col_end, cost;
};

// Runs run(task) for every task on every thread, each thread pulling the next one from a
// shared counter. Tasks are sorted by decreasing cost first, so the last ones are the small.
template <typename F>
void run_tasks(std::vector<Task>& tasks, const F& run) {
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (workers <= 1) {
    for (const Task& t : tasks) run(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: the ATen calls in a task
    // must skip autograd here too (the op's own formula differentiates it).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < num_tasks; i = next++) run(tasks[i]);
  });
}

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per tile: small enough for kTasksPerThread tasks per thread, big enough for MKL.
int64_t tile_rows(int64_t num_rows) {
  const int64_t threads = at::get_num_threads();
  return std::max(kMinTileRows, div_up(num_rows, threads * kTasksPerThread));
}

// (expert, row tile) tasks covering every row once, each over all columns (col_* unused);
// empty experts contribute none.
std::vector<Task> row_tasks(const std::vector<int64_t>& offsets) {
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t tile = tile_rows(offsets.back());
  std::vector<Task> tasks;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += tile) {
      const int64_t end = std::min(r + tile, offsets[e + 1]);
      tasks.push_back({e, r, end, 0, 0, end - r});
    }
  }
  return tasks;
}

// A GEMM operand MKL reads in place: row- or column-major with a valid leading dimension.
// Anything else would be copied by at::mm on every call, so copy it once up front.
bool gemm_ready(int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return (col_stride == 1 && row_stride >= std::max<int64_t>(1, cols)) ||
         (row_stride == 1 && col_stride >= std::max<int64_t>(1, rows));
}

at::Tensor gemm_ready_weights(const at::Tensor& w) {
  return gemm_ready(w.size(1), w.size(2), w.stride(1), w.stride(2)) ? w : w.contiguous();
}

// float16 runs in float32 (see the header); every other dtype is its own compute dtype.
at::Tensor compute_view(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t;
}

// out = a @ b (+ bias_row), computed in a's dtype and rounded once into out's dtype.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
             const at::Tensor& bias_row) {
  const bool direct = out.scalar_type() == a.scalar_type();
  if (bias_row.defined()) {
    if (direct) {
      at::addmm_out(out, bias_row, a, b);
    } else {
      out.copy_(at::addmm(bias_row, a, b));
    }
  } else if (direct) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(at::mm(a, b));
  }
}

// out[s:t] = x[s:t] @ w[e] (+ bias[e]) over (expert, row tile) tasks. x is already in the
// compute dtype; w and bias are widened per task when they are float16.
void grouped_rows_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                     const std::vector<int64_t>& offsets, at::Tensor& out) {
  std::vector<Task> tasks = row_tasks(offsets);
  run_tasks(tasks, [&](const Task& t) {
    const int64_t rows = t.row_end - t.row_begin;
    at::Tensor bias_row = bias.defined() ? compute_view(bias[t.expert]) : at::Tensor();
    mm_into(out.narrow(0, t.row_begin, rows), x.narrow(0, t.row_begin, rows),
            compute_view(w[t.expert]), bias_row);
  });
}

// Splits a [rows, cols] block into about `pieces` tiles by halving its longer side, so that
// the tiles stay square-ish: a tile reads rows + cols strips of the operands, and square
// tiles read the least for their area. Sides stay multiples of 16 (64-byte lines in float32)
// and at least kMinTileCols.
void split_block(int64_t expert, int64_t rows, int64_t cols, int64_t pieces, int64_t depth,
                 std::vector<Task>& tasks) {
  int64_t tile_r = rows, tile_c = cols;
  auto halve = [](int64_t side) { return div_up(div_up(side, 2), 16) * 16; };
  for (int64_t n = 1; n < pieces; n *= 2) {
    const bool rows_longer = tile_r >= tile_c;
    int64_t& side = rows_longer ? tile_r : tile_c;
    if (halve(side) < kMinTileCols || halve(side) >= side) break;
    side = halve(side);
  }
  for (int64_t r = 0; r < rows; r += tile_r) {
    for (int64_t c = 0; c < cols; c += tile_c) {
      const int64_t r_end = std::min(r + tile_r, rows), c_end = std::min(c + tile_c, cols);
      tasks.push_back({expert, r, r_end, c, c_end, depth * (r_end - r) * (c_end - c)});
    }
  }
}

// grad_w[e] = x[s:t]^T @ grad_out[s:t] over (expert, K tile, M tile) tasks: each task owns a
// block of grad_w[e] and sums over all of the expert's rows, so no partial sums are merged.
// Empty experts get zeros.
void grouped_weight_grad(const at::Tensor& x, const at::Tensor& grad_out,
                         const std::vector<int64_t>& offsets, at::Tensor& grad_w) {
  const int64_t num_experts = grad_w.size(0);
  const int64_t in_features = grad_w.size(1), out_features = grad_w.size(2);
  const int64_t threads = at::get_num_threads();
  // An expert's share of the multiply-adds decides its tile count: the biggest expert gets
  // kTasksPerThread tasks per thread when it holds every row, small ones one task each.
  const int64_t target = std::max<int64_t>(1, div_up(offsets.back(), threads * kTasksPerThread));
  std::vector<Task> tasks;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    const int64_t pieces = std::max<int64_t>(1, (rows + target / 2) / target);
    // Zero-filling an empty expert costs about one row of multiply-adds per element.
    split_block(e, in_features, out_features, pieces, std::max<int64_t>(rows, 1), tasks);
  }
  run_tasks(tasks, [&](const Task& t) {
    const int64_t first = offsets[t.expert], rows = offsets[t.expert + 1] - first;
    const int64_t k_len = t.row_end - t.row_begin, m_len = t.col_end - t.col_begin;
    at::Tensor dst = grad_w[t.expert].narrow(0, t.row_begin, k_len).narrow(1, t.col_begin, m_len);
    if (rows == 0) {
      dst.zero_();
      return;
    }
    at::Tensor x_cols = x.narrow(0, first, rows).narrow(1, t.row_begin, k_len);
    at::Tensor g_cols = grad_out.narrow(0, first, rows).narrow(1, t.col_begin, m_len);
    mm_into(dst, x_cols.t(), g_cols, at::Tensor());
  });
}

// Vectorized column sums: acc[j] += row[j]. Non-template and multiversioned (vec_math.h).
SMOE_MULTIVERSION
void add_row_f32(float* acc, const float* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
}

void add_row(float* acc, const float* row, int64_t n) { add_row_f32(acc, row, n); }

void add_row(double* acc, const double* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
}

// bfloat16 is the top half of a float32: widening is a 16-bit shift, which vectorizes.
SMOE_MULTIVERSION
void add_row_bf16(float* acc, const uint16_t* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(row[j]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    acc[j] += value;
  }
}

void add_row(float* acc, const at::BFloat16* row, int64_t n) {
  add_row_bf16(acc, reinterpret_cast<const uint16_t*>(row), n);
}

// grad_bias[e, c0:c1] = sum of grad_out[s:t, c0:c1]; grad_out is contiguous, in the compute
// dtype (float16 arrives widened), grad_bias in the op's dtype.
template <typename scalar_t>
void bias_grad_typed(const at::Tensor& grad_out, const std::vector<int64_t>& offsets,
                     at::Tensor& grad_bias) {
  using acc_type = acc_t<scalar_t>;
  const int64_t num_experts = grad_bias.size(0), out_features = grad_bias.size(1);
  std::vector<Task> tasks;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    for (int64_t c = 0; c < out_features; c += kBiasChunk) {
      const int64_t end = std::min(c + kBiasChunk, out_features);
      tasks.push_back({e, offsets[e], offsets[e + 1], c, end, (rows + 1) * (end - c)});
    }
  }
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const auto acc_dtype = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_type>::value);
  run_tasks(tasks, [&](const Task& t) {
    const int64_t cols = t.col_end - t.col_begin;
    acc_type acc[kBiasChunk] = {};
    for (int64_t r = t.row_begin; r < t.row_end; ++r) {
      add_row(acc, g + r * out_features + t.col_begin, cols);
    }
    auto sums = at::from_blob(acc, {cols}, acc_dtype);
    grad_bias[t.expert].narrow(0, t.col_begin, cols).copy_(sums);
  });
}

void grouped_bias_grad(const at::Tensor& grad_out, const std::vector<int64_t>& offsets,
                       at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "grouped_bias_grad",
                                 [&] { bias_grad_typed<scalar_t>(grad_out, offsets, grad_bias); });
}

// The values of offsets (their layout: check_grouped_mm_args), checked against N = x.shape[0]
// and returned as host values.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t num_experts,
                                  int64_t num_rows) {
  auto acc = offsets.accessor<int64_t, 1>();
  std::vector<int64_t> values(acc.size(0));
  for (int64_t i = 0; i <= num_experts; ++i) values[i] = acc[i];
  TORCH_CHECK_VALUE(values[0] == 0, op, ": offsets[0] must be 0, got ", values[0]);
  for (int64_t i = 1; i <= num_experts; ++i) {
    TORCH_CHECK_VALUE(values[i] >= values[i - 1], op,
                      ": offsets must be non-decreasing, got offsets[", i, "] = ", values[i],
                      " < offsets[", i - 1, "] = ", values[i - 1]);
  }
  TORCH_CHECK_VALUE(values[num_experts] == num_rows, op, ": offsets[", num_experts,
                    "] must equal x.shape[0] (", num_rows, "), got ", values[num_experts]);
  return values;
}

at::Tensor empty_unless(bool needed, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return needed ? at::empty(sizes, options) : at::empty({0}, options);
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                          const at::Tensor& offsets_in, const std::optional<at::Tensor>& bias) {
  // validate
  const char* op = "smoe_ops.grouped_mm";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see run_tasks
  check_grouped_mm_args(op, x_in, w_in, offsets_in, Placement::cpu());
  auto offsets = read_offsets(op, offsets_in, w_in.size(0), x_in.size(0));
  check_grouped_mm_bias(op, bias, x_in, w_in, Placement::cpu());

  // allocate
  auto out = at::empty({x_in.size(0), w_in.size(2)}, x_in.options());
  if (out.numel() == 0) return out;
  auto x = compute_view(x_in.contiguous());
  auto w = gemm_ready_weights(w_in);

  // launch
  grouped_rows_mm(x, w, bias.has_value() ? *bias : at::Tensor(), offsets, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& offsets_in, std::array<bool, 3> output_mask) {
  // validate
  const char* op = "smoe_ops.grouped_mm_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see run_tasks
  check_grouped_mm_args(op, x_in, w_in, offsets_in, Placement::cpu());
  auto offsets = read_offsets(op, offsets_in, w_in.size(0), x_in.size(0));
  check_grouped_mm_grad_out(op, grad_out_in, x_in, w_in, Placement::cpu());
  const int64_t num_rows = x_in.size(0), num_experts = w_in.size(0);
  const int64_t in_features = w_in.size(1), out_features = w_in.size(2);

  // allocate: unrequested gradients are empty [0] tensors
  const auto options = x_in.options();
  auto grad_x = empty_unless(output_mask[0], {num_rows, in_features}, options);
  auto grad_w = empty_unless(output_mask[1], {num_experts, in_features, out_features}, options);
  auto grad_bias = empty_unless(output_mask[2], {num_experts, out_features}, options);
  auto grad_out = compute_view(grad_out_in.contiguous());

  // launch
  if (output_mask[0] && grad_x.numel() > 0) {
    auto w_t = gemm_ready_weights(w_in).transpose(1, 2);
    grouped_rows_mm(grad_out, w_t, at::Tensor(), offsets, grad_x);
  }
  if (output_mask[1] && grad_w.numel() > 0) {
    grouped_weight_grad(compute_view(x_in.contiguous()), grad_out, offsets, grad_w);
  }
  if (output_mask[2] && grad_bias.numel() > 0) grouped_bias_grad(grad_out, offsets, grad_bias);
  return {grad_x, grad_w, grad_bias};
}

}  // namespace
}  // namespace smoe

TORCH_LIBRARY_IMPL(smoe_ops, CPU, m) {
  m.impl("grouped_mm", &smoe::grouped_mm_cpu);
  m.impl("grouped_mm_backward", &smoe::grouped_mm_backward_cpu);
}
