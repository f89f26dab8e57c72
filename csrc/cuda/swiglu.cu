// swiglu: the gated activation of SwiGLU expert FFNs, forward and backward.
//
//   gate_up:  [rows, 2I] float32 | float64 | bfloat16 | float16, contiguous
//   out:      [rows, I] same dtype,  out[n, i] = silu(g) * u,  g = gate_up[n, i],
//             u = gate_up[n, I + i],  silu(g) = g * sigmoid(g)
//   backward, s = sigmoid(g):  d g = grad * u * s * (1 + g (1 - s)),  d u = grad * g * s
// Math in float32 (float64 for float64), rounded once on the store.
//
// Threads: a grid-stride loop over the rows * I outputs, one element per thread step;
// consecutive threads take consecutive i, so loads of gate, up and grad and the stores are
// coalesced. Elementwise and memory-bound.
// Reference: smoe_ops.reference.swiglu; CPU twin: csrc/cpu/swiglu.cpp.
#include "cuda/device_utils.cuh"

namespace smoe {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void swiglu_kernel(const T* __restrict__ gate_up, int64_t total, int64_t ffn,
                              T* __restrict__ out) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / ffn, i = idx - row * ffn;
    const T* in = gate_up + row * 2 * ffn;
    const A g = to_acc(in[i]), u = to_acc(in[ffn + i]);
    out[idx] = from_acc<T>(g / (A(1) + exp_acc(-g)) * u);
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad_out,
                                       const T* __restrict__ gate_up, int64_t total,
                                       int64_t ffn, T* __restrict__ grad_in) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / ffn, i = idx - row * ffn;
    const T* in = gate_up + row * 2 * ffn;
    T* d = grad_in + row * 2 * ffn;
    const A g = to_acc(in[i]), u = to_acc(in[ffn + i]), grad = to_acc(grad_out[idx]);
    const A s = A(1) / (A(1) + exp_acc(-g));
    d[i] = from_acc<T>(grad * u * s * (A(1) + g * (A(1) - s)));
    d[ffn + i] = from_acc<T>(grad * g * s);
  }
}

int grid_for(int64_t total) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  return static_cast<int>(ceil_div(total, kThreads) < 65536 ? ceil_div(total, kThreads) : 65536);
}

}  // namespace

cudaError_t swiglu(DType dtype, const void* gate_up, int64_t rows, int64_t ffn, void* out,
                   cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t total = rows * ffn;
    SMOE_LAUNCH(grid_for(total), kThreads, 0, stream, swiglu_kernel<T>)(
        static_cast<const T*>(gate_up), total, ffn, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t swiglu_backward(DType dtype, const void* grad_out, const void* gate_up, int64_t rows,
                            int64_t ffn, void* grad_in, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t total = rows * ffn;
    SMOE_LAUNCH(grid_for(total), kThreads, 0, stream, swiglu_backward_kernel<T>)(
        static_cast<const T*>(grad_out), static_cast<const T*>(gate_up), total, ffn,
        static_cast<T*>(grad_in));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace smoe
