// Device helpers shared by the kernel files: element types and their float conversions, warp
// reductions, the dtype switch, and the trap that reports bad input found on the device.
// Plain CUDA: no ATen header (see kernels.h).
#pragma once

#ifdef SMOE_CUDA_EMULATE
#include "cuda/emulator/cuda_emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <type_traits>

#include "cuda/kernels.h"

// Tensor-core code (mma.sync, sm_80+) is compiled in: for such an architecture, or emulated.
#if defined(SMOE_CUDA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define SMOE_HAS_MMA 1
#else
#define SMOE_HAS_MMA 0
#endif

namespace smoe {
namespace cuda {

// Accumulation type: float64 stays float64, everything else computes in float32.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return v;
  }
}

// Rounds once, to nearest even (as torch's own casts do).
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return v;
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Max that skips NaN (fmax semantics), as the CPU kernels' `x > m ? x : m` does.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Softmax statistics of one row x[0:E] read by a whole warp (lane = thread % 32): the
// row max m (NaN skipped) and sum_e exp(x_e - m), both in every lane.
template <typename T, typename A = acc_t<T>>
__device__ __forceinline__ void warp_softmax_stats(const T* x, int64_t E, int lane, A& m,
                                                   A& sum) {
  m = neg_inf<A>();
  for (int64_t e = lane; e < E; e += 32) m = fmax(m, to_acc(x[e]));
  m = warp_max(m);
  sum = 0;
  for (int64_t e = lane; e < E; e += 32) sum += exp_acc(to_acc(x[e]) - m);
  sum = warp_sum(sum);
}

// Calls f(T{}) with T the element type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat64:
      return f(double{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Blocks of `kernel` (`threads` threads, no dynamic shared memory) that the current device
// holds at once: multiprocessors times the kernel's occupancy, which counts its registers and
// static shared memory, not only the thread limit (on sm_90 the bf16 route warp kernel with 8
// slots, 62 registers, fits 4 blocks of 256 threads, not 8; sm_86 / sm_89 hold 1536 threads,
// not 2048). A larger grid would run as a partial second wave. 0 when the runtime cannot say.
template <typename Kernel>
int64_t ask_resident_blocks(Kernel kernel, int threads) {
  int device = 0, multiprocessors = 0, per_multiprocessor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, threads, 0) !=
          cudaSuccess) {
    cudaGetLastError();  // clear the query's error: the caller then launches a block per item
    return 0;
  }
  return int64_t{multiprocessors} * per_multiprocessor;
}

// ask() (an answer >= 0) for the current device, asked once per device and remembered, off
// the launch path; each Ask type (each lambda) has its own memory. The emulator asks every
// time, as its tests change what it emulates.
template <typename Ask>
int64_t once_per_device(Ask ask) {
#ifdef SMOE_CUDA_EMULATE
  return ask();
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> known[kMaxDevices] = {};  // the answer + 1; 0: not asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return ask();
  }
  if (known[device].load(std::memory_order_relaxed) == 0) {
    known[device].store(ask() + 1, std::memory_order_relaxed);
  }
  return known[device].load(std::memory_order_relaxed) - 1;
#endif
}

// ask_resident_blocks for Kernel, once per device: the grid of a kernel whose blocks loop
// over their rows, so that per-block state (route's counts in shared memory) is flushed once
// per resident block, not once per row. Kernel must always be launched with `threads`.
template <auto Kernel>
int64_t resident_blocks(int threads) {
  return once_per_device([threads] { return ask_resident_blocks(Kernel, threads); });
}

// A `bytes`-wide access at p must be `bytes`-aligned: on a GPU a misaligned vector access
// faults (misaligned address). The emulator checks it and fails the launch, so that a vector
// path taken for a misaligned view shows in the tests; the device build compiles it away.
__device__ __forceinline__ void expect_aligned(const void* p, size_t bytes) {
#ifdef SMOE_CUDA_EMULATE
  emu::check_aligned(p, bytes);
#else
  (void)p;
  (void)bytes;
#endif
}

// Whether the code running was compiled with tensor cores (SMOE_HAS_MMA) for this device; the
// emulator answers for the architecture it emulates (SMOE_CUDA_EMULATOR_ARCH).
__device__ __forceinline__ bool has_mma() {
#ifdef SMOE_CUDA_EMULATE
  return emu::ptx_version() >= 80;
#else
  return SMOE_HAS_MMA;
#endif
}

// ---- sm_80 data movement: cp.async into shared memory, ldmatrix out of it ------------------
// Only for SMOE_HAS_MMA code (elsewhere they compile to nothing and must not be called).

// 16 bytes global -> shared, asynchronous; zeros when !valid (global is then not read).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
#if defined(SMOE_CUDA_EMULATE)
  emu::cp_async_16(shared, global, valid);
#elif SMOE_HAS_MMA
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SMOE_CUDA_EMULATE)
  emu::cp_async_commit();
#elif SMOE_HAS_MMA
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SMOE_CUDA_EMULATE)
  emu::cp_async_wait(kPending);
#elif SMOE_HAS_MMA
  // "memory": no shared-memory access moves across the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8 x 8 b16 matrices from shared memory; this lane names row lane % 8 of matrix lane / 8.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(SMOE_CUDA_EMULATE)
  emu::ldmatrix_x4(kTrans, r, row);
#elif SMOE_HAS_MMA
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  }
#endif
}

// Bad input that only the device can see (it would take a host sync to read it back): print
// what was wrong and stop the kernel. As with torch's own device-side index checks, the CUDA
// context is then unusable and the next CUDA call raises; the printed line names the op, the
// argument, the value and the expected range. (Emulated: the launch fails with that text.)
#ifdef SMOE_CUDA_EMULATE
#define SMOE_DEVICE_CHECK(cond, ...)             \
  do {                                           \
    if (!(cond)) ::smoe::emu::trap(__VA_ARGS__); \
  } while (0)
#else
#define SMOE_DEVICE_CHECK(cond, ...) \
  do {                               \
    if (!(cond)) {                   \
      printf(__VA_ARGS__);           \
      __trap();                      \
    }                                \
  } while (0)
#endif

// SMOE_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) is
// kernel<<<grid, block, shared_bytes, stream>>>(args...); the emulator (cuda_emulator.h)
// runs the same source on the host.
#ifdef SMOE_CUDA_EMULATE
#define SMOE_LAUNCH(grid, block, shared, stream, ...) \
  SMOE_EMULATED_LAUNCH(grid, block, shared, stream, __VA_ARGS__)
#else
#define SMOE_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#endif


}  // namespace cuda
}  // namespace smoe
