// The CUDA emulator's runtime: fibers, the block scheduler, barriers, warp collectives, the
// m16n8k16 tensor-core product, and the error state. The model is in cuda_emulator.h.
#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "cuda/emulator/cuda_emulator.h"

namespace smoe {
namespace emu {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
// Enough for the kernels' register arrays and printf-sized formatting; pages are touched
// lazily, so 1024 threads reserve address space, not memory.
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kBlocked, kDone };

struct Fiber {
  ucontext_t context;
  ThreadIndex index;
  int tid = 0, lane = 0, warp = 0;
  uint64_t priority = 0;  // the scheduler's preference (see run_grid)
  // cp.async copies not yet landed: (destination, 16 bytes or valid = false), by group; the
  // last group is the open one (not yet committed).
  struct Copy {
    void* to;
    unsigned char bytes[16];
    bool valid;
  };
  std::vector<std::vector<Copy>> copy_groups;
  State state = State::kDone;
  bool at_barrier = false;
};

struct LaneSlot {
  bool waiting = false;
  Collective kind = Collective::kSyncWarp;
  unsigned mask = 0;
  uint32_t in[kMaxWords] = {}, out[kMaxWords] = {};
};

// A fiber's stack, with an inaccessible guard page below it: a kernel that overflows its stack
// faults at once instead of writing over whatever mapping lies below (another fiber's stack,
// or a tensor), which would corrupt later, unrelated work in the process.
struct Stack {
  void* mapping = nullptr;
  void* base = nullptr;  // kStackBytes usable, above the guard page
  size_t guard = 0;
  Stack() {
    guard = size_t(sysconf(_SC_PAGESIZE));
    mapping = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED || mprotect(mapping, guard, PROT_NONE) != 0) {
      std::fprintf(stderr, "smoe_ops CUDA emulator: cannot map a fiber stack\n");
      std::abort();
    }
    base = static_cast<char*>(mapping) + guard;
  }
  ~Stack() { munmap(mapping, guard + kStackBytes); }
};

// The state of the grid being run. Launches are serialized (g_launch_mutex), so one exists.
struct Grid {
  const std::function<void()>* body = nullptr;
  const char* kernel_name = "";
  std::vector<Fiber> fibers;
  std::vector<std::array<LaneSlot, kWarp>> warps;
  int threads = 0, live = 0, arrived = 0;
  std::vector<int> ready;  // fibers that may run, in no order: the scheduler draws from it
  Fiber* current = nullptr;
  ucontext_t scheduler;
  bool failed = false;
  std::string error;
};

std::mutex g_launch_mutex;
Grid* g_grid = nullptr;
std::vector<std::unique_ptr<Stack>> g_stacks;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

void yield_to_scheduler() {
  Fiber* f = g_grid->current;
  swapcontext(&f->context, &g_grid->scheduler);
}

// Ends the calling fiber's launch with `message`: the scheduler stops the grid.
[[noreturn]] void fail(const std::string& message) {
  Grid& g = *g_grid;
  if (!g.failed) {
    g.failed = true;
    g.error = message;
  }
  g.current->state = State::kDone;
  yield_to_scheduler();
  std::abort();  // a failed grid never resumes its fibers
}

std::string where() {
  const Fiber& f = *g_grid->current;
  char text[160];
  std::snprintf(text, sizeof(text), "%s, block (%u, %u, %u), thread (%u, %u, %u)",
                g_grid->kernel_name, f.index.block.x, f.index.block.y, f.index.block.z,
                f.index.thread.x, f.index.thread.y, f.index.thread.z);
  return text;
}

void make_ready(Fiber& f) {
  f.state = State::kReady;
  g_grid->ready.push_back(f.tid);
}

void release_barrier_if_complete() {
  Grid& g = *g_grid;
  if (g.arrived == 0 || g.arrived < g.live) return;
  for (Fiber& f : g.fibers) {
    if (f.at_barrier) {
      f.at_barrier = false;
      make_ready(f);
    }
  }
  g.arrived = 0;
}

