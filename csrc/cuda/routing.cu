// routing: route (scores, group-limited top-k, renormalize, scale), its backward, and
// router_losses with its backward.
//
// Shapes and dtypes (as csrc/cpu/routing.cpp, whose header gives the full math):
//   logits [T, E] float32 | float64 | bfloat16 | float16, contiguous; the compute type A is
//   float32 (float64 for float64 logits). expert_bias [E] in A or none. weights [T, k] A,
//   ids [T, k] int32, counts [E] int32; losses [4] A = (balance, z, entropy, batch_entropy),
//   mean_probs [E] A.
// route, per row t: s = softmax(x) or sigmoid(x); key q = s + bias; group-limited: a group
//   scores the sum of its top min(2, G) keys, the topk_groups best groups are kept, and the k
//   best experts of those are chosen. Order: (key descending, id ascending), a NaN key ranking
//   as -inf, so ids are valid and distinct. w_j = s[id_j] / max(sum_j s[id_j], tiny) * scale
//   (renormalize) or s[id_j] * scale. As on the CPU, float32-computed rows (float32, bfloat16,
//   float16) with no bias and no groups, scored by sigmoid or a renormalized softmax, select
//   on the logits themselves (both scores are increasing in the logit, and float32 scores can
//   round distinct logits to a tie): CPU and CUDA then choose the same ids exactly.
// route_backward, router_losses(_backward): the formulas of csrc/cpu/routing.cpp.
//
// Threads, route: a team routes one row: a warp (8 rows per 256-thread block) while
//   E <= 32 * kMaxSlots, else a 256-thread block. Members stride over the row's E entries and
//   reduce through shuffles (and shared memory across a block's warps, in a fixed order).
//   Selection is k passes of a team arg-max, each taking the best entry that comes after the
//   previous pick in the selection order, so any E and any k <= E work and nothing per entry
//   needs to be stored. A warp keeps its lanes' keys in registers (S = ceil(E / 32) slots,
//   S a power of two up to kMaxSlots: the key of each entry, an exp and a divide, is computed
//   once, not k times); a block recomputes them from the logits (in L1) on each pass. Group
//   scores (the sum of a group's top two keys) go to a [T, num_groups] global workspace:
//   from the register cache by one warp top-2 per group where a group is whole slots
//   (G % 32 == 0, e.g. DeepSeek-V3), else members own whole groups and recompute keys; then the
//   topk_groups-th best group is found the same way, and an expert is eligible when its
//   group ranks at or above it. Blocks loop over rows (as many blocks as the device holds at
//   once) and count the picks in shared memory, flushed once per block (see kSharedCounts).
//   TODO: the warp / block threshold (E = 32 * kMaxSlots) is unmeasured: set it from
//   gpu_check.sh's route rows on a GPU.
// router_losses: (1) partial sums per chunk of rows, [chunks, E + 2] in float64: p_te per
//   column, then lse_t^2 and H(p_t). For E <= 32 * kMaxSlots one fused pass reads the logits
//   once (a block per chunk, a warp per row, a lane's entries in registers); wider rows take
//   two kernels: a warp per row writes lse_t and H(p_t), then a thread per (column, chunk)
//   sums p_te = exp(x_te - lse_t). (2) a thread per column adds the chunks in order; (3) one
//   block reduces balance and batch entropy in a fixed tree. No atomics on floats: results
//   are deterministic.
// router_losses_backward: a thread per expert forms a_e, then a warp per row writes its grad.
// Reference: smoe_ops.reference.route, smoe_ops.reference.router_losses.
#include <algorithm>

#include "cuda/device_utils.cuh"

namespace smoe {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kThreads = kWarp * kRowsPerBlock;

template <typename A>
__device__ __forceinline__ A rank_key(A v) {
  return v != v ? neg_inf<A>() : v;
}

// (q, id) goes before (best_q, best_id) in the selection order. id = INT32_MAX marks "none".
template <typename A>
__device__ __forceinline__ bool goes_before(A q, int32_t id, A best_q, int32_t best_id) {
  return q > best_q || (q == best_q && id < best_id);
}

// The best (key, id) of the warp's candidates, every lane getting the result.
template <typename A>
__device__ __forceinline__ void warp_best(A& q, int32_t& id) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other_q = __shfl_xor_sync(0xffffffffu, q, offset);
    const int32_t other_id = __shfl_xor_sync(0xffffffffu, id, offset);
    if (goes_before(other_q, other_id, q, id)) {
      q = other_q;
      id = other_id;
    }
  }
}

