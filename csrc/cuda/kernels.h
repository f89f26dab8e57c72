// Host launchers of the CUDA kernels (csrc/cuda/*.cu), callable from the torch glue
// (csrc/cuda/*.cpp). This header and the .cu files include no ATen or torch header, so that
// nvcc compiles each kernel file in seconds; the glue owns every torch type.
//
// Every launcher enqueues its kernels on `stream`, never synchronizes the host, and returns
// the launch status (cudaGetLastError), which the glue checks. Pointers are device pointers
// to contiguous tensors; `DType` names the element type of the float tensors. The caller
// guarantees sizes > 0 wherever a launcher documents it (a grid of 0 blocks is an error).
#pragma once

#ifdef SMOE_CUDA_EMULATE
#include "cuda/emulator/cuda_emulator.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace smoe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// ---- routing (routing.cu) -------------------------------------------------------------------
// logits [T, E] (dtype), bias [E] in the weight type or null, weights [T, k] float32 (float64
// for float64 logits), ids [T, k] int32, counts [E] int32 zeroed by the caller. group_scores:
// a [T, num_groups] workspace in the weight type when num_groups > 1, else null. T > 0.
cudaError_t route(DType dtype, const void* logits, const void* bias, int64_t T, int64_t E,
                  int64_t k, bool sigmoid, bool renormalize, int64_t num_groups,
                  int64_t topk_groups, double scale, void* group_scores, void* weights,
                  int32_t* ids, int32_t* counts, cudaStream_t stream);

// grad_weights [T, k] weight type, ids [T, k], grad [T, E] (dtype). T > 0.
cudaError_t route_backward(DType dtype, const void* grad_weights, const void* logits,
                           const int32_t* ids, int64_t T, int64_t E, int64_t k, bool sigmoid,
                           bool renormalize, double scale, void* grad, cudaStream_t stream);

// Workspace bytes router_losses needs for T rows of E experts.
int64_t router_losses_workspace_bytes(int64_t T, int64_t E);
// losses [4], mean_probs [E] in the weight type; T may be 0.
cudaError_t router_losses(DType dtype, const void* logits, const int32_t* counts, int64_t T,
                          int64_t E, int64_t k, void* workspace, void* losses, void* mean_probs,
                          cudaStream_t stream);
// grad_losses [4], mean_probs [E] weight type; a workspace of E weight-type values. T > 0.
cudaError_t router_losses_backward(DType dtype, const void* grad_losses, const void* logits,
                                   const int32_t* counts, int64_t T, int64_t E, int64_t k,
                                   const void* mean_probs, void* workspace, void* grad,
                                   cudaStream_t stream);

// ---- dispatch (dispatch.cu) -----------------------------------------------------------------
// Workspace int32 entries dispatch needs for N slots and E experts.
int64_t dispatch_workspace_elems(int64_t N, int64_t E);
// ids [N] int32 or int64 (ids_int64), N > 0; order [N], inverse [N] int32, offsets [E + 1]
// int64. topk only names slots in error messages.
cudaError_t dispatch(const void* ids, bool ids_int64, int64_t N, int64_t topk, int64_t E,
                     int32_t* workspace, int32_t* order, int64_t* offsets, int32_t* inverse,
                     cudaStream_t stream);
// The ops that write every row of their output once, and so need inverse to be a permutation.
enum class RowWriter : int { kPermute = 0, kUnpermuteBackward = 1 };
// Checks that inverse [N] is a permutation of [0, N) (a device trap naming the op and the
// slot if not); seen is an [N] int32 workspace. N > 0.
cudaError_t check_permutation(RowWriter writer, const int32_t* inverse, int64_t N, int64_t topk,
                              int32_t* seen, cudaStream_t stream);
// x [T, H] -> xs [N, H], N = T * topk; T, H > 0.
cudaError_t permute(DType dtype, const void* x, const int32_t* inverse, int64_t T, int64_t topk,
                    int64_t H, void* xs, cudaStream_t stream);
// ys [N, H], weights [T, topk] in the accumulation type or null -> y [T, H]; T, H, topk > 0.
cudaError_t unpermute(DType dtype, const void* ys, const int32_t* inverse, const void* weights,
                      int64_t T, int64_t topk, int64_t H, int64_t N, void* y,
                      cudaStream_t stream);
// grad_ys [N, H]; grad_weights [T, topk] in the accumulation type, or null when not wanted.
cudaError_t unpermute_backward(DType dtype, const void* grad_y, const void* ys,
                               const int32_t* inverse, const void* weights, int64_t T,
                               int64_t topk, int64_t H, void* grad_ys, void* grad_weights,
                               cudaStream_t stream);

// ---- grouped_mm (grouped_mm.cu) -------------------------------------------------------------
// Workspace int32 entries grouped_mm needs for E experts.
int64_t grouped_mm_workspace_elems(int64_t E);
// The most output columns of one product: its column tiles (64 wide) are gridDim.y.
constexpr int64_t kGroupedMmMaxCols = 65535LL * 64;
// out[N, M] rows of expert e = a[rows] @ b[e] (+ bias[e]); a [N, K] row-major; b element
// (e, k, m) at b + e * b_se + k * b_sk + m * b_sm (any strides); bias [E, M] or null.
// offsets [E + 1] int64 on the device, checked there (a trap naming the entry if invalid).
// N, M, E > 0 (K may be 0: the product is then zeros); M <= kGroupedMmMaxCols.
cudaError_t grouped_mm(DType dtype, const void* a, const void* b, int64_t b_se, int64_t b_sk,
                       int64_t b_sm, const void* bias, const int64_t* offsets, int64_t N,
                       int64_t K, int64_t M, int64_t E, int32_t* workspace, void* out,
                       cudaStream_t stream);
// The offsets check (and row-tile prefix into workspace) that grouped_mm runs first, alone.
cudaError_t grouped_mm_check_offsets(const int64_t* offsets, int64_t N, int64_t E,
                                     int32_t* workspace, cudaStream_t stream);
// grad_w[e] = x[rows]^T @ grad_out[rows], [E, K, M]; zeros for an expert with no rows.
cudaError_t grouped_mm_grad_w(DType dtype, const void* x, const void* grad_out,
                              const int64_t* offsets, int64_t N, int64_t K, int64_t M, int64_t E,
                              void* grad_w, cudaStream_t stream);
// grad_bias[e] = column sums of grad_out[rows], [E, M].
cudaError_t grouped_mm_grad_bias(DType dtype, const void* grad_out, const int64_t* offsets,
                                 int64_t N, int64_t M, int64_t E, void* grad_bias,
                                 cudaStream_t stream);

// ---- swiglu (swiglu.cu) ---------------------------------------------------------------------
// gate_up [rows, 2I] -> out [rows, I]; rows * I > 0.
cudaError_t swiglu(DType dtype, const void* gate_up, int64_t rows, int64_t ffn, void* out,
                   cudaStream_t stream);
cudaError_t swiglu_backward(DType dtype, const void* grad_out, const void* gate_up, int64_t rows,
                            int64_t ffn, void* grad_in, cudaStream_t stream);

}  // namespace cuda
}  // namespace smoe
