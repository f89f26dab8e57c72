// A CUDA emulator for the kernel files: the part of the CUDA language and runtime that
// csrc/cuda/*.cu use, implemented on the host, so that the kernels' own source runs (and is
// tested) on a machine without a GPU. Built only with -DSMOE_CUDA_EMULATE (see
// tests/cuda_emulator.py); the real build never includes this file.
//
// Model (what holds, and what an emulated run can and cannot show):
//   - A launch runs its blocks one after another. Each CUDA thread of a block is a fiber (its
//     own 256 KiB stack over a guard page: an overflow faults) on the calling OS thread; a
//     fiber runs until it reaches a synchronization point (__syncthreads, a warp collective,
//     exit), and the scheduler then picks the next
//     ready fiber: mostly by a random ranking of the warps (so one warp runs as far ahead of
//     the others as the barriers allow), sometimes uniformly; seeded by
//     SMOE_CUDA_EMULATOR_SEED (default 1). A missing __syncthreads or __syncwarp therefore
//     shows up as a wrong result for some seeds.
//   - __syncthreads releases when every live thread of the block has arrived (exited threads
//     count as arrived, as on sm_70+). Warp collectives (__shfl_xor_sync, __match_any_sync,
//     __syncwarp, mma.sync) release when every lane named in the mask has arrived at a
//     collective of the same kind and mask; a lane that is left out of its own mask, a mask
//     that names an exited lane, lanes meeting in different collectives with one mask, a
//     shuffle reading a lane outside the mask, and a deadlock all fail the launch with a
//     message.
//   - mma.sync.m16n8k16 (bf16 / f16 inputs, f32 accumulators) is computed from the fragment
//     layout of the PTX ISA, independently of the kernel's own fragment code.
//   - A failed device check (SMOE_DEVICE_CHECK) stops the launch; the launcher's
//     cudaGetLastError() returns cudaErrorLaunchFailure and smoe::emu::last_error_message()
//     holds the printed text. (On a GPU the error surfaces at the next synchronizing call.)
//   - __shared__ arrays are function statics: one block at a time uses them. Atomics are
//     plain read-modify-writes (one OS thread runs all fibers).
//   - Not modelled: memory ordering between blocks, timing, alignment faults (but for
//     expect_aligned, ldmatrix and cp.async, which check their addresses), bank conflicts,
//     resource limits other than the launch configuration; shared memory is not refilled
//     with garbage between blocks (a read of never-written shared memory goes unseen); the
//     device's own math (nvcc contracts a * b + c into fma, and CUDA's expf / logf may differ
//     from the host's by an ulp or two: keys that nearly tie can order differently on a GPU).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

// ---- language keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- runtime types ----------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

// binaryVersion: the architecture of the machine code the emulated device runs, 10 * major +
// minor: SMOE_CUDA_EMULATOR_ARCH (default 90). ptxVersion: the virtual architecture that code
// was compiled from (__CUDA_ARCH__ / 10): SMOE_CUDA_EMULATOR_PTX, default the same; lower
// when the driver compiled an older build's PTX for the device (TORCH_CUDA_ARCH_LIST="7.5+PTX"
// on an H100: 90 and 75). So launchers' architecture choices are tested.
struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* func);

// One device (0) with SMOE_CUDA_EMULATOR_SMS multiprocessors (default 2, so that grids sized
// by the device, as route's, are small and each block loops over several work items).
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
// Blocks of block_size threads per multiprocessor: the thread limit, 2048 / block_size (the
// emulator models no registers); block_size must be in [1, 1024], as on a device.
cudaError_t emulated_occupancy(int* blocks, int block_size, size_t dynamic_shared_bytes);
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel kernel,
                                                          int block_size,
                                                          size_t dynamic_shared_bytes) {
  (void)kernel;
  return emulated_occupancy(blocks, block_size, dynamic_shared_bytes);
}

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream);

// ---- 16-bit float types: storage only, converted with rounding to nearest even ---------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "16-bit storage");

inline float __bfloat162float(__nv_bfloat16 v) {
  return static_cast<float>(c10::BFloat16(v.bits, c10::BFloat16::from_bits()));
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {c10::BFloat16(v).x}; }
inline float __half2float(__half v) {
  return static_cast<float>(c10::Half(v.bits, c10::Half::from_bits()));
}
inline __half __float2half_rn(float v) { return {c10::Half(v).x}; }

// ---- math the kernels call unqualified ----------------------------------------------------
using std::exp;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::log;