// Top two of the warp's (best, second) pairs, every lane getting the result. Values only: a
// group's score is best + second whichever entries hold them.
template <typename A>
__device__ __forceinline__ void warp_top2(A& best, A& second) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other_best = __shfl_xor_sync(0xffffffffu, best, offset);
    const A other_second = __shfl_xor_sync(0xffffffffu, second, offset);
    second = fmax(fmin(best, other_best), fmax(second, other_second));
    best = fmax(best, other_best);
  }
}

template <typename T>
struct RouteArgs {
  using A = acc_t<T>;
  const T* logits;
  const A* bias;
  int64_t num_tokens, E, k;
  bool sigmoid, renormalize;
  int64_t num_groups, topk_groups;
  A scale;
  A* group_scores;
  A* weights;
  int32_t* ids;
  int32_t* counts;
};

// The threads that route one row: a warp, or a whole block of kBlockTeam threads. rank is the
// thread's place in the team; every reduction returns its result to every member.
struct WarpTeam {
  static constexpr int kSize = kWarp;
  int rank;
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  template <typename A>
  __device__ __forceinline__ A max(A v) const {
    return warp_max(v);
  }
  template <typename A>
  __device__ __forceinline__ A sum(A v) const {
    return warp_sum(v);
  }
  template <typename A>
  __device__ __forceinline__ void best(A& q, int32_t& id) const {
    warp_best(q, id);
  }
};

constexpr int kBlockTeam = 256, kTeamWarps = kBlockTeam / kWarp;

// Across warps through shared memory, folded in warp order (deterministic), with a barrier
// before the scratch is reused.
struct BlockTeam {
  static constexpr int kSize = kBlockTeam;
  int rank;
  double* scratch_q;  // [kTeamWarps], shared
  int32_t* scratch_id;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <typename A, typename Fold>
  __device__ __forceinline__ A fold(A v, Fold f) const {
    if (rank % kWarp == 0) scratch_q[rank / kWarp] = double(v);
    __syncthreads();
    A r = A(scratch_q[0]);
    for (int w = 1; w < kTeamWarps; ++w) r = f(r, A(scratch_q[w]));
    __syncthreads();
    return r;
  }
  template <typename A>
  __device__ __forceinline__ A max(A v) const {
    return fold(warp_max(v), [](A a, A b) { return fmax(a, b); });
  }
  template <typename A>
  __device__ __forceinline__ A sum(A v) const {
    return fold(warp_sum(v), [](A a, A b) { return a + b; });
  }
  template <typename A>
  __device__ __forceinline__ void best(A& q, int32_t& id) const {
    warp_best(q, id);
    if (rank % kWarp == 0) {
      scratch_q[rank / kWarp] = double(q);
      scratch_id[rank / kWarp] = id;
    }
    __syncthreads();
    q = A(scratch_q[0]);
    id = scratch_id[0];
    for (int w = 1; w < kTeamWarps; ++w) {
      const A other_q = A(scratch_q[w]);
      if (goes_before(other_q, scratch_id[w], q, id)) {
        q = other_q;
        id = scratch_id[w];
      }
    }
    __syncthreads();
  }
};

