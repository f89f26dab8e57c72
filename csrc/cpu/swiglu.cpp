// swiglu: the gated activation of SwiGLU expert FFNs.
//
//   gate_up: [N, 2I] float32 | float64 | bfloat16 | float16 (any strides; made contiguous)
//   out:     [N, I]  same dtype,  out[n, i] = silu(gate_up[n, i]) * gate_up[n, I + i]
//   silu(g) = g * sigmoid(g)
//
// Backward, with s = sigmoid(g):
//   d gate = grad * u * s * (1 + g * (1 - s)),   d up = grad * g * s
//
// Threads: at::parallel_for over rows; each row is one contiguous run of I elements for gate,
// up and out, processed by a float32 (or float64) inner loop that vectorizes. bfloat16 and
// float16 rows are widened into a float32 buffer, computed, and rounded once on the way out.
// Reference: smoe_ops.reference.swiglu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"

namespace smoe {
namespace {

constexpr int64_t kChunk = 512;  // elements per widening buffer: fits L1 three times over

SMOE_MULTIVERSION
void swiglu_row_f32(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + fast_expf(-g)) * up[i];
  }
}

SMOE_MULTIVERSION
void swiglu_backward_row_f32(const float* grad, const float* gate, const float* up,
                             float* dgate, float* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    float s = 1.0f / (1.0f + fast_expf(-g));
    dgate[i] = grad[i] * up[i] * s * (1.0f + g * (1.0f - s));
    dup[i] = grad[i] * g * s;
  }
}

void swiglu_row(const double* gate, const double* up, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
}

void swiglu_backward_row(const double* grad, const double* gate, const double* up,
                         double* dgate, double* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double g = gate[i];
    double s = 1.0 / (1.0 + std::exp(-g));
    dgate[i] = grad[i] * up[i] * s * (1.0 + g * (1.0 - s));
    dup[i] = grad[i] * g * s;
  }
}

void swiglu_row(const float* gate, const float* up, float* out, int64_t n) {
  swiglu_row_f32(gate, up, out, n);
}

void swiglu_backward_row(const float* grad, const float* gate, const float* up, float* dgate,
                         float* dup, int64_t n) {
  swiglu_backward_row_f32(grad, gate, up, dgate, dup, n);
}

// Reduced precision: widen kChunk elements at a time, compute in float32, round once.
template <typename scalar_t>
void swiglu_row(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t n) {
  float g[kChunk], u[kChunk], o[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    int64_t len = std::min(kChunk, n - start);
    for (int64_t i = 0; i < len; ++i) g[i] = static_cast<float>(gate[start + i]);
    for (int64_t i = 0; i < len; ++i) u[i] = static_cast<float>(up[start + i]);
    swiglu_row_f32(g, u, o, len);
    for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<scalar_t>(o[i]);
  }
}

template <typename scalar_t>
void swiglu_backward_row(const scalar_t* grad, const scalar_t* gate, const scalar_t* up,
                         scalar_t* dgate, scalar_t* dup, int64_t n) {
  float gr[kChunk], g[kChunk], u[kChunk], dg[kChunk], du[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    int64_t len = std::min(kChunk, n - start);
    for (int64_t i = 0; i < len; ++i) gr[i] = static_cast<float>(grad[start + i]);
    for (int64_t i = 0; i < len; ++i) g[i] = static_cast<float>(gate[start + i]);
    for (int64_t i = 0; i < len; ++i) u[i] = static_cast<float>(up[start + i]);
    swiglu_backward_row_f32(gr, g, u, dg, du, len);
    for (int64_t i = 0; i < len; ++i) dgate[start + i] = static_cast<scalar_t>(dg[i]);
    for (int64_t i = 0; i < len; ++i) dup[start + i] = static_cast<scalar_t>(du[i]);
  }
}

// Rows per parallel task: enough work per task to amortize scheduling (~16k elements).
int64_t row_grain(int64_t ffn_size) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, ffn_size));
}

at::Tensor swiglu_cpu(const at::Tensor& gate_up_in) {
  // validate
  check_swiglu_input("smoe_ops.swiglu", gate_up_in, Placement::cpu());

  // allocate
  auto gate_up = gate_up_in.contiguous();
  const int64_t rows = gate_up.size(0), ffn = gate_up.size(1) / 2;
  auto out = at::empty({rows, ffn}, gate_up.options());
  if (out.numel() == 0) return out;

  // launch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(ffn), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        swiglu_row(in + r * 2 * ffn, in + r * 2 * ffn + ffn, o + r * ffn, ffn);
      }
    });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& gate_up_in) {
  // validate
  const char* op = "smoe_ops.swiglu_backward";
  check_swiglu_input(op, gate_up_in, Placement::cpu());
  check_swiglu_grad_out(op, grad_out_in, gate_up_in, Placement::cpu());

  // allocate
  auto gate_up = gate_up_in.contiguous();
  auto grad_out = grad_out_in.contiguous();
  const int64_t rows = gate_up.size(0), ffn = gate_up.size(1) / 2;
  auto grad_in = at::empty_like(gate_up);
  if (grad_in.numel() == 0) return grad_in;

  // launch
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu_backward", [&] {
        const scalar_t* in = gate_up.data_ptr<scalar_t>();
        const scalar_t* g = grad_out.data_ptr<scalar_t>();
        scalar_t* d = grad_in.data_ptr<scalar_t>();
        at::parallel_for(0, rows, row_grain(ffn), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = in + r * 2 * ffn;
            scalar_t* drow = d + r * 2 * ffn;
            swiglu_backward_row(g + r * ffn, row, row + ffn, drow, drow + ffn, ffn);
          }
        });
      });
  return grad_in;
}

}  // namespace
}  // namespace smoe

TORCH_LIBRARY_IMPL(smoe_ops, CPU, m) {
  m.impl("swiglu", &smoe::swiglu_cpu);
  m.impl("swiglu_backward", &smoe::swiglu_backward_cpu);
}