namespace smoe {
namespace emu {

struct ThreadIndex {
  dim3 thread, block, block_dim, grid_dim;
};

// The running fiber's indices (valid only inside a kernel).
const ThreadIndex& self();

// The emulated device's architecture, as cudaFuncAttributes::binaryVersion gives it, and the
// virtual architecture its code was compiled for (ptxVersion; what __CUDA_ARCH__ was).
int binary_version();
int ptx_version();

// Kinds of warp collective; the payload of each lane is up to kMaxWords 32-bit words.
enum class Collective : int {
  kSyncWarp,
  kShuffleXor,
  kMatchAny,
  kMmaBf16,
  kMmaF16,
  kLdMatrix,
  kLdMatrixTrans
};
constexpr int kMaxWords = 12;
// Blocks until the lanes in `mask` meet; returns this lane's result words in `out`.
void warp_collective(Collective kind, unsigned mask, const uint32_t* in, uint32_t* out);

void syncthreads();

// Stops the launch with the formatted message (a failed SMOE_DEVICE_CHECK). Never returns.
[[noreturn]] void trap(const char* format, ...) __attribute__((format(printf, 1, 2)));

// The text of the last failed launch (trap or emulator error), kept until the next failure.
std::string last_error_message();

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs body once per thread of every block of the grid (see the model above).
void run_grid(const LaunchConfig& config, const char* kernel_name,
              const std::function<void()>& body);

template <typename Kernel>
struct Launcher {
  LaunchConfig config;
  Kernel kernel;
  const char* name;
  template <typename... Args>
  void operator()(const Args&... args) const {
    // Each thread gets its own copies of the parameters, as a kernel launch does.
    run_grid(config, name, [&]() { kernel(args...); });
  }
};

template <typename Kernel>
Launcher<Kernel> launcher(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                          Kernel kernel, const char* name) {
  return {{grid, block, shared_bytes, stream}, kernel, name};
}

template <typename T>
T shuffle_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a word");
  uint32_t in[kMaxWords] = {}, out[kMaxWords] = {};
  std::memcpy(in, &value, sizeof(T));
  in[2] = static_cast<uint32_t>(lane_mask);
  in[3] = sizeof(T);
  warp_collective(Collective::kShuffleXor, mask, in, out);
  T result;
  std::memcpy(&result, out, sizeof(T));
  return result;
}

template <typename T>
unsigned match_any(unsigned mask, T value) {
  static_assert(sizeof(T) <= 8 && std::is_integral_v<T>, "match of an integer");
  uint32_t in[kMaxWords] = {}, out[kMaxWords] = {};
  const int64_t wide = static_cast<int64_t>(value);
  std::memcpy(in, &wide, sizeof(wide));
  warp_collective(Collective::kMatchAny, mask, in, out);
  return out[0];
}

// d += a @ b for one m16n8k16 tile, fragments in the PTX ISA layout (bf16 or f16 inputs).
void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l names row l % 8 of matrix l / 8
// (16 bytes, 16-byte aligned); register i of lane l gets matrix i's elements (l / 4,
// 2 (l % 4) + {0, 1}), or with trans (2 (l % 4) + {0, 1}, l / 4).
void ldmatrix_x4(bool trans, uint32_t (&r)[4], const void* row);

// cp.async.cg.shared.global of 16 bytes (zeros when !valid), deferred: the destination holds
// NaN from the issue until the thread's cp.async.wait_group lets its group complete, so both
// a read before the wait and an overwrite while other threads still read show up. Both
// addresses must be 16-byte aligned.
void cp_async_16(void* shared, const void* global, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Fails the launch unless p is a multiple of `bytes` (a vector access of that width).
void check_aligned(const void* p, size_t bytes);

}  // namespace emu
}  // namespace smoe

#define threadIdx (::smoe::emu::self().thread)
#define blockIdx (::smoe::emu::self().block)
#define blockDim (::smoe::emu::self().block_dim)
#define gridDim (::smoe::emu::self().grid_dim)

inline void __syncthreads() { ::smoe::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  uint32_t in[::smoe::emu::kMaxWords] = {}, out[::smoe::emu::kMaxWords] = {};
  ::smoe::emu::warp_collective(::smoe::emu::Collective::kSyncWarp, mask, in, out);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return ::smoe::emu::shuffle_xor(mask, value, lane_mask);
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  return ::smoe::emu::match_any(mask, value);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

// One OS thread runs every fiber and a fiber is never preempted: plain updates are atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}

// kernel<<<grid, block, shared, stream>>>(args) in the kernel files is written
// SMOE_LAUNCH(grid, block, shared, stream, kernel)(args); see device_utils.cuh.
#define SMOE_EMULATED_LAUNCH(grid, block, shared, stream, ...) \
  ::smoe::emu::launcher(dim3(grid), dim3(block), shared, stream, __VA_ARGS__, #__VA_ARGS__)