// Routes row t with `team`; S > 0 caches the member's keys (entries rank + i * kSize, i < S,
// which must cover the row) in registers, S = 0 recomputes them on each pass. Each pick adds
// one to counts[id]: the block's counts in shared memory, or the output's.
template <typename T, int S, typename Team>
__device__ __forceinline__ void route_row(const RouteArgs<T>& args, int64_t t, const Team& team,
                                          int32_t* counts) {
  using A = acc_t<T>;
  constexpr int kSize = Team::kSize;
  const int rank = team.rank;
  const int64_t E = args.E, k = args.k;
  const T* x = args.logits + t * E;

  // Softmax statistics, and whether the row is finite (which decides the on-logits path): a
  // sum of v - v, 0 or NaN in any order of addition, so the CPU kernel decides alike.
  A m = neg_inf<A>(), nonfinite = 0;
  for (int64_t e = rank; e < E; e += kSize) {
    const A v = to_acc(x[e]);
    m = fmax(m, v);
    nonfinite += v - v;
  }
  m = team.max(m);
  nonfinite = team.sum(nonfinite);
  const bool on_logits = std::is_same_v<A, float> && args.bias == nullptr &&
                         args.num_groups == 1 && (args.sigmoid || args.renormalize) &&
                         nonfinite == 0;
  A inv_sum = 1;
  if (!args.sigmoid && !on_logits) {
    A sum = 0;
    for (int64_t e = rank; e < E; e += kSize) sum += exp_acc(to_acc(x[e]) - m);
    inv_sum = A(1) / team.sum(sum);
  }
  auto score = [&](int64_t e) -> A {
    const A v = to_acc(x[e]);
    return args.sigmoid ? A(1) / (A(1) + exp_acc(-v)) : exp_acc(v - m) * inv_sum;
  };
  auto key = [&](int64_t e) -> A {
    if (on_logits) return to_acc(x[e]);
    A q = score(e);
    if (args.bias != nullptr) q += args.bias[e];
    return rank_key(q);
  };

  // The member's cached keys: entries rank + i * kSize, i < S (0 past the row).
  A cached[S > 0 ? S : 1];
  if constexpr (S > 0) {
    static_assert(S <= 32, "one candidate bit per slot");
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const int64_t e = rank + int64_t(i) * kSize;
      cached[i] = e < E ? key(e) : A(0);
    }
  }

  // Groups: the threshold group (gq, gid) is the topk_groups-th best; kept = at or above it.
  const int64_t G = E / args.num_groups;
  A gq = neg_inf<A>();
  int32_t gid = INT32_MAX;
  A* group_score = args.group_scores + t * args.num_groups;
  if (args.num_groups > 1) {
    auto top2 = [](A v, A& best, A& second) {
      second = fmax(fmin(v, best), second);
      best = fmax(v, best);
    };
    // A warp whose groups are whole slots (G a multiple of 32, as DeepSeek-V3's 8 groups of
    // 32) scores them from its cached keys: slots [g * G / 32, (g + 1) * G / 32) are group
    // g, one warp top-2 each. Otherwise members own whole groups and compute their keys
    // again. TODO: share the keys for other group sizes too if gpu_check.sh's grouped route
    // rows show the keys, not the passes, dominate.
    bool from_cache = false;
    if constexpr (S > 0 && Team::kSize == kWarp) {
      if (G % kWarp == 0) {
        from_cache = true;
        // Slot indices stay compile-time (cached[] stays in registers); the group's end is a
        // warp-uniform branch.
        const int slots_per_group = int(G / kWarp);
        A best = neg_inf<A>(), second = neg_inf<A>();
#pragma unroll
        for (int i = 0; i < S; ++i) {
          top2(cached[i], best, second);
          const int g = i / slots_per_group;
          if ((i + 1) % slots_per_group == 0 && g < args.num_groups) {
            warp_top2(best, second);
            if (rank == 0) group_score[g] = rank_key(best + second);
            best = second = neg_inf<A>();
          }
        }
      }
    }
    if (!from_cache) {
      for (int64_t g = rank; g < args.num_groups; g += kSize) {
        A best = neg_inf<A>(), second = neg_inf<A>();
        for (int64_t e = g * G; e < (g + 1) * G; ++e) top2(key(e), best, second);
        group_score[g] = rank_key(G == 1 ? best : best + second);
      }
    }
    team.sync();
    A prev_q = std::numeric_limits<A>::infinity();
    int32_t prev_id = -1;
    for (int64_t j = 0; j < args.topk_groups; ++j) {
      A q = neg_inf<A>();
      int32_t id = INT32_MAX;
      for (int64_t g = rank; g < args.num_groups; g += kSize) {
        const A v = group_score[g];
        const bool after = v < prev_q || (v == prev_q && g > prev_id);
        if (after && goes_before(v, int32_t(g), q, id)) {
          q = v;
          id = int32_t(g);
        }
      }
      team.best(q, id);
      prev_q = q;
      prev_id = id;
    }
    gq = prev_q;
    gid = prev_id;
  }
  auto kept = [&](int64_t e) -> bool {
    if (args.num_groups == 1) return true;
    const int64_t g = e / G;
    const A v = group_score[g];
    return v > gq || (v == gq && g <= gid);
  };

  // Which cached keys are candidates (inside the row and kept).
  uint32_t candidates = 0;
  if constexpr (S > 0) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const int64_t e = rank + int64_t(i) * kSize;
      candidates |= uint32_t(e < E && kept(e)) << i;
    }
  }

  // Experts: k passes, each picking the best entry after the previous pick.
  int32_t* ids = args.ids + t * k;
  A* w = args.weights + t * k;
  A prev_q = std::numeric_limits<A>::infinity();
  int32_t prev_id = -1;
  for (int64_t j = 0; j < k; ++j) {
    A q = neg_inf<A>();
    int32_t id = INT32_MAX;
    auto consider = [&](int64_t e, A v) {
      const bool after = v < prev_q || (v == prev_q && e > prev_id);
      if (after && goes_before(v, int32_t(e), q, id)) {
        q = v;
        id = int32_t(e);
      }
    };
    if constexpr (S > 0) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        if ((candidates >> i) & 1u) consider(rank + int64_t(i) * kSize, cached[i]);
      }
    } else {
      for (int64_t e = rank; e < E; e += kSize) {
        if (kept(e)) consider(e, key(e));
      }
    }
    team.best(q, id);
    prev_q = q;
    prev_id = id;
    if (rank == 0) {
      ids[j] = id;
      atomicAdd(counts + id, 1);
    }
  }

  // Weights, serially on member 0 in j order (the CPU's summation order).
  if (rank == 0) {
    const A top = to_acc(x[ids[0]]);
    A total = 0;
    for (int64_t j = 0; j < k; ++j) {
      A p;
      if (on_logits) {
        const A v = to_acc(x[ids[j]]);
        p = args.sigmoid ? A(1) / (A(1) + exp_acc(-v)) : exp_acc(v - top);
      } else {
        p = score(ids[j]);
      }
      w[j] = p;
      total += p;
    }
    const A tiny = std::numeric_limits<A>::min();
    const A factor =
        args.renormalize ? args.scale / (total < tiny ? tiny : total) : args.scale;
    for (int64_t j = 0; j < k; ++j) w[j] *= factor;
  }
}

