// Faulty kernels that the CUDA emulator must catch, so that its tests show it can fail
// (tests/test_cuda_emulator.py): smoe_ops_emu::emulator_selftest(name) runs one and returns
// what it wrote, or raises with the emulator's message.
#include <torch/library.h>

#include "cuda/common.h"
#include "cuda/device_utils.cuh"

namespace smoe {
namespace {

// A lane waits in __syncwarp for lanes that wait in __syncthreads for it.
__global__ void deadlock_kernel(int32_t* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void mask_without_self_kernel(int32_t* out) {
  __syncwarp(threadIdx.x == 0 ? 0x2u : 0xffffffffu);
  out[threadIdx.x] = 1;
}

// Lanes 0..15 read lanes 16..31, which the mask leaves out.
__global__ void shuffle_outside_mask_kernel(int32_t* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffu, int(threadIdx.x), 16);
}

// Thread 0 publishes a value that the others read: with the barrier every thread sees it;
// without, the threads that the schedule runs first read the old value.
template <bool kBarrier>
__global__ void publish_kernel(int32_t* out) {
  __shared__ int32_t value;
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  if (threadIdx.x == 0) value = 7;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = value;
  __syncthreads();
}

__global__ void trap_kernel(int32_t* out) {
  SMOE_DEVICE_CHECK(threadIdx.x != 5, "selftest: thread %d trapped\n", int(threadIdx.x));
  out[threadIdx.x] = 1;
}

// Recursion that writes every frame, 256 frames of a little over 1 KiB: just past a fiber's
// 256 KiB stack. It must fault on the guard page; without one it writes, silently, into the
// mapping below (the next fiber's stack).
__device__ int32_t deep(int32_t depth) {
  volatile char frame[1024];
  frame[0] = char(depth);
  return depth == 0 ? frame[0] : deep(depth - 1) + frame[0];
}

__global__ void stack_overflow_kernel(int32_t* out) { out[threadIdx.x] = deep(256); }

at::Tensor emulator_selftest(c10::string_view name_view) {
  const std::string name(name_view.data(), name_view.size());
  auto out = at::zeros({64}, at::kInt);
  int32_t* p = out.mutable_data_ptr<int32_t>();
  cudaStream_t s = current_stream();
  if (name == "deadlock") {
    SMOE_LAUNCH(1, 64, 0, s, deadlock_kernel)(p);
  } else if (name == "mask_without_self") {
    SMOE_LAUNCH(1, 32, 0, s, mask_without_self_kernel)(p);
  } else if (name == "shuffle_outside_mask") {
    SMOE_LAUNCH(1, 32, 0, s, shuffle_outside_mask_kernel)(p);
  } else if (name == "publish_with_barrier") {
    SMOE_LAUNCH(1, 64, 0, s, publish_kernel<true>)(p);
  } else if (name == "publish_without_barrier") {
    SMOE_LAUNCH(1, 64, 0, s, publish_kernel<false>)(p);
  } else if (name == "trap") {
    SMOE_LAUNCH(1, 64, 0, s, trap_kernel)(p);
  } else if (name == "stack_overflow") {
    SMOE_LAUNCH(1, 32, 0, s, stack_overflow_kernel)(p);
  } else if (name == "empty_grid") {
    SMOE_LAUNCH(0, 64, 0, s, trap_kernel)(p);
  } else {
    TORCH_CHECK_VALUE(false, "emulator_selftest: unknown name '", name, "'");
  }
  SMOE_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace
}  // namespace smoe

TORCH_LIBRARY_FRAGMENT(smoe_ops_emu, m) { m.def("emulator_selftest(str name) -> Tensor"); }
TORCH_LIBRARY_IMPL(smoe_ops_emu, CompositeExplicitAutograd, m) {
  m.impl("emulator_selftest", &smoe::emulator_selftest);
}
