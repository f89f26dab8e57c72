// grouped_mm: one GEMM per expert over expert-sorted rows, and its three backward products.
//
//   x [N, K], w [E, K, M] (any strides), offsets [E + 1] int64 on the device (rows of expert
//   e: offsets[e]:offsets[e + 1]), bias [E, M] or none; float32 | float64 | bfloat16 | float16.
//   out[s:t]     = x[s:t] @ w[e] (+ bias[e])          [N, M]
//   grad_x[s:t]  = grad_out[s:t] @ w[e]^T             [N, K]  (the same kernel, w^T's strides)
//   grad_w[e]    = x[s:t]^T @ grad_out[s:t]           [E, K, M]  (zeros for an empty expert)
//   grad_bias[e] = column sums of grad_out[s:t]       [E, M]
// bfloat16 / float16 accumulate in float32 and round once; bias is added before that rounding.
//
// Tiles: a 128-thread block computes a 64 x 64 tile of one expert's output, stepping through
// the reduction 32 at a time. Each step stages the A tile [64 rows x 32] and the B tile
// [32 x 64 cols] in shared memory, both stored reduction-contiguous (As[i][r], Bs[n][r]),
// with zeros past the edges; global loads walk whichever dimension of the operand has unit
// stride, so they coalesce for w and for w^T alike.
//   Tensor-core path (bfloat16 / float16 on sm_80+): 4 warps in a 2 x 2 grid, each a 32 x 32
//   sub-tile as 2 x 4 mma.sync.m16n8k16 (row.col, float32 accumulators); fragments are read
//   from shared memory as 32-bit pairs in the PTX ISA's fragment layout (lane = 4 * group +
//   thread_in_group; A rows group / group + 8, B column group, k pairs thread_in_group * 2).
//   Padding rows to 40 elements puts the 32 lanes of a fragment load in 32 distinct banks.
//   Simple path (float32, float64, or 16-bit types below sm_80): a 16 x 8 thread grid, each
//   thread an 8 x 4 micro-tile with fused multiply-adds in the accumulation type.
// Scheduling: out and grad_x launch ceil(N / 64) + E row-tile slots (an upper bound of the
//   sum over experts of ceil(rows_e / 64), known without reading offsets) times ceil(M / 64)
//   column tiles. A one-block prologue checks offsets and writes the prefix sum of the row
//   tiles per expert into a device workspace; each block binary-searches it for its (expert,
//   row tile) item and leaves if it has none. Nothing returns to the host: CUDA graphs can
//   capture it. grad_w: one block per (expert, 64 x 64 tile of [K, M]), reducing over all of
//   the expert's rows. grad_bias: a thread per (expert, column), summing the expert's rows.
// Pipelined path (bfloat16 / float16 on sm_80+, when the operands allow whole aligned 16-byte
//   packs: see gemm_tile_pipelined): cp.async into a two-stage shared-memory ring and ldmatrix
//   fragments, the same 2 x 2 warps of mma.sync; the register-staged tile above serves every
//   other case.
// TODO: no wgmma/TMA path for sm_90a (needed to match torch._grouped_mm there), no split of
//   grad_w's reduction for an expert that holds most rows (the benchmark shapes still give
//   such an expert 384 or more 64 x 64 tiles), tile sizes 64 x 64 and 128 x 128 only: tune
//   them once gpu_check.sh has measured this version against torch._grouped_mm.
// Reference: smoe_ops.reference.grouped_mm; CPU twin: csrc/cpu/grouped_mm.cpp.

#include "cuda/device_utils.cuh"

namespace smoe {
namespace cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, kPad = 8, kThreads = 128;

// One block's GEMM: c[i, n] (+)= sum_r a[i, r] b[r, n] for i < rows, n < cols, r < depth.
template <typename T>
struct Tile {
  const T* a;
  int64_t a_si, a_sr;
  const T* b;
  int64_t b_sr, b_sn;
  int64_t rows, cols, depth;
  T* c;
  int64_t c_si;
  const T* bias;  // [cols] at the tile's first column, or null
};

template <typename T>
constexpr bool kSixteenBit = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(SMOE_CUDA_EMULATE)
  emu::mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, d, a, b);