// Key slots a warp keeps per lane at most: rows of up to 32 * kMaxSlots experts go to a warp.
constexpr int kMaxSlots = 16;

// Calls f(std::integral_constant<int, S>) with S the fewest register slots per lane (a power
// of two) that cover a row of E entries, or S = 0 when E > 32 * kMaxSlots.
template <typename F>
cudaError_t with_slots(int64_t E, F&& f) {
  if (E <= kWarp) return f(std::integral_constant<int, 1>{});
  if (E <= 2 * kWarp) return f(std::integral_constant<int, 2>{});
  if (E <= 4 * kWarp) return f(std::integral_constant<int, 4>{});
  if (E <= 8 * kWarp) return f(std::integral_constant<int, 8>{});
  if (E <= kMaxSlots * kWarp) return f(std::integral_constant<int, kMaxSlots>{});
  return f(std::integral_constant<int, 0>{});
}

// counts: a block adds its rows' picks to a copy in shared memory and then adds each nonzero
// entry to the output with one global atomic. Same-address global atomics serialize in L2
// (about one per clock), so with every row picking one hot expert, one atomic per pick would
// cost T clocks (65536 rows: ~40 us, against ~7 us to read bf16 logits [65536, 256] at
// 4.8 TB/s); per block it is one per resident block. Rows of up to kSharedCounts experts
// (16 KB of shared memory) count this way; wider ones add to the output directly.
constexpr int kSharedCounts = 4096;

__device__ __forceinline__ void zero_counts(int32_t* block_counts, int64_t E) {
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();
}

__device__ __forceinline__ void flush_counts(const int32_t* block_counts, int64_t E,
                                             int32_t* counts) {
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    if (block_counts[e] != 0) atomicAdd(counts + e, block_counts[e]);
  }
}

// Blocks loop over rows (grid at most the resident blocks, see route()). A warp's rows are
// warp-uniform, so every thread reaches both barriers of the counts.
template <typename T, int S>
__global__ void __launch_bounds__(kThreads) route_warp_kernel(RouteArgs<T> args) {
  __shared__ int32_t block_counts[S * kWarp];  // E <= S * kWarp on this path
  zero_counts(block_counts, args.E);
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t t = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
       t < args.num_tokens; t += stride) {
    route_row<T, S>(args, t, WarpTeam{int(threadIdx.x % kWarp)}, block_counts);
  }
  flush_counts(block_counts, args.E, args.counts);
}

