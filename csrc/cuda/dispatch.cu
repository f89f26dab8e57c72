// Token dispatch on the device: dispatch (a stable counting sort of the N = T * k slots by
// expert), permute, unpermute and unpermute's backward.
//
//   ids [T, k] int32 | int64 (contiguous), values in [0, E); slot s = t * k + j.
//   order [N] int32 (sorted row -> slot, stable: slots of one expert ascend), offsets [E + 1]
//   int64 (exclusive prefix sum of the expert counts), inverse [T, k] int32 (slot -> row).
//   permute:            xs[inverse[t, j]] = x[t]                          x [T, H] -> [N, H]
//   unpermute:          y[t] = sum_j w[t, j] ys[inverse[t, j]] (w = 1 if none)  [N, H] -> [T, H]
//   unpermute_backward: grad_ys[inverse[t, j]] = w[t, j] grad_y[t],
//                       grad_w[t, j] = dot(grad_y[t], ys[inverse[t, j]])
// Rows are float32 | float64 | bfloat16 | float16; sums in float32 (float64 for float64),
// rounded once; weights and grad_w in that accumulation type (the glue casts).
//
// Threads, dispatch (three kernels, no host sync; offsets never leave the device):
//   count:   a warp per chunk of S consecutive slots (S a multiple of 32), 32 slots per step;
//            __match_any_sync groups the lanes holding the same expert and the group's lowest
//            lane adds the group size to hist[chunk, expert]. Only one warp owns a chunk's row,
//            so plain stores suffice; __syncwarp orders the steps.
//   scan:    one block: exclusive prefix sum of hist in (expert, chunk) order, in 1024-entry
//            tiles with a carry; hist[chunk, e] becomes the first row of chunk's slots of e,
//            offsets[e] the first row of expert e, offsets[E] = N.
//   scatter: the count walk again; a lane's row is its chunk's next row for its expert plus
//            the number of lower lanes with the same expert: slots of one expert keep their
//            order, the sort is stable, and the result equals the CPU kernel's exactly.
//   An id outside [0, E) stops the count kernel with a message naming the slot (a device-side
//   check, see SMOE_DEVICE_CHECK), as reading it back would sync the host.
// Threads, rows: a 128-thread block per slot (permute, unpermute_backward) or per token
//   (unpermute); threads stride over the row in 16-byte packs when the row and pointers are
//   16-byte aligned (8 bfloat16 / float16, 4 float32, 2 float64 per pack), else one element.
//   The kernels that write rows first check that inverse is a permutation of [0, N) (a thread
//   per slot claims its row with atomicExch): otherwise rows would be left unwritten.
// Reference: smoe_ops.reference.dispatch / permute / unpermute; CPU twin: csrc/cpu/dispatch.cpp.
#include "cuda/device_utils.cuh"

namespace smoe {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMinChunkSlots = 1024;
constexpr int64_t kMaxHistEntries = int64_t(1) << 24;  // 64 MB of int32 workspace at most
constexpr int kScanThreads = 1024;
constexpr int kRowThreads = 128;

// Slots per chunk: a multiple of 32, at least kMinChunkSlots, and few enough chunks that the
// [chunks, E] histogram stays under kMaxHistEntries.
int64_t chunk_slots(int64_t N, int64_t E) {
  int64_t slots = ceil_div(N * E, kMaxHistEntries);
  slots = slots > kMinChunkSlots ? slots : kMinChunkSlots;
  return ceil_div(slots, kWarp) * kWarp;
}

template <typename id_t, bool kScatter>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    count_or_scatter_kernel(const id_t* ids, int64_t N, int64_t topk, int64_t E,
                            int64_t chunk_size, int64_t chunks, int32_t* hist, int32_t* order,
                            int32_t* inverse) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (c >= chunks) return;
  int32_t* next = hist + c * E;
  const int64_t begin = c * chunk_size;
  const int64_t end = begin + chunk_size < N ? begin + chunk_size : N;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t s = base + lane;
    int expert = -1;
    if (s < end) {
      const int64_t e = static_cast<int64_t>(ids[s]);
      if (!kScatter) {
        SMOE_DEVICE_CHECK(e >= 0 && e < E,
                          "smoe_ops.dispatch: ids[%lld, %lld] = %lld is out of range, expected "
                          "values in [0, num_experts) with num_experts = %lld\n",
                          (long long)(s / topk), (long long)(s % topk), (long long)e,
                          (long long)E);
      }
      expert = static_cast<int>(e);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, expert);
    const bool leader = lane == __ffs(peers) - 1;
    if (expert >= 0) {
      const int32_t first = next[expert];
      if (kScatter) {
        const int32_t row = first + __popc(peers & lower_lanes);
        order[row] = static_cast<int32_t>(s);
        inverse[s] = row;
      }
      __syncwarp(peers);
      if (leader) next[expert] = first + __popc(peers);
    }
    __syncwarp();
  }
}