void fiber_entry() {
  Grid& g = *g_grid;
  (*g.body)();
  g.current->state = State::kDone;
  --g.live;
  release_barrier_if_complete();
  // Returning resumes uc_link, the scheduler.
}

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kSyncWarp:
      return "__syncwarp";
    case Collective::kShuffleXor:
      return "__shfl_xor_sync";
    case Collective::kMatchAny:
      return "__match_any_sync";
    case Collective::kMmaBf16:
      return "mma.sync.m16n8k16.bf16";
    case Collective::kMmaF16:
      return "mma.sync.m16n8k16.f16";
    case Collective::kLdMatrix:
      return "ldmatrix.x4";
    case Collective::kLdMatrixTrans:
      return "ldmatrix.x4.trans";
  }
  return "?";
}

float unpack_half(uint32_t word, int half, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu);
  return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// D = A B + C for the warp, from each lane's fragments, in the layout the PTX ISA gives for
// mma.m16n8k16 with 16-bit inputs: groupID = lane / 4, tig = lane % 4;
//   A (16 x 16) element a_i, i < 8, of register i / 2 (low half first): row groupID (+ 8 for
//     i in {2, 3, 6, 7}), column 2 tig + (i & 1) (+ 8 for i >= 4);
//   B (16 x 8) element b_i, i < 4: row 2 tig + (i & 1) (+ 8 for i >= 2), column groupID;
//   C, D (16 x 8) element c_i, i < 4: row groupID (+ 8 for i >= 2), column 2 tig + (i & 1).
// Words per lane: a in[0:4], b in[4:6], c in[6:10] (float bits); d out[0:4].
void mma_fire(std::array<LaneSlot, kWarp>& slots, bool bf16) {
  float A[16][16], B[16][8], C[16][8];
  int seen_a[16][16] = {}, seen_b[16][8] = {}, seen_c[16][8] = {};
  for (int lane = 0; lane < kWarp; ++lane) {
    const int group = lane / 4, tig = lane % 4;
    const uint32_t* in = slots[lane].in;
    for (int i = 0; i < 8; ++i) {
      const bool low_row = i < 2 || (i >= 4 && i < 6);
      const int row = group + (low_row ? 0 : 8);
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = unpack_half(in[i / 2], i & 1, bf16);
      ++seen_a[row][col];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = unpack_half(in[4 + i / 2], i & 1, bf16);
      ++seen_b[row][group];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      std::memcpy(&C[row][col], &in[6 + i], sizeof(float));
      ++seen_c[row][col];
    }
  }
  // The layout covers every element exactly once (a check of this table, not the kernel).
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      if (seen_a[r][c] != 1) std::abort();
    }
    for (int c = 0; c < 8; ++c) {
      if (seen_b[r][c] != 1 || seen_c[r][c] != 1) std::abort();
    }
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    const int group = lane / 4, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      // Products of 16-bit values are exact in float; the sum is taken in k order.
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      std::memcpy(&slots[lane].out[i], &acc, sizeof(float));
    }
  }
}