#elif SMOE_HAS_MMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Tensor cores exist for this instantiation on the architecture being compiled.
template <typename T>
__device__ constexpr bool use_mma() {
  return SMOE_HAS_MMA && kSixteenBit<T>;
}

template <typename T>
__device__ void gemm_tile(const Tile<T>& t) {
  using A = acc_t<T>;
  alignas(16) __shared__ T As[BM][BK + kPad];
  alignas(16) __shared__ T Bs[BN][BK + kPad];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T zero = from_acc<T>(A(0));

  constexpr bool kMma = use_mma<T>();
  // Tensor-core accumulators [mi][ni][4] or simple-path ones [8][4]; only one set is used.
  float mma_acc[2][4][4];
  A acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[i][j] = A(0);
      mma_acc[i / 4][i % 4][j] = 0.0f;
    }

  const bool a_r_unit = t.a_sr == 1, b_n_unit = t.b_sn == 1;
  for (int64_t r0 = 0; r0 < t.depth; r0 += BK) {
    // Stage A: As[i][r] = a[i, r0 + r]; threads walk a's unit-stride dimension.
#pragma unroll 4
    for (int q = 0; q < BM * BK / kThreads; ++q) {
      const int idx = tid + q * kThreads;
      const int i = a_r_unit ? idx / BK : idx % BM;
      const int r = a_r_unit ? idx % BK : idx / BM;
      const bool inside = i < t.rows && r0 + r < t.depth;
      As[i][r] = inside ? t.a[i * t.a_si + (r0 + r) * t.a_sr] : zero;
    }
    // Stage B: Bs[n][r] = b[r0 + r, n].
#pragma unroll 4
    for (int q = 0; q < BN * BK / kThreads; ++q) {
      const int idx = tid + q * kThreads;
      const int n = b_n_unit ? idx % BN : idx / BK;
      const int r = b_n_unit ? idx / BN : idx % BK;
      const bool inside = n < t.cols && r0 + r < t.depth;
      Bs[n][r] = inside ? t.b[(r0 + r) * t.b_sr + n * t.b_sn] : zero;
    }
    __syncthreads();

    if constexpr (kMma) {
      const int wm = warp / 2, wn = warp % 2, group = lane / 4, pair = (lane % 4) * 2;
#pragma unroll
      for (int ks = 0; ks < BK; ks += 16) {
        uint32_t afrag[2][4], bfrag[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int row = wm * 32 + mi * 16 + group;
          afrag[mi][0] = *reinterpret_cast<const uint32_t*>(&As[row][ks + pair]);
          afrag[mi][1] = *reinterpret_cast<const uint32_t*>(&As[row + 8][ks + pair]);
          afrag[mi][2] = *reinterpret_cast<const uint32_t*>(&As[row][ks + pair + 8]);
          afrag[mi][3] = *reinterpret_cast<const uint32_t*>(&As[row + 8][ks + pair + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + group;
          bfrag[ni][0] = *reinterpret_cast<const uint32_t*>(&Bs[col][ks + pair]);
          bfrag[ni][1] = *reinterpret_cast<const uint32_t*>(&Bs[col][ks + pair + 8]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_16816<T>(mma_acc[mi][ni], afrag[mi], bfrag[ni]);
      }
    } else {
      const int ty = tid / 16, tx = tid % 16;
#pragma unroll 4
      for (int r = 0; r < BK; ++r) {
        A av[8], bv[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) av[i] = to_acc(As[ty * 8 + i][r]);
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = to_acc(Bs[tx * 4 + j][r]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  auto store = [&](int i, int n, A v) {
    if (i < t.rows && n < t.cols) {
      if (t.bias != nullptr) v += to_acc(t.bias[n]);
      t.c[i * t.c_si + n] = from_acc<T>(v);
    }
  };
  if constexpr (kMma) {
    const int wm = warp / 2, wn = warp % 2, group = lane / 4, pair = (lane % 4) * 2;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          store(wm * 32 + mi * 16 + group + (c >= 2 ? 8 : 0), wn * 32 + ni * 8 + pair + (c & 1),
                A(mma_acc[mi][ni][c]));
        }
  } else {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) store(ty * 8 + i, tx * 4 + j, acc[i][j]);
  }
}

// Where each operand of a tile has its unit stride, for the pipelined path: A along r (x,
// grad_out) or along i (x^T in grad_w); B along n (w) or along r (w^T, or a w given with unit
// stride along K). kGeneric: the register-staged gemm_tile, any strides.
enum Layout : int { kGeneric = 0, kARowsBCols = 1, kARowsBRows = 2, kAColsBCols = 3 };

// Block tiles: rows x columns of the output, warps as a grid, threads. The register-staged
// tile is always Small; the pipelined one is Large for big problems (see the launchers).
template <int kRows, int kCols, int kWarpRows, int kWarpCols>
struct TileShape {
  static constexpr int BM = kRows, BN = kCols, kWarpsM = kWarpRows, kWarpsN = kWarpCols;
  static constexpr int kThreads = 32 * kWarpRows * kWarpCols;
  static constexpr int MI = kRows / kWarpRows / 16, NI = kCols / kWarpCols / 8;  // mma tiles
};
using SmallTile = TileShape<BM, BN, 2, 2>;  // a warp: 32 x 32
static_assert(kGroupedMmMaxCols == 65535LL * SmallTile::BN, "column tiles fill gridDim.y");
using LargeTile = TileShape<128, 128, 2, 4>;  // a warp: 64 x 32

constexpr int kStages = 2;

// The tensor-core tile with operands copied by cp.async (16 bytes per copy) into a two-stage
// ring, so that step s + 1's copies fly while step s computes, and fragments read by ldmatrix
// (.trans for an operand whose unit stride is not the reduction). Each operand stage is
// stored with its unit-stride dimension contiguous, rows padded by 8 elements (80, 144 or 272
// bytes: the 8 rows of an ldmatrix fall in distinct 16-byte bank groups). Requires, checked by
// the launcher: 16-bit T, 16-byte aligned operands, and unit-stride extents and the other
// strides multiples of 8, so that every copy is a whole in-bounds or a whole zero-filled pack.
template <typename T, bool kAAlongI, bool kBAlongR, typename Shape>
__device__ void gemm_tile_pipelined(const Tile<T>& t) {
  static_assert(kSixteenBit<T>, "tensor-core path: 16-bit operands");
  constexpr int TM = Shape::BM, TN = Shape::BN, kThreadsHere = Shape::kThreads;
  constexpr int MI = Shape::MI, NI = Shape::NI;
  static_assert(NI % 2 == 0, "B fragments come in pairs of 8-column tiles");
  // One operand's stage: [rows][32 + 8] or [32][rows + 8], whichever way it is stored.
  constexpr int kAElems = TM * (BK + kPad) > BK * (TM + kPad) ? TM * (BK + kPad)
                                                               : BK * (TM + kPad);
  constexpr int kBElems = TN * (BK + kPad) > BK * (TN + kPad) ? TN * (BK + kPad)
                                                               : BK * (TN + kPad);
  alignas(16) __shared__ T stage_a[kStages][kAElems];
  alignas(16) __shared__ T stage_b[kStages][kBElems];
  // The launchers take this path only where runs_sm80_code says so.
  SMOE_DEVICE_CHECK(has_mma(), "smoe_ops.grouped_mm: the pipelined path needs sm_80 or newer\n");
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / Shape::kWarpsN, wn = warp % Shape::kWarpsN;
  // Element offsets in a stage: A (row i, reduction r), B (column n, reduction r).
  auto a_at = [](int i, int r) { return kAAlongI ? r * (TM + kPad) + i : i * (BK + kPad) + r; };
  auto b_at = [](int n, int r) { return kBAlongR ? n * (BK + kPad) + r : r * (TN + kPad) + n; };

  // Packs of 8 elements: TM * BK / 8 for A and TN * BK / 8 for B per step.
  auto copy_step = [&](int stage, int64_t r0) {
    constexpr int kPacksR = BK / 8;
#pragma unroll
    for (int c = tid; c < TM * BK / 8; c += kThreadsHere) {
      // Along r: pack (i = c / 4, r = 8 (c % 4)); along i: pack (r = c / (TM / 8), i = 8 (..)).
      const int ai = kAAlongI ? 8 * (c % (TM / 8)) : c / kPacksR;
      const int ar = kAAlongI ? c / (TM / 8) : 8 * (c % kPacksR);
      const bool ok = ai < t.rows && r0 + ar < t.depth;
      const T* src = ok ? t.a + ai * t.a_si + (r0 + ar) * t.a_sr : t.a;
      cp_async_16(&stage_a[stage][a_at(ai, ar)], src, ok);
    }
#pragma unroll
    for (int c = tid; c < TN * BK / 8; c += kThreadsHere) {
      // Along n: pack (r = c / (TN / 8), n = 8 (..)); along r: pack (n = c / 4, r = 8 (c % 4)).
      const int bn = kBAlongR ? c / kPacksR : 8 * (c % (TN / 8));
      const int br = kBAlongR ? 8 * (c % kPacksR) : c / (TN / 8);
      const bool ok = bn < t.cols && r0 + br < t.depth;
      const T* src = ok ? t.b + (r0 + br) * t.b_sr + bn * t.b_sn : t.b;
      cp_async_16(&stage_b[stage][b_at(bn, br)], src, ok);
    }
    cp_async_commit();
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;

  const int64_t steps = ceil_div(t.depth, BK);
  if (steps > 0) copy_step(0, 0);
  // ldmatrix: lane names row lane % 8 of matrix lane / 8 (matrix bit 0 and bit 1 pick the
  // 8-row / 8-column halves of a 16 x 16 fragment, in mma's register order).
  const int mat = lane / 8, mat_row = lane % 8;
  for (int64_t step = 0; step < steps; ++step) {
    const int stage = int(step % kStages);
    if (step + 1 < steps) {
      copy_step(int((step + 1) % kStages), (step + 1) * BK);
      cp_async_wait<1>();  // this step's group has landed; the next one may fly
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this stage are visible
    const T* sa = stage_a[stage];
    const T* sb = stage_b[stage];
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t afrag[MI][4], bfrag[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int i0 = wm * (TM / Shape::kWarpsM) + mi * 16;
        // a0..a3: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15).
        if constexpr (kAAlongI) {
          ldmatrix_x4<true>(afrag[mi],
                            &sa[a_at(i0 + (mat & 1) * 8, ks + (mat >> 1) * 8 + mat_row)]);
        } else {
          ldmatrix_x4<false>(afrag[mi],
                             &sa[a_at(i0 + (mat & 1) * 8 + mat_row, ks + (mat >> 1) * 8)]);
        }
      }
#pragma unroll
      for (int nb = 0; nb < NI / 2; ++nb) {
        const int n0 = wn * (TN / Shape::kWarpsN) + nb * 16;
        // Registers: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        uint32_t r[4];
        if constexpr (kBAlongR) {
          ldmatrix_x4<false>(r, &sb[b_at(n0 + (mat >> 1) * 8 + mat_row, ks + (mat & 1) * 8)]);
        } else {
          ldmatrix_x4<true>(r, &sb[b_at(n0 + (mat >> 1) * 8, ks + (mat & 1) * 8 + mat_row)]);
        }
        bfrag[2 * nb][0] = r[0];
        bfrag[2 * nb][1] = r[1];
        bfrag[2 * nb + 1][0] = r[2];
        bfrag[2 * nb + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], afrag[mi], bfrag[ni]);
    }
    __syncthreads();  // the stage is read before the copy two steps on overwrites it
  }

  const int group = lane / 4, pair = (lane % 4) * 2;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = wm * (TM / Shape::kWarpsM) + mi * 16 + group + (c >= 2 ? 8 : 0);
        const int n = wn * (TN / Shape::kWarpsN) + ni * 8 + pair + (c & 1);
        if (i < t.rows && n < t.cols) {
          float v = acc[mi][ni][c];
          if (t.bias != nullptr) v += to_acc(t.bias[n]);
          t.c[i * t.c_si + n] = from_acc<T>(v);
        }
      }
}

// The tile with the loader and shape the launcher chose (kGeneric: SmallTile only).
template <typename T, int kLayout, typename Shape>
__device__ __forceinline__ void run_tile(const Tile<T>& t) {
  if constexpr (kLayout == kGeneric || !kSixteenBit<T>) {
    static_assert(std::is_same_v<Shape, SmallTile>, "the register-staged tile is 64 x 64");
    gemm_tile<T>(t);
  } else {
    gemm_tile_pipelined<T, kLayout == kAColsBCols, kLayout == kARowsBRows, Shape>(t);
  }
}

// Checks offsets (offsets[0] = 0, non-decreasing, offsets[E] = N) and writes
// tile_prefix[e] = sum over experts before e of ceil(rows / tile_rows), tile_prefix[E] the
// total. One thread: E is small next to the GEMM, and the check wants the serial order anyway.
__global__ void row_tiles_kernel(const int64_t* offsets, int64_t E, int64_t N, int64_t tile_rows,
                                 int32_t* tile_prefix) {
  if (threadIdx.x != 0) return;
  SMOE_DEVICE_CHECK(offsets[0] == 0, "smoe_ops.grouped_mm: offsets[0] must be 0, got %lld\n",
                    (long long)offsets[0]);
  int64_t tiles = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = offsets[e], end = offsets[e + 1];
    SMOE_DEVICE_CHECK(end >= begin,
                      "smoe_ops.grouped_mm: offsets must be non-decreasing, got offsets[%lld] = "
                      "%lld < offsets[%lld] = %lld\n",
                      (long long)(e + 1), (long long)end, (long long)e, (long long)begin);
    tile_prefix[e] = static_cast<int32_t>(tiles);
    tiles += (end - begin + tile_rows - 1) / tile_rows;
  }
  SMOE_DEVICE_CHECK(offsets[E] == N,
                    "smoe_ops.grouped_mm: offsets[%lld] must equal x.shape[0] (%lld), got %lld\n",
                    (long long)E, (long long)N, (long long)offsets[E]);
  tile_prefix[E] = static_cast<int32_t>(tiles);
}

template <typename T, int kLayout, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads)
    grouped_rows_kernel(const T* a, const T* b, int64_t b_se, int64_t b_sk, int64_t b_sm,
                        const T* bias, const int64_t* offsets, const int32_t* tile_prefix,
                        int64_t K, int64_t M, int64_t E, T* out) {
  const int32_t item = static_cast<int32_t>(blockIdx.x);
  if (item >= tile_prefix[E]) return;
  // The expert e with tile_prefix[e] <= item < tile_prefix[e + 1] (empty experts skipped).
  int64_t lo = 0, hi = E - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_prefix[mid] <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t e = lo;
  constexpr int TM = Shape::BM, TN = Shape::BN;
  const int64_t row0 = offsets[e] + int64_t(item - tile_prefix[e]) * TM;
  const int64_t row_end = offsets[e + 1];
  const int64_t n0 = int64_t(blockIdx.y) * TN;
  Tile<T> t;
  t.a = a + row0 * K;
  t.a_si = K;
  t.a_sr = 1;
  t.b = b + e * b_se + n0 * b_sm;
  t.b_sr = b_sk;
  t.b_sn = b_sm;
  t.rows = row_end - row0 < TM ? row_end - row0 : TM;
  t.cols = M - n0 < TN ? M - n0 : TN;
  t.depth = K;
  t.c = out + row0 * M + n0;
  t.c_si = M;
  t.bias = bias != nullptr ? bias + e * M + n0 : nullptr;
  run_tile<T, kLayout, Shape>(t);
}

template <typename T, int kLayout, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads)
    grad_w_kernel(const T* x, const T* grad_out, const int64_t* offsets, int64_t K, int64_t M,
                  int64_t tiles_m, int64_t tiles_per_expert, T* grad_w) {
  constexpr int TM = Shape::BM, TN = Shape::BN;
  const int64_t e = blockIdx.x / tiles_per_expert, tile = blockIdx.x % tiles_per_expert;
  const int64_t i0 = (tile / tiles_m) * TM, n0 = (tile % tiles_m) * TN;
  const int64_t begin = offsets[e], end = offsets[e + 1];
  Tile<T> t;
  t.a = x + begin * K + i0;  // a[i, r] = x[begin + r, i0 + i]
  t.a_si = 1;
  t.a_sr = K;
  t.b = grad_out + begin * M + n0;  // b[r, n] = grad_out[begin + r, n0 + n]
  t.b_sr = M;
  t.b_sn = 1;
  t.rows = K - i0 < TM ? K - i0 : TM;
  t.cols = M - n0 < TN ? M - n0 : TN;
  t.depth = end - begin;
  t.c = grad_w + e * K * M + i0 * M + n0;
  t.c_si = M;
  t.bias = nullptr;
  run_tile<T, kLayout, Shape>(t);
}

// grad_bias[e, n] = sum of grad_out[r, n] over expert e's rows: a thread per (expert, column),
// its rows in sequence (coalesced across the warp's columns).
// TODO: split an expert's rows over several blocks (partial sums, then one reduction) if a
// GPU profile shows this kernel: with one expert holding most rows and few columns (M of a few
// hundred) only a few warps run, each a long chain of dependent loads.
template <typename T>
__global__ void grad_bias_kernel(const T* grad_out, const int64_t* offsets, int64_t M,
                                 int64_t col_blocks, T* grad_bias) {
  using A = acc_t<T>;
  const int64_t e = blockIdx.x / col_blocks;
  const int64_t n = (blockIdx.x % col_blocks) * int64_t(blockDim.x) + threadIdx.x;
  if (n >= M) return;
  A acc = 0;
  for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) acc += to_acc(grad_out[r * M + n]);
  grad_bias[e * M + n] = from_acc<T>(acc);
}

// The pipelined path's conditions: whole 8-element (16-byte) packs, 16-byte aligned bases.
bool packs(int64_t elems) { return elems % 8 == 0; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The current device runs sm_80+ code of this module (one module, so any of its kernels
// answers): a build for older architectures (TORCH_CUDA_ARCH_LIST="7.5") compiles the
// pipelined tile without tensor cores, so the register-staged one must serve. Both versions
// count: binaryVersion is the machine code the driver loaded, ptxVersion the virtual
// architecture it was compiled from (__CUDA_ARCH__), which is lower when the driver compiled
// an older build's PTX for a newer card ("7.5+PTX" on an H100: 90 and 75, no tensor cores).
// Asked once per device.
bool runs_sm80_code() {
  auto ask = []() -> int64_t {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(row_tiles_kernel)) !=
        cudaSuccess) {
      cudaGetLastError();  // clear it: the register-staged tile serves
      return 0;
    }
    return attributes.binaryVersion >= 80 && attributes.ptxVersion >= 80;
  };
  return once_per_device(ask) == 1;
}

// The offsets check, and the prefix of row tiles of tile_rows rows per expert in workspace.
cudaError_t launch_row_tiles(const int64_t* offsets, int64_t N, int64_t E, int64_t tile_rows,
                             int32_t* workspace, cudaStream_t stream) {
  SMOE_LAUNCH(1, 32, 0, stream, row_tiles_kernel)(offsets, E, N, tile_rows, workspace);
  return cudaGetLastError();
}

}  // namespace