template <typename T, bool kSharedCountsFit>
__global__ void __launch_bounds__(kBlockTeam) route_block_kernel(RouteArgs<T> args) {
  __shared__ double scratch_q[kTeamWarps];
  __shared__ int32_t scratch_id[kTeamWarps];
  __shared__ int32_t block_counts[kSharedCountsFit ? kSharedCounts : 1];
  if constexpr (kSharedCountsFit) zero_counts(block_counts, args.E);
  for (int64_t t = blockIdx.x; t < args.num_tokens; t += gridDim.x) {
    route_row<T, 0>(args, t, BlockTeam{int(threadIdx.x), scratch_q, scratch_id},
                    kSharedCountsFit ? block_counts : args.counts);
  }
  if constexpr (kSharedCountsFit) flush_counts(block_counts, args.E, args.counts);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    route_backward_kernel(const acc_t<T>* grad_weights, const T* logits, const int32_t* ids_all,
                          int64_t num_tokens, int64_t E, int64_t k, bool sigmoid,
                          bool renormalize, acc_t<T> scale, T* grad) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (t >= num_tokens) return;
  const T* x = logits + t * E;
  const int32_t* ids = ids_all + t * k;
  const A* g = grad_weights + t * k;
  T* out = grad + t * E;

  A m = neg_inf<A>(), inv_sum = 1;
  if (!sigmoid) {
    A sum;
    warp_softmax_stats(x, E, lane, m, sum);
    inv_sum = A(1) / sum;
  }
  auto score = [&](int64_t e) -> A {
    const A v = to_acc(x[e]);
    return sigmoid ? A(1) / (A(1) + exp_acc(-v)) : exp_acc(v - m) * inv_sum;
  };

  // Every lane forms the row's sums itself (k terms): no broadcast needed.
  A total = 0, weighted = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t id = ids[j];
    SMOE_DEVICE_CHECK(id >= 0 && id < E,
                      "smoe_ops.route_backward: ids[%lld, %lld] = %d is out of range, expected "
                      "values in [0, num_experts = %lld)\n",
                      (long long)t, (long long)j, id, (long long)E);
    const A p = score(id);
    total += p;
    weighted += g[j] * p;
  }
  const A tiny = std::numeric_limits<A>::min();
  const bool clamped = renormalize && total < tiny;
  const A norm = renormalize ? (clamped ? tiny : total) : A(1);
  const A mean_g = renormalize && !clamped ? weighted / norm : A(0);
  auto dp = [&](int64_t j) -> A { return scale * (g[j] - mean_g) / norm; };
  A dot = 0;  // sum_j dp_j p_j (softmax only)
  if (!sigmoid) {
    for (int64_t j = 0; j < k; ++j) dot += dp(j) * score(ids[j]);
  }
  for (int64_t e = lane; e < E; e += kWarp) {
    A picked = 0;  // sum of dp_j over the j that chose e (ids need not be distinct here)
    for (int64_t j = 0; j < k; ++j) picked += ids[j] == e ? dp(j) : A(0);
    const A s = score(e);
    out[e] = from_acc<T>(sigmoid ? picked * s * (A(1) - s) : s * (picked - dot));
  }
}

// ---- router_losses ----------------------------------------------------------------------------

// Rows per chunk of partial sums: at most kMaxChunks chunks; a function of the shape only.
constexpr int64_t kMinChunkRows = 64, kMaxChunks = 1024;

int64_t chunk_rows(int64_t T) {
  const int64_t rows = ceil_div(T, kMaxChunks);
  return rows > kMinChunkRows ? rows : kMinChunkRows;
}

struct LossWorkspace {
  double* stats;    // [T, 2]: lse_t, H(p_t)
  double* partial;  // [chunks, E + 2]
  double* total;    // [E + 2]
};