// Each lane's word 0-1 is the address of a 16-byte row: lanes 8 i .. 8 i + 7 give the rows of
// matrix i. Out word i of lane l: matrix i's elements (l / 4, 2 (l % 4) + {0, 1}), low half
// first, or with trans (2 (l % 4) + {0, 1}, l / 4).
void ldmatrix_fire(std::array<LaneSlot, kWarp>& slots, bool trans) {
  uint16_t m[4][8][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    uint64_t address;
    std::memcpy(&address, slots[lane].in, sizeof(address));
    std::memcpy(m[lane / 8][lane % 8], reinterpret_cast<const void*>(address), 16);
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = trans ? m[i][col][row] : m[i][row][col];
      const uint16_t hi = trans ? m[i][col + 1][row] : m[i][row][col + 1];
      slots[lane].out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

// All lanes in `mask` of warp `warp` wait at a collective of one kind and mask: compute it and
// make them ready. Returns without effect while some lane has yet to arrive.
void try_fire(int warp, Collective kind, unsigned mask) {
  Grid& g = *g_grid;
  auto& slots = g.warps[warp];
  const int warp_base = warp * kWarp;
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    const int tid = warp_base + lane;
    if (tid >= g.threads || g.fibers[tid].state == State::kDone) {
      fail(where() + ": " + collective_name(kind) + " with mask " + std::to_string(mask) +
           " names lane " + std::to_string(lane) + ", which " +
           (tid >= g.threads ? "does not exist" : "has exited"));
    }
    const LaneSlot& s = slots[lane];
    // A lane waiting in a collective with another mask (disjoint groups, each calling
    // __syncwarp(its own mask), is valid CUDA) is not there yet; a deadlock, if it comes to
    // that, is reported by the scheduler.
    if (!s.waiting || s.mask != mask) return;
    if (s.kind != kind) {
      fail(where() + ": lanes meet in different warp collectives: " + collective_name(kind) +
           " (mask " + std::to_string(mask) + ") and " + collective_name(s.kind) + " (mask " +
           std::to_string(s.mask) + ") in lane " + std::to_string(lane));
    }
  }
  switch (kind) {
    case Collective::kSyncWarp:
      break;
    case Collective::kShuffleXor:
      for (int lane = 0; lane < kWarp; ++lane) {
        if (!((mask >> lane) & 1u)) continue;
        // A source past the warp gives the caller its own value, as on the GPU.
        const int xor_mask = static_cast<int>(slots[lane].in[2]);
        const int source = (lane ^ xor_mask) < kWarp ? lane ^ xor_mask : lane;
        if (!((mask >> source) & 1u)) {
          fail(where() + ": __shfl_xor_sync in lane " + std::to_string(lane) + " reads lane " +
               std::to_string(source) + ", outside the mask " + std::to_string(mask) +
               " (its value is undefined)");
        }
        slots[lane].out[0] = slots[source].in[0];
        slots[lane].out[1] = slots[source].in[1];
      }
      break;
    case Collective::kMatchAny:
      for (int lane = 0; lane < kWarp; ++lane) {
        if (!((mask >> lane) & 1u)) continue;
        uint32_t same = 0;
        for (int other = 0; other < kWarp; ++other) {
          if (((mask >> other) & 1u) && slots[other].in[0] == slots[lane].in[0] &&
              slots[other].in[1] == slots[lane].in[1]) {
            same |= 1u << other;
          }
        }
        slots[lane].out[0] = same;
      }
      break;
    case Collective::kMmaBf16:
    case Collective::kMmaF16:
      if (mask != 0xffffffffu) fail(where() + ": mma.sync needs all 32 lanes");
      mma_fire(slots, kind == Collective::kMmaBf16);
      break;
    case Collective::kLdMatrix:
    case Collective::kLdMatrixTrans:
      if (mask != 0xffffffffu) fail(where() + ": ldmatrix needs all 32 lanes");
      ldmatrix_fire(slots, kind == Collective::kLdMatrixTrans);
      break;
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    slots[lane].waiting = false;
    make_ready(g.fibers[warp_base + lane]);
  }
}

bool valid_config(const LaunchConfig& c, std::string& why) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) {
    why = "a grid dimension is 0";
  } else if (c.grid.x > 2147483647u || c.grid.y > 65535u || c.grid.z > 65535u) {
    why = "the grid exceeds (2^31 - 1, 65535, 65535)";
  } else if (threads == 0 || threads > uint64_t(kMaxThreads) || c.block.z > 64u) {
    why = "the block has " + std::to_string(threads) + " threads, expected 1 to 1024";
  } else if (c.shared_bytes > 48 * 1024) {
    why = "dynamic shared memory over 48 KiB needs an opt-in the kernels do not make";
  } else {
    return true;
  }
  return false;
}

uint64_t schedule_seed() {
  const char* text = std::getenv("SMOE_CUDA_EMULATOR_SEED");
  return text != nullptr ? std::strtoull(text, nullptr, 10) : 1;
}

void set_error(cudaError_t error, const std::string& message) {
  if (g_last_error == cudaSuccess) g_last_error = error;
  g_last_message = message;
}

}  // namespace

const ThreadIndex& self() { return g_grid->current->index; }

int binary_version() {
  const char* text = std::getenv("SMOE_CUDA_EMULATOR_ARCH");
  return text != nullptr ? int(std::strtol(text, nullptr, 10)) : 90;
}

int ptx_version() {
  const char* text = std::getenv("SMOE_CUDA_EMULATOR_PTX");
  return text != nullptr ? int(std::strtol(text, nullptr, 10)) : binary_version();
}