// Exclusive scan of hist in (expert, chunk) order; hist is stored [chunks, E].
// TODO: store hist [E, chunks] (the count and scatter kernels index it either way) and scan
// several entries per thread, if gpu_check.sh shows dispatch at large T * E slow: the scan
// reads with a stride of E entries, one block walks every 1024-entry tile in sequence (256 of
// them at T = 65536, k = 8, E = 512).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int32_t* hist, int64_t chunks, int64_t E, int64_t* offsets) {
  __shared__ int32_t buf[2][kScanThreads];
  const int64_t total = chunks * E;
  int64_t carry = 0;
  for (int64_t tile = 0; tile < total; tile += kScanThreads) {
    const int64_t i = tile + threadIdx.x;
    const int64_t e = i / chunks, c = i % chunks;
    const int32_t v = i < total ? hist[c * E + e] : 0;
    int in = 0;
    buf[in][threadIdx.x] = v;
    __syncthreads();
    for (int stride = 1; stride < kScanThreads; stride <<= 1) {
      const int32_t add = threadIdx.x >= stride ? buf[in][threadIdx.x - stride] : 0;
      buf[1 - in][threadIdx.x] = buf[in][threadIdx.x] + add;
      in = 1 - in;
      __syncthreads();
    }
    const int64_t exclusive = carry + buf[in][threadIdx.x] - v;
    if (i < total) {
      hist[c * E + e] = static_cast<int32_t>(exclusive);
      if (c == 0) offsets[e] = exclusive;
    }
    carry += buf[in][kScanThreads - 1];
    __syncthreads();  // buf is rewritten by the next tile
  }
  if (threadIdx.x == 0) offsets[E] = carry;
}

// The op is passed as a code: printf on the device needs its strings in device memory.
__global__ void check_permutation_kernel(int writer, const int32_t* inverse, int64_t N,
                                         int64_t topk, int32_t* seen) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= N) return;
  const char* op = writer == static_cast<int>(RowWriter::kPermute)
                       ? "smoe_ops.permute"
                       : "smoe_ops.unpermute_backward";
  const int32_t r = inverse[s];
  SMOE_DEVICE_CHECK(r >= 0 && r < N,
                    "%s: inverse[%lld, %lld] = %d is out of range, expected a row in [0, %lld) "
                    "(inverse must come from smoe_ops.dispatch)\n",
                    op, (long long)(s / topk), (long long)(s % topk), r, (long long)N);
  const int32_t other = atomicExch(seen + r, static_cast<int32_t>(s + 1)) - 1;
  SMOE_DEVICE_CHECK(other < 0,
                    "%s: inverse[%lld, %lld] = %d repeats inverse[%lld, %lld], expected a "
                    "permutation of [0, %lld) (from smoe_ops.dispatch)\n",
                    op, (long long)(s / topk), (long long)(s % topk), r,
                    (long long)(other / topk), (long long)(other % topk), (long long)N);
}