LossWorkspace loss_workspace(void* base, int64_t T, int64_t E) {
  double* p = static_cast<double*>(base);
  const int64_t chunks = ceil_div(T, chunk_rows(T));
  return {p, p + 2 * T, p + 2 * T + chunks * (E + 2)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_row_stats_kernel(const T* logits, int64_t num_tokens, int64_t E, double* stats) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (t >= num_tokens) return;
  const T* x = logits + t * E;
  A m, sum;
  warp_softmax_stats(x, E, lane, m, sum);
  const A inv = A(1) / sum;
  A weighted = 0;  // sum_{p > 0} p (x - m): H = log(sum) - weighted, with 0 log 0 = 0
  for (int64_t e = lane; e < E; e += kWarp) {
    const A v = to_acc(x[e]);
    const A p = exp_acc(v - m) * inv;
    weighted += p > A(0) ? p * (v - m) : A(0);
  }
  weighted = warp_sum(weighted);
  if (lane == 0) {
    const A log_sum = log_acc(sum);
    stats[2 * t] = double(m + log_sum);
    stats[2 * t + 1] = double(log_sum - weighted);
  }
}

// partial[c, col]: col < E sums p_te, col E sums lse_t^2, col E + 1 sums H(p_t), over the rows
// of chunk c. Threads of a warp take consecutive columns of the same rows: coalesced.
template <typename T>
__global__ void loss_partial_kernel(const T* logits, int64_t num_tokens, int64_t E,
                                    int64_t rows_per_chunk, const double* stats,
                                    double* partial) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t c = blockIdx.y;
  if (col >= E + 2) return;
  const int64_t begin = c * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < num_tokens ? begin + rows_per_chunk : num_tokens;
  double acc = 0;
  for (int64_t t = begin; t < end; ++t) {
    const double lse = stats[2 * t];
    if (col < E) {
      using A = acc_t<T>;
      acc += double(exp_acc(to_acc(logits[t * E + col]) - A(lse)));
    } else if (col == E) {
      acc += lse * lse;
    } else {
      acc += stats[2 * t + 1];
    }
  }
  partial[c * (E + 2) + col] = acc;
}

// The fused pass (E <= 32 * kMaxSlots): block c owns the rows of chunk c, its warp w the rows
// begin + w, begin + w + 8, ...; a lane loads its S entries of a row once into registers,
// forms the row's softmax statistics with the warp, and adds p_te, lse_t^2 and H(p_t) to
// float64 accumulators. The block then folds its warps' sums in warp order into
// partial[c, :]: the logits are read once, and the result does not depend on timing.
template <typename T, int S>
__global__ void __launch_bounds__(kThreads)
    loss_fused_partial_kernel(const T* logits, int64_t num_tokens, int64_t E,
                              int64_t rows_per_chunk, double* partial) {
  using A = acc_t<T>;
  constexpr int kCols = kWarp * S + 2;  // the lanes' columns, then lse^2 and entropy
  __shared__ double sums[kRowsPerBlock][kCols];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c = blockIdx.x, begin = c * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < num_tokens ? begin + rows_per_chunk : num_tokens;
  double acc[S];
#pragma unroll
  for (int i = 0; i < S; ++i) acc[i] = 0;
  double lse_sq = 0, entropy = 0;
  for (int64_t t = begin + warp; t < end; t += kRowsPerBlock) {
    const T* x = logits + t * E;
    A v[S];
    A m = neg_inf<A>();
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const int64_t e = lane + int64_t(i) * kWarp;
      v[i] = e < E ? to_acc(x[e]) : neg_inf<A>();
      m = fmax(m, v[i]);
    }
    m = warp_max(m);
    A sum = 0;
#pragma unroll
    for (int i = 0; i < S; ++i) sum += lane + i * kWarp < E ? exp_acc(v[i] - m) : A(0);
    sum = warp_sum(sum);
    const A inv = A(1) / sum;
    A weighted = 0;  // sum_{p > 0} p (x - m): H = log(sum) - weighted, with 0 log 0 = 0
#pragma unroll
    for (int i = 0; i < S; ++i) {
      if (lane + i * kWarp >= E) continue;
      const A p = exp_acc(v[i] - m) * inv;
      weighted += p > A(0) ? p * (v[i] - m) : A(0);
      acc[i] += double(p);
    }
    weighted = warp_sum(weighted);
    const A log_sum = log_acc(sum);
    const double lse = double(m + log_sum);
    lse_sq += lse * lse;
    entropy += double(log_sum - weighted);
  }
#pragma unroll
  for (int i = 0; i < S; ++i) sums[warp][lane + i * kWarp] = acc[i];
  if (lane == 0) {
    sums[warp][kCols - 2] = lse_sq;
    sums[warp][kCols - 1] = entropy;
  }
  __syncthreads();
  for (int64_t col = threadIdx.x; col < E + 2; col += kThreads) {
    const int64_t from = col < E ? col : kCols - 2 + (col - E);
    double total = 0;
    for (int w = 0; w < kRowsPerBlock; ++w) total += sums[w][from];
    partial[c * (E + 2) + col] = total;
  }
}

template <typename A>
__global__ void loss_total_kernel(const double* partial, int64_t chunks, int64_t E,
                                  double inv_tokens, double* total, A* mean_probs) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= E + 2) return;
  double acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * (E + 2) + col];
  total[col] = acc;
  if (col < E) mean_probs[col] = A(acc * inv_tokens);
}