int64_t grouped_mm_workspace_elems(int64_t E) { return E + 1; }

cudaError_t grouped_mm_check_offsets(const int64_t* offsets, int64_t N, int64_t E,
                                     int32_t* workspace, cudaStream_t stream) {
  return launch_row_tiles(offsets, N, E, BM, workspace, stream);
}

// Large tiles (128 x 128, 8 warps) for the pipelined path when the problem fills them: an
// average of at least 128 rows per expert and at least 128 columns (twice the work per byte
// staged of a 64 x 64 tile: BM BN / (BM + BN) = 64 against 32); small ones otherwise, where a
// 128-row tile would be mostly padding.
// TODO: the threshold is a guess: set it once gpu_check.sh has measured both tiles on a GPU.
bool large_tiles(int64_t rows, int64_t groups, int64_t cols) {
  return rows >= int64_t(LargeTile::BM) * groups && cols >= LargeTile::BN;
}

cudaError_t grouped_mm(DType dtype, const void* a, const void* b, int64_t b_se, int64_t b_sk,
                       int64_t b_sm, const void* bias, const int64_t* offsets, int64_t N,
                       int64_t K, int64_t M, int64_t E, int32_t* workspace, void* out,
                       cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto launch = [&](auto layout, auto shape) -> cudaError_t {
      using Shape = decltype(shape);
      const cudaError_t err = launch_row_tiles(offsets, N, E, Shape::BM, workspace, stream);
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(ceil_div(N, Shape::BM) + E),
                      static_cast<unsigned>(ceil_div(M, Shape::BN)));
      SMOE_LAUNCH(grid, Shape::kThreads, 0, stream,
                  grouped_rows_kernel<T, decltype(layout)::value, Shape>)(
          static_cast<const T*>(a), static_cast<const T*>(b), b_se, b_sk, b_sm,
          static_cast<const T*>(bias), offsets, workspace, K, M, E, static_cast<T*>(out));
      return cudaGetLastError();
    };
    if constexpr (kSixteenBit<T>) {
      if (!runs_sm80_code()) {
        return launch(std::integral_constant<int, kGeneric>{}, SmallTile{});
      }
      auto pipelined = [&](auto layout) {
        return large_tiles(N, E, M) ? launch(layout, LargeTile{}) : launch(layout, SmallTile{});
      };
      // a [N, K] is row-major; b's unit stride is along M (w) or along K (w^T).
      const bool a_ok = packs(K) && aligned16(a) && packs(b_se) && aligned16(b);
      if (a_ok && b_sm == 1 && packs(M) && packs(b_sk)) {
        return pipelined(std::integral_constant<int, kARowsBCols>{});
      }
      if (a_ok && b_sk == 1 && packs(b_sm)) {
        return pipelined(std::integral_constant<int, kARowsBRows>{});
      }
    }
    return launch(std::integral_constant<int, kGeneric>{}, SmallTile{});
  });
}