void syncthreads() {
  Grid& g = *g_grid;
  Fiber* f = g.current;
  f->at_barrier = true;
  f->state = State::kBlocked;
  ++g.arrived;
  release_barrier_if_complete();
  yield_to_scheduler();
}

void warp_collective(Collective kind, unsigned mask, const uint32_t* in, uint32_t* out) {
  Grid& g = *g_grid;
  Fiber* f = g.current;
  if (!((mask >> f->lane) & 1u)) {
    fail(where() + ": " + collective_name(kind) + " with mask " + std::to_string(mask) +
         " leaves out the calling lane " + std::to_string(f->lane));
  }
  LaneSlot& s = g.warps[f->warp][f->lane];
  s.waiting = true;
  s.kind = kind;
  s.mask = mask;
  std::memcpy(s.in, in, sizeof(s.in));
  f->state = State::kBlocked;
  try_fire(f->warp, kind, mask);
  yield_to_scheduler();
  std::memcpy(out, s.out, sizeof(s.out));
}

void trap(const char* format, ...) {
  char text[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof(text), format, args);
  va_end(args);
  std::string message(text);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  fail(message + " [device check in " + where() + "]");
}

void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t in[kMaxWords] = {}, out[kMaxWords] = {};
  std::memcpy(in, a, sizeof(a));
  std::memcpy(in + 4, b, sizeof(b));
  std::memcpy(in + 6, d, sizeof(d));
  warp_collective(bf16 ? Collective::kMmaBf16 : Collective::kMmaF16, 0xffffffffu, in, out);
  std::memcpy(d, out, sizeof(d));
}

void ldmatrix_x4(bool trans, uint32_t (&r)[4], const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    fail(where() + ": ldmatrix row address is not 16-byte aligned");
  }
  uint32_t in[kMaxWords] = {}, out[kMaxWords] = {};
  const uint64_t address = reinterpret_cast<uintptr_t>(row);
  std::memcpy(in, &address, sizeof(address));
  warp_collective(trans ? Collective::kLdMatrixTrans : Collective::kLdMatrix, 0xffffffffu, in,
                  out);
  std::memcpy(r, out, sizeof(r));
}

void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail(where() + ": a " + std::to_string(bytes) + "-byte access is not " +
         std::to_string(bytes) + "-byte aligned");
  }
}

void cp_async_16(void* shared, const void* global, bool valid) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(global) % 16 != 0)) {
    fail(where() + ": cp.async of 16 bytes needs 16-byte aligned addresses");
  }
  Fiber& f = *g_grid->current;
  if (f.copy_groups.empty()) f.copy_groups.emplace_back();
  Fiber::Copy copy{shared, {}, valid};
  // The source is read at the copy (the kernels never write a source they copy from). The
  // destination is poisoned (all ones: NaN in every float type) until the copy lands: a read
  // of it before the wait, or by a thread still using the old contents, sees NaN.
  if (valid) std::memcpy(copy.bytes, global, 16);
  std::memset(shared, 0xff, 16);
  f.copy_groups.back().push_back(copy);
}

void cp_async_commit() {
  Fiber& f = *g_grid->current;
  if (f.copy_groups.empty()) f.copy_groups.emplace_back();
  f.copy_groups.emplace_back();  // the next open group
}

void cp_async_wait(int pending_groups) {
  Fiber& f = *g_grid->current;
  // Committed groups are all but the last (open) one; keep the newest `pending_groups`.
  const int committed = f.copy_groups.empty() ? 0 : int(f.copy_groups.size()) - 1;
  const int land = committed - pending_groups;
  for (int g = 0; g < land; ++g) {
    for (const Fiber::Copy& copy : f.copy_groups[g]) {
      if (copy.valid) {
        std::memcpy(copy.to, copy.bytes, 16);
      } else {
        std::memset(copy.to, 0, 16);
      }
    }
  }
  if (land > 0) f.copy_groups.erase(f.copy_groups.begin(), f.copy_groups.begin() + land);
}

std::string last_error_message() { return g_last_message; }