constexpr int kReduceThreads = 256;

template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    loss_final_kernel(const double* total, const int32_t* counts, int64_t E, int64_t k,
                      double inv_tokens, A* losses) {
  __shared__ double balance_part[kReduceThreads], entropy_part[kReduceThreads];
  double balance = 0, entropy = 0;
  for (int64_t e = threadIdx.x; e < E; e += kReduceThreads) {
    const double mean_p = total[e] * inv_tokens;
    balance += double(counts[e]) * mean_p;
    if (mean_p > 0) entropy -= mean_p * log(mean_p);
  }
  balance_part[threadIdx.x] = balance;
  entropy_part[threadIdx.x] = entropy;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      balance_part[threadIdx.x] += balance_part[threadIdx.x + stride];
      entropy_part[threadIdx.x] += entropy_part[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    losses[0] = A(double(E) * balance_part[0] * inv_tokens / double(k));
    losses[1] = A(total[E] * inv_tokens);
    losses[2] = A(total[E + 1] * inv_tokens);
    losses[3] = A(entropy_part[0]);
  }
}

// a_e = (gb E f_e - gbe log P_e) / T, f_e = counts_e / (T k).
template <typename A>
__global__ void loss_backward_columns_kernel(const A* grad_losses, const int32_t* counts,
                                             const A* mean_probs, int64_t num_tokens, int64_t E,
                                             int64_t k, A* a) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= E) return;
  const double inv_tokens = 1.0 / double(num_tokens);
  const double gb = grad_losses[0], gbe = grad_losses[3];
  const double f = double(counts[e]) * inv_tokens / double(k);
  const double log_mean = mean_probs[e] > 0 ? log(double(mean_probs[e])) : 0.0;
  a[e] = A((gb * double(E) * f - gbe * log_mean) * inv_tokens);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_backward_rows_kernel(const acc_t<T>* grad_losses, const T* logits, const acc_t<T>* a,
                              int64_t num_tokens, int64_t E, T* grad) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (t >= num_tokens) return;
  const double inv_tokens = 1.0 / double(num_tokens);
  const A ge_t = A(double(grad_losses[2]) * inv_tokens);
  const A gz2_t = A(2.0 * double(grad_losses[1]) * inv_tokens);
  const T* x = logits + t * E;
  T* out = grad + t * E;
  A m, sum;
  warp_softmax_stats(x, E, lane, m, sum);
  const A inv = A(1) / sum, shift = m + log_acc(sum);
  A c_mean = 0;
  for (int64_t e = lane; e < E; e += kWarp) {
    const A v = to_acc(x[e]);
    const A p = exp_acc(v - m) * inv;
    c_mean += p > A(0) ? p * (a[e] - ge_t * (v - shift)) : A(0);
  }
  c_mean = warp_sum(c_mean);
  const A offset = gz2_t * shift - c_mean;
  for (int64_t e = lane; e < E; e += kWarp) {
    const A v = to_acc(x[e]);
    const A p = exp_acc(v - m) * inv;
    out[e] = from_acc<T>(p > A(0) ? p * (a[e] - ge_t * (v - shift) + offset) : A(0));
  }
}

unsigned row_blocks(int64_t T) { return static_cast<unsigned>(ceil_div(T, kRowsPerBlock)); }

// The grid of Kernel, whose blocks loop over `items`: one block per item up to the blocks
// the device holds at once.
template <auto Kernel>
unsigned looping_grid(int64_t items, int threads) {
  const int64_t resident = resident_blocks<Kernel>(threads);
  return static_cast<unsigned>(resident > 0 ? std::min(items, resident) : items);
}

}  // namespace