// V elements moved as one 16-byte (or one-element) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* row, int64_t p) {
  expect_aligned(row + p * V, sizeof(Pack<T, V>));
  return reinterpret_cast<const Pack<T, V>*>(row)[p];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* row, int64_t p, const Pack<T, V>& pack) {
  expect_aligned(row + p * V, sizeof(Pack<T, V>));
  reinterpret_cast<Pack<T, V>*>(row)[p] = pack;
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    permute_kernel(const T* x, const int32_t* inverse, int64_t topk, int64_t H, T* xs) {
  const int64_t s = blockIdx.x;
  const T* src = x + (s / topk) * H;
  T* dst = xs + int64_t(inverse[s]) * H;
  for (int64_t p = threadIdx.x; p < H / V; p += kRowThreads) {
    store_pack<T, V>(dst, p, load_pack<T, V>(src, p));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_kernel(const T* ys, const int32_t* inverse, const acc_t<T>* weights, int64_t topk,
                     int64_t H, int64_t N, T* y) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int32_t* rows = inverse + t * topk;
  if (threadIdx.x == 0) {
    for (int64_t j = 0; j < topk; ++j) {
      SMOE_DEVICE_CHECK(rows[j] >= 0 && rows[j] < N,
                        "smoe_ops.unpermute: inverse[%lld, %lld] = %d is out of range, expected "
                        "a row in [0, %lld) (inverse must come from smoe_ops.dispatch)\n",
                        (long long)t, (long long)j, rows[j], (long long)N);
    }
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < H / V; p += kRowThreads) {
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0;
    for (int64_t j = 0; j < topk; ++j) {
      const A w = weights != nullptr ? weights[t * topk + j] : A(1);
      const Pack<T, V> in = load_pack<T, V>(ys + int64_t(rows[j]) * H, p);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * to_acc(in.v[i]);
    }
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = from_acc<T>(acc[i]);
    store_pack<T, V>(y + t * H, p, out);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_backward_kernel(const T* grad_y, const T* ys, const int32_t* inverse,
                              const acc_t<T>* weights, int64_t topk, int64_t H, T* grad_ys,
                              acc_t<T>* grad_weights) {
  using A = acc_t<T>;
  __shared__ A partial[kRowThreads];
  const int64_t s = blockIdx.x;
  const int64_t r = inverse[s];
  const A w = weights != nullptr ? weights[s] : A(1);
  const T* g = grad_y + (s / topk) * H;
  A dot = 0;
  for (int64_t p = threadIdx.x; p < H / V; p += kRowThreads) {
    const Pack<T, V> gp = load_pack<T, V>(g, p);
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = from_acc<T>(w * to_acc(gp.v[i]));
    store_pack<T, V>(grad_ys + r * H, p, out);
    if (grad_weights != nullptr) {
      const Pack<T, V> yp = load_pack<T, V>(ys + r * H, p);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += to_acc(gp.v[i]) * to_acc(yp.v[i]);
    }
  }
  if (grad_weights == nullptr) return;  // uniform across the block
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kRowThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_weights[s] = partial[0];
}

// Elements per 16-byte pack when every row start is 16-byte aligned, else 1.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

template <typename T>
bool packable(int64_t H, std::initializer_list<const void*> pointers) {
  if ((H * int64_t(sizeof(T))) % 16 != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

}  // namespace

int64_t dispatch_workspace_elems(int64_t N, int64_t E) {
  return ceil_div(N, chunk_slots(N, E)) * E;
}

cudaError_t dispatch(const void* ids, bool ids_int64, int64_t N, int64_t topk, int64_t E,
                     int32_t* workspace, int32_t* order, int64_t* offsets, int32_t* inverse,
                     cudaStream_t stream) {
  const int64_t chunk_size = chunk_slots(N, E), chunks = ceil_div(N, chunk_size);
  cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(int32_t) * chunks * E, stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(chunks, kWarpsPerBlock));
  const int threads = kWarp * kWarpsPerBlock;
  auto walk = [&](auto scatter) {
    constexpr bool kScatter = decltype(scatter)::value;
    if (ids_int64) {
      SMOE_LAUNCH(blocks, threads, 0, stream, count_or_scatter_kernel<int64_t, kScatter>)(
          static_cast<const int64_t*>(ids), N, topk, E, chunk_size, chunks, workspace, order,
          inverse);
    } else {
      SMOE_LAUNCH(blocks, threads, 0, stream, count_or_scatter_kernel<int32_t, kScatter>)(
          static_cast<const int32_t*>(ids), N, topk, E, chunk_size, chunks, workspace, order,
          inverse);
    }
    return cudaGetLastError();
  };
  if ((err = walk(std::false_type{})) != cudaSuccess) return err;
  SMOE_LAUNCH(1, kScanThreads, 0, stream, scan_kernel)(workspace, chunks, E, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return walk(std::true_type{});
}

cudaError_t check_permutation(RowWriter writer, const int32_t* inverse, int64_t N,
                              int64_t topk, int32_t* seen, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(seen, 0, sizeof(int32_t) * N, stream);
  if (err != cudaSuccess) return err;
  SMOE_LAUNCH(unsigned(ceil_div(N, 256)), 256, 0, stream, check_permutation_kernel)(
      static_cast<int>(writer), inverse, N, topk, seen);
  return cudaGetLastError();
}

cudaError_t permute(DType dtype, const void* x, const int32_t* inverse, int64_t T, int64_t topk,
                    int64_t H, void* xs, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* src = static_cast<const T_*>(x);
    T_* dst = static_cast<T_*>(xs);
    const unsigned blocks = static_cast<unsigned>(T * topk);
    if (packable<T_>(H, {src, dst})) {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, permute_kernel<T_, kPack<T_>>)(src, inverse,
                                                                                 topk, H, dst);
    } else {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, permute_kernel<T_, 1>)(src, inverse, topk, H,
                                                                         dst);
    }
    return cudaGetLastError();
  });
}

cudaError_t unpermute(DType dtype, const void* ys, const int32_t* inverse, const void* weights,
                      int64_t T, int64_t topk, int64_t H, int64_t N, void* y,
                      cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    const T_* src = static_cast<const T_*>(ys);
    const A* w = static_cast<const A*>(weights);
    T_* dst = static_cast<T_*>(y);
    const unsigned blocks = static_cast<unsigned>(T);
    if (packable<T_>(H, {src, dst})) {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, unpermute_kernel<T_, kPack<T_>>)(
          src, inverse, w, topk, H, N, dst);
    } else {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, unpermute_kernel<T_, 1>)(src, inverse, w, topk,
                                                                           H, N, dst);
    }
    return cudaGetLastError();
  });
}

cudaError_t unpermute_backward(DType dtype, const void* grad_y, const void* ys,
                               const int32_t* inverse, const void* weights, int64_t T,
                               int64_t topk, int64_t H, void* grad_ys, void* grad_weights,
                               cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    const T_* g = static_cast<const T_*>(grad_y);
    const T_* src = static_cast<const T_*>(ys);
    T_* dst = static_cast<T_*>(grad_ys);
    const A* w = static_cast<const A*>(weights);
    A* gw = static_cast<A*>(grad_weights);
    const unsigned blocks = static_cast<unsigned>(T * topk);
    if (packable<T_>(H, {g, src, dst})) {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, unpermute_backward_kernel<T_, kPack<T_>>)(
          g, src, inverse, w, topk, H, dst, gw);
    } else {
      SMOE_LAUNCH(blocks, kRowThreads, 0, stream, unpermute_backward_kernel<T_, 1>)(
          g, src, inverse, w, topk, H, dst, gw);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace smoe