void run_grid(const LaunchConfig& config, const char* kernel_name,
              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::string why;
  if (!valid_config(config, why)) {
    set_error(cudaErrorInvalidConfiguration,
              std::string(kernel_name) + ": invalid launch configuration: " + why);
    return;
  }
  Grid grid;
  grid.body = &body;
  grid.kernel_name = kernel_name;
  const dim3 b = config.block;
  grid.threads = int(b.x * b.y * b.z);
  grid.fibers.resize(grid.threads);
  grid.warps.resize((grid.threads + kWarp - 1) / kWarp);
  while (int(g_stacks.size()) < grid.threads) g_stacks.push_back(std::make_unique<Stack>());
  std::mt19937_64 rng(schedule_seed());
  g_grid = &grid;
  for (unsigned bz = 0; bz < config.grid.z && !grid.failed; ++bz) {
    for (unsigned by = 0; by < config.grid.y && !grid.failed; ++by) {
      for (unsigned bx = 0; bx < config.grid.x && !grid.failed; ++bx) {
        grid.ready.clear();
        std::vector<uint64_t> warp_priority(grid.warps.size());
        for (uint64_t& p : warp_priority) p = rng() >> 32;
        for (int tid = 0; tid < grid.threads; ++tid) {
          Fiber& f = grid.fibers[tid];
          f.index = {dim3(tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)), dim3(bx, by, bz),
                     b, config.grid};
          f.tid = tid;
          f.lane = tid % kWarp;
          f.warp = tid / kWarp;
          f.priority = (warp_priority[f.warp] << 32) | (rng() >> 32);
          f.at_barrier = false;
          f.copy_groups.clear();
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = g_stacks[tid]->base;
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &grid.scheduler;
          makecontext(&f.context, fiber_entry, 0);
          make_ready(f);
        }
        for (auto& slots : grid.warps) slots = {};
        grid.live = grid.threads;
        grid.arrived = 0;
        // One ready fiber at a time: mostly the one of highest priority (warps ranked at
        // random, so that one warp runs as far ahead of the others as the barriers let it, as
        // it can on a GPU), one time in eight a ready fiber drawn uniformly.
        while (!grid.failed && !grid.ready.empty()) {
          size_t pick = rng() % grid.ready.size();
          if (rng() % 8 != 0) {
            for (size_t i = 0; i < grid.ready.size(); ++i) {
              if (grid.fibers[grid.ready[i]].priority > grid.fibers[grid.ready[pick]].priority) {
                pick = i;
              }
            }
          }
          Fiber& f = grid.fibers[grid.ready[pick]];
          grid.ready[pick] = grid.ready.back();
          grid.ready.pop_back();
          grid.current = &f;
          swapcontext(&grid.scheduler, &f.context);
        }
        if (!grid.failed && grid.live > 0) {
          grid.failed = true;
          grid.error = std::string(kernel_name) + ", block (" + std::to_string(bx) + ", " +
                       std::to_string(by) + ", " + std::to_string(bz) +
                       "): deadlock: threads wait at __syncthreads or a warp collective that "
                       "the others never reach";
        }
      }
    }
  }
  g_grid = nullptr;
  if (grid.failed) set_error(cudaErrorLaunchFailure, grid.error);
}

}  // namespace emu
}  // namespace smoe

cudaError_t cudaGetLastError() {
  const cudaError_t error = smoe::emu::g_last_error;
  smoe::emu::g_last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* func) {
  (void)func;
  *attributes = {smoe::emu::binary_version(), smoe::emu::ptx_version()};
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrMultiProcessorCount || device != 0) {
    smoe::emu::set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: not emulated");
    return cudaErrorInvalidValue;
  }
  const char* text = std::getenv("SMOE_CUDA_EMULATOR_SMS");
  *value = text != nullptr ? int(std::strtol(text, nullptr, 10)) : 2;
  return cudaSuccess;
}

cudaError_t emulated_occupancy(int* blocks, int block_size, size_t dynamic_shared_bytes) {
  if (block_size < 1 || block_size > 1024 || dynamic_shared_bytes > 48 * 1024) {
    smoe::emu::set_error(cudaErrorInvalidValue,
                         "cudaOccupancyMaxActiveBlocksPerMultiprocessor: bad block size");
    return cudaErrorInvalidValue;
  }
  *blocks = 2048 / block_size;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  (void)stream;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