cudaError_t grouped_mm_grad_w(DType dtype, const void* x, const void* grad_out,
                              const int64_t* offsets, int64_t N, int64_t K, int64_t M, int64_t E,
                              void* grad_w, cudaStream_t stream) {
  (void)N;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto launch = [&](auto layout, auto shape) -> cudaError_t {
      using Shape = decltype(shape);
      const int64_t tiles_m = ceil_div(M, Shape::BN);
      const int64_t tiles = ceil_div(K, Shape::BM) * tiles_m;
      SMOE_LAUNCH(static_cast<unsigned>(E * tiles), Shape::kThreads, 0, stream,
                  grad_w_kernel<T, decltype(layout)::value, Shape>)(
          static_cast<const T*>(x), static_cast<const T*>(grad_out), offsets, K, M, tiles_m,
          tiles, static_cast<T*>(grad_w));
      return cudaGetLastError();
    };
    if constexpr (kSixteenBit<T>) {
      // x^T has its unit stride along K (the tile's rows), grad_out along M (its columns).
      if (packs(K) && packs(M) && aligned16(x) && aligned16(grad_out) &&
          runs_sm80_code()) {
        constexpr auto layout = std::integral_constant<int, kAColsBCols>{};
        return large_tiles(K, 1, M) ? launch(layout, LargeTile{}) : launch(layout, SmallTile{});
      }
    }
    return launch(std::integral_constant<int, kGeneric>{}, SmallTile{});
  });
}

cudaError_t grouped_mm_grad_bias(DType dtype, const void* grad_out, const int64_t* offsets,
                                 int64_t N, int64_t M, int64_t E, void* grad_bias,
                                 cudaStream_t stream) {
  (void)N;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t col_blocks = ceil_div(M, 256);
    SMOE_LAUNCH(static_cast<unsigned>(E * col_blocks), 256, 0, stream, grad_bias_kernel<T>)(
        static_cast<const T*>(grad_out), offsets, M, col_blocks, static_cast<T*>(grad_bias));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace smoe