cudaError_t route(DType dtype, const void* logits, const void* bias, int64_t T, int64_t E,
                  int64_t k, bool sigmoid, bool renormalize, int64_t num_groups,
                  int64_t topk_groups, double scale, void* group_scores, void* weights,
                  int32_t* ids, int32_t* counts, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    RouteArgs<T_> args{static_cast<const T_*>(logits),
                       static_cast<const A*>(bias),
                       T,
                       E,
                       k,
                       sigmoid,
                       renormalize,
                       num_groups,
                       topk_groups,
                       A(scale),
                       static_cast<A*>(group_scores),
                       static_cast<A*>(weights),
                       ids,
                       counts};
    return with_slots(E, [&](auto slots) {
      constexpr int S = decltype(slots)::value;
      if constexpr (S > 0) {
        const unsigned grid = looping_grid<route_warp_kernel<T_, S>>(row_blocks(T), kThreads);
        SMOE_LAUNCH(grid, kThreads, 0, stream, route_warp_kernel<T_, S>)(args);
      } else if (E <= kSharedCounts) {
        const unsigned grid = looping_grid<route_block_kernel<T_, true>>(T, kBlockTeam);
        SMOE_LAUNCH(grid, kBlockTeam, 0, stream, route_block_kernel<T_, true>)(args);
      } else {
        const unsigned grid = looping_grid<route_block_kernel<T_, false>>(T, kBlockTeam);
        SMOE_LAUNCH(grid, kBlockTeam, 0, stream, route_block_kernel<T_, false>)(args);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t route_backward(DType dtype, const void* grad_weights, const void* logits,
                           const int32_t* ids, int64_t T, int64_t E, int64_t k, bool sigmoid,
                           bool renormalize, double scale, void* grad, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    SMOE_LAUNCH(row_blocks(T), kThreads, 0, stream, route_backward_kernel<T_>)(
        static_cast<const A*>(grad_weights), static_cast<const T_*>(logits), ids, T, E, k, sigmoid,
        renormalize, A(scale), static_cast<T_*>(grad));
    return cudaGetLastError();
  });
}

int64_t router_losses_workspace_bytes(int64_t T, int64_t E) {
  const int64_t chunks = ceil_div(T, chunk_rows(T));
  return int64_t(sizeof(double)) * (2 * T + chunks * (E + 2) + (E + 2));
}

cudaError_t router_losses(DType dtype, const void* logits, const int32_t* counts, int64_t T,
                          int64_t E, int64_t k, void* workspace, void* losses, void* mean_probs,
                          cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    const LossWorkspace ws = loss_workspace(workspace, T, E);
    const int64_t rows = chunk_rows(T), chunks = ceil_div(T, rows);
    const double inv_tokens = T > 0 ? 1.0 / double(T) : 0.0;
    const T_* x = static_cast<const T_*>(logits);
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(E + 2, 256));
    if (T > 0) {
      cudaError_t err = with_slots(E, [&](auto slots) {
        constexpr int S = decltype(slots)::value;
        if constexpr (S > 0) {
          SMOE_LAUNCH(unsigned(chunks), kThreads, 0, stream, loss_fused_partial_kernel<T_, S>)(
              x, T, E, rows, ws.partial);
          return cudaGetLastError();
        } else {
          SMOE_LAUNCH(row_blocks(T), kThreads, 0, stream, loss_row_stats_kernel<T_>)(x, T, E,
                                                                                     ws.stats);
          const cudaError_t row_err = cudaGetLastError();
          if (row_err != cudaSuccess) return row_err;
          SMOE_LAUNCH(dim3(col_blocks, unsigned(chunks)), 256, 0, stream,
                      loss_partial_kernel<T_>)(x, T, E, rows, ws.stats, ws.partial);
          return cudaGetLastError();
        }
      });
      if (err != cudaSuccess) return err;
    }
    SMOE_LAUNCH(col_blocks, 256, 0, stream, loss_total_kernel<A>)(
        ws.partial, chunks, E, inv_tokens, ws.total, static_cast<A*>(mean_probs));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    SMOE_LAUNCH(1, kReduceThreads, 0, stream, loss_final_kernel<A>)(
        ws.total, counts, E, k, inv_tokens, static_cast<A*>(losses));
    return cudaGetLastError();
  });
}

cudaError_t router_losses_backward(DType dtype, const void* grad_losses, const void* logits,
                                   const int32_t* counts, int64_t T, int64_t E, int64_t k,
                                   const void* mean_probs, void* workspace, void* grad,
                                   cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    A* a = static_cast<A*>(workspace);
    const A* gl = static_cast<const A*>(grad_losses);
    SMOE_LAUNCH(unsigned(ceil_div(E, 256)), 256, 0, stream, loss_backward_columns_kernel<A>)(
        gl, counts, static_cast<const A*>(mean_probs), T, E, k, a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    SMOE_LAUNCH(row_blocks(T), kThreads, 0, stream, loss_backward_rows_kernel<T_>)(
        gl, static_cast<const T_*>(logits), a, T, E, static_cast<T_*>(grad));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace smoe
