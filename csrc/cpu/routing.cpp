// routing: route (scores, group-limited top-k, renormalize, scale) and router_losses.
//
// Shapes: T tokens, E experts, k experts per token, G = E / num_groups experts per group.
//   logits:      [T, E] float32 | float64 | bfloat16 | float16 (any strides; made contiguous)
//   expert_bias: [E] float, optional (cast to the compute type)
//   weights:     [T, k] float32 (float64 for float64 logits), contiguous
//   ids:         [T, k] int32, distinct per row, by descending selection score
//   counts:      [E] int32, counts[e] = #{(t, j) : ids[t, j] = e}
//   losses:      [4] = (balance, z, entropy, batch_entropy), mean_probs: [E], weight dtype
// The compute type is float32, or float64 for float64 logits.
//
// route, per row t:
//   s = softmax(logits_t) or sigmoid(logits_t);  selection key q = s + expert_bias
//   group-limited: a group scores the sum of its top min(2, G) keys; the topk_groups best
//   groups are kept; the k best experts of the kept groups are chosen.
//   Order: (key descending, id ascending); a NaN key ranks as -inf, so ids are always valid
//   and distinct. weights w_j = s[ids_j] / max(sum_j s[ids_j], tiny) (if renormalize) * scale,
//   tiny = the smallest normal of the compute type.
// route_backward, with p_j = s[ids_j], S = sum_j p_j, g = grad_weights, w_j = p_j / S:
//   dp_j = scale * (g_j - sum_i g_i w_i) / S if renormalize (just scale * g_j / tiny while the
//   clamp is active), else scale * g_j;
//   softmax: grad[m] = s_m * ([m selected] dp_m - sum_j dp_j p_j);  sigmoid: grad[ids_j] =
//   dp_j p_j (1 - p_j).
// router_losses, with p = softmax(logits) (whatever route scored with), P = mean_t p_t,
// f = counts / (T k):  balance = E sum_e f_e P_e, z = mean_t lse_t^2,
//   entropy = mean_t H(p_t), batch_entropy = H(P), where 0 log 0 = 0.
// router_losses_backward, with (gb, gz, ge, gbe) = grad_losses, per row:
//   c_e = (gb E f_e - gbe log P_e - ge log p_te) / T;  grad_m = p_m (c_m - sum_e c_e p_e)
//   + 2 gz lse_t p_m / T; entries with p = 0 or P = 0 contribute 0 (their terms carry p).
//   The constant -1 of d(x log x) cancels under the softmax Jacobian.
//
// Threads: at::parallel_for over rows. Each row is read once and processed whole while it
// sits in L1: scores (a vectorized float32 loop, or double), then selection. float32 rows
// with no bias and no groups (sigmoid, or renormalized softmax) skip the scores: both are
// increasing, so selection runs on the logits and only the k chosen experts are scored.
// The compaction of the keys above the bound uses an AVX-512 compress where the CPU has it
// (a runtime check): the scalar loop was the largest cost of route
// (benchmarks/profile_route.py). float32 selection for k <= 16 takes a lower bound of the
// k-th key from 16 vector lanes of maxima, compacts the few keys above it, and ranks them
// with branch-free vector compares; larger k ranks every key, and more than 256 candidates
// are sorted as packed integers. float64 rows use a plain sort. counts come from a histogram
// per task, added atomically once per task.
// router_losses splits rows into fixed chunks (a function of the shape only), each with its
// own float64 partial sums, so the result does not depend on the thread count. bfloat16 /
// float16 rows are widened into a float32 buffer first.
// References: smoe_ops.reference.route, smoe_ops.reference.router_losses.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string_view>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/vec_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SMOE_HAVE_AVX512_COMPACT 1
#endif

namespace smoe {
namespace {

// Up to this many candidates, float selection ranks them all (m^2 / 16 vector compares, no
// branch on the data); beyond it, a sort (m log m, mispredicted branches) is cheaper. With
// k = E, ranking won 3x at E = 64 and lost 1.6x at E = 512; they were even near 300.
constexpr int64_t kMaxRanked = 256;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---------------------------------------------------------------------------------------
// Row math. The bodies are always_inline templates; the float instances are wrapped in
// SMOE_MULTIVERSION functions so that each clone vectorizes for its own ISA.

// Per-lane reductions keep one value per lane of a 16-wide vector: lane l takes positions l,
// l + 16, ... The tail goes through a padded block, so that every access to the lanes is a
// whole vector (a variable-length tail loop would keep the lanes in memory).
constexpr int64_t kLanes = 16;

// lane[l] = max of x[l], x[l + 16], ... (-inf for an empty lane); NaN is skipped.
template <typename T>
__attribute__((always_inline)) inline void lane_max(const T* x, int64_t n, T* out) {
  T lane[kLanes], tail[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = tail[l] = kNegInf<T>;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = x[i + l] > lane[l] ? x[i + l] : lane[l];
  }
  for (int64_t l = 0; i + l < n; ++l) tail[l] = x[i + l];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = tail[l] > lane[l] ? tail[l] : lane[l];
  std::memcpy(out, lane, sizeof(lane));
}

// e = exp(x - max x) into out; returns max x and sets *sum = sum e. A NaN is skipped by the
// max but poisons the sum, so a row with a NaN turns all NaN, as in torch.softmax.
template <typename T>
__attribute__((always_inline)) inline T exp_shifted(const T* x, T* out, int64_t n, T* sum) {
  T m = kNegInf<T>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    T e = fast_exp(x[i] - m);
    out[i] = e;
    acc += e;
  }
  *sum = acc;
  return m;
}

// Keeps the two largest of (best, second, v) in (best, second), without branches.
template <typename T>
__attribute__((always_inline)) inline void keep_top2(T v, T& best, T& second) {
  const T low = v < best ? v : best;
  best = v > best ? v : best;
  second = low > second ? low : second;
}

// score[g] = sum of the top min(2, G) keys of group g (G = group_size), NaN ranking as -inf;
// a NaN sum (+inf and -inf) too. Lane l keeps the top two of its positions in the group.
template <typename T>
__attribute__((always_inline)) inline void group_scores_body(const T* key, int64_t num_groups,
                                                             int64_t group_size, T* score) {
  for (int64_t g = 0; g < num_groups; ++g) {
    const T* member = key + g * group_size;
    T best[kLanes], second[kLanes], tail[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) best[l] = second[l] = tail[l] = kNegInf<T>;
    int64_t i = 0;
    for (; i + kLanes <= group_size; i += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const T v = member[i + l];
        keep_top2(v != v ? kNegInf<T> : v, best[l], second[l]);
      }
    }
    for (int64_t l = 0; i + l < group_size; ++l) tail[l] = member[i + l];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      keep_top2(tail[l] != tail[l] ? kNegInf<T> : tail[l], best[l], second[l]);
    }
    T top = kNegInf<T>, next = kNegInf<T>;
    for (int64_t l = 0; l < kLanes; ++l) {
      keep_top2(best[l], top, next);
      keep_top2(second[l], top, next);
    }
    const T sum = group_size == 1 ? top : top + next;
    score[g] = sum != sum ? kNegInf<T> : sum;
  }
}

template <typename T>
__attribute__((always_inline)) inline void scores_body(const T* x, T* s, int64_t n,
                                                       bool sigmoid) {
  if (sigmoid) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s[i] = T(1) / (T(1) + fast_exp(-x[i]));
    return;
  }
  T sum;
  exp_shifted(x, s, n, &sum);
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

// Row statistics of router_losses: p = softmax(x) into p, and returns the unshifted lse.
// *entropy = H(p) = log(sum) - sum_{p > 0} p (x - max): no log per element, and the shift
// keeps the cancellation small.
template <typename T>
__attribute__((always_inline)) inline T softmax_stats_body(const T* x, T* p, int64_t n,
                                                           T* entropy) {
  T sum;
  const T m = exp_shifted(x, p, n, &sum);
  const T inv = T(1) / sum;
  T weighted = 0;
#pragma omp simd reduction(+ : weighted)
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i] * inv;
    p[i] = pi;
    weighted += pi > T(0) ? pi * (x[i] - m) : T(0);
  }
  const T log_sum = std::log(sum);
  *entropy = log_sum - weighted;
  return m + log_sum;
}

template <typename T>
__attribute__((always_inline)) inline void add_row_body(const T* p, double* acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<double>(p[i]);
}

// grad = p (c - sum_e c_e p_e + z_term), c_e = a_e - ge_t (log p_e) with log p_e = x - lse.
template <typename T>
__attribute__((always_inline)) inline void losses_backward_body(const T* x, const T* a,
                                                                T ge_t, T gz2_t, T* grad,
                                                                int64_t n) {
  T sum;
  const T m = exp_shifted(x, grad, n, &sum);
  const T inv = T(1) / sum, shift = m + std::log(sum);
  T c_mean = 0;
#pragma omp simd reduction(+ : c_mean)
  for (int64_t i = 0; i < n; ++i) {
    T pi = grad[i] * inv;
    grad[i] = pi;
    c_mean += pi > T(0) ? pi * (a[i] - ge_t * (x[i] - shift)) : T(0);
  }
  const T offset = gz2_t * shift - c_mean;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T pi = grad[i];
    grad[i] = pi > T(0) ? pi * (a[i] - ge_t * (x[i] - shift) + offset) : T(0);
  }
}

SMOE_MULTIVERSION
void scores_f32(const float* x, float* s, int64_t n, bool sigmoid) {
  scores_body(x, s, n, sigmoid);
}

SMOE_MULTIVERSION
void add_bias_f32(const float* s, const float* bias, float* key, int64_t n) {
  for (int64_t i = 0; i < n; ++i) key[i] = s[i] + bias[i];
}

SMOE_MULTIVERSION
float softmax_stats_f32(const float* x, float* p, int64_t n, float* entropy) {
  return softmax_stats_body(x, p, n, entropy);
}

// rank[i] = how many keys go before key i: larger ones, and equal ones at lower positions.
// The ranks of the m keys are a permutation of [0, m), computed with no branch on the data:
// each key is compared with every other, 16 at a time. keys holds m_pad = m rounded up to 16
// entries, the last m_pad - m of them -inf padding (ranked after every key, but not counted);
// no key may be NaN.
SMOE_MULTIVERSION
void rank_candidates_f32(const float* keys, int64_t m, int64_t m_pad, int32_t* rank) {
  // Fixed-size local blocks: GCC's generic vector types would be lowered for the default
  // target inside every clone, but these loops vectorize per clone. Vectorizing over j
  // instead (GCC's choice without the pragmas) is twice as slow.
  for (int64_t b = 0; b < m_pad; b += kLanes) {
    float block[kLanes];
    int32_t ahead[kLanes] = {};
    std::memcpy(block, keys + b, sizeof(block));
#pragma GCC unroll 1
    for (int64_t j = 0; j < m; ++j) {
      const float kj = keys[j];
      const int32_t before = static_cast<int32_t>(j - b);  // j < b + l  <=>  before < l
#pragma omp simd
      for (int32_t l = 0; l < kLanes; ++l) {
        ahead[l] += static_cast<int32_t>((kj > block[l]) | ((kj == block[l]) & (before < l)));
      }
    }
    std::memcpy(rank + b, ahead, sizeof(ahead));
  }
}

// A lower bound for the k-th best key (k <= 16): the k-th largest of the 16 lane maxima of
// lane_max. The k lanes ranked first each hold a key >= it, at distinct positions. The
// maxima skip NaN; an empty lane is -inf, a bound that callers do not use.
SMOE_MULTIVERSION
float kth_bound_f32(const float* key, int64_t n, int64_t k) {
  float lane[kLanes];
  lane_max(key, n, lane);
  int32_t ahead[kLanes] = {};
#pragma GCC unroll 1
  for (int32_t j = 0; j < kLanes; ++j) {
#pragma omp simd
    for (int32_t l = 0; l < kLanes; ++l) {
      ahead[l] += static_cast<int32_t>((lane[j] > lane[l]) | ((lane[j] == lane[l]) & (j < l)));
    }
  }
  float bound = kNegInf<float>;
  for (int64_t l = 0; l < kLanes; ++l) bound = ahead[l] == k - 1 ? lane[l] : bound;
  return bound;
}

// Positions i of the keys >= bound, ascending, into kept; returns how many. kept needs
// kLanes entries of slack: whole vectors are stored. The scalar loop is store-bound (each
// store address waits on the previous compare; see benchmarks/profile_route.py); with
// AVX-512 a vector compare gives a 16-bit mask and a compress packs the passing positions.
// The compress goes to a register and then to memory: compress straight to memory is
// microcoded on some CPUs (AMD Zen 4).
#ifdef SMOE_HAVE_AVX512_COMPACT
__attribute__((target("avx512f"))) int64_t keep_at_least_avx512(const float* key, int64_t n,
                                                                 float bound, int32_t* kept) {
  const __m512 threshold = _mm512_set1_ps(bound);
  __m512i position = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kLanes);
  int64_t m = 0, i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // _CMP_GE_OQ: a NaN key never passes, as with the scalar >=.
    const __mmask16 pass = _mm512_cmp_ps_mask(_mm512_loadu_ps(key + i), threshold, _CMP_GE_OQ);
    _mm512_storeu_si512(kept + m, _mm512_maskz_compress_epi32(pass, position));
    m += __builtin_popcount(pass);
    position = _mm512_add_epi32(position, step);
  }
  for (; i < n; ++i) {
    kept[m] = static_cast<int32_t>(i);
    m += key[i] >= bound;
  }
  return m;
}
#endif

int64_t keep_at_least(const float* key, int64_t n, float bound, int32_t* kept) {
#ifdef SMOE_HAVE_AVX512_COMPACT
  // SMOE_OPS_NO_AVX512=1 forces the scalar loop, so that tests cover it on any machine.
  static const bool has_avx512 =
      __builtin_cpu_supports("avx512f") && std::getenv("SMOE_OPS_NO_AVX512") == nullptr;
  if (has_avx512) return keep_at_least_avx512(key, n, bound, kept);
#endif
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept[m] = static_cast<int32_t>(i);
    m += key[i] >= bound;
  }
  return m;
}

// Whether no entry is NaN or +-inf: x - x is 0 for a finite x and NaN otherwise, so the sum
// is 0 or NaN in any order of addition. A plain row sum could overflow in one order and not
// in another, and the CUDA kernel, which sums in another order, must take the same path.
SMOE_MULTIVERSION
bool all_finite_f32(const float* x, int64_t n) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] - x[i];
  return acc == 0;
}

SMOE_MULTIVERSION
void group_scores_f32(const float* key, int64_t num_groups, int64_t group_size, float* score) {
  group_scores_body(key, num_groups, group_size, score);
}

SMOE_MULTIVERSION
void add_row_f32(const float* p, double* acc, int64_t n) { add_row_body(p, acc, n); }

SMOE_MULTIVERSION
void losses_backward_f32(const float* x, const float* a, float ge_t, float gz2_t, float* grad,
                         int64_t n) {
  losses_backward_body(x, a, ge_t, gz2_t, grad, n);
}

void scores(const float* x, float* s, int64_t n, bool sigmoid) { scores_f32(x, s, n, sigmoid); }
void scores(const double* x, double* s, int64_t n, bool sigmoid) { scores_body(x, s, n, sigmoid); }
void add_bias(const float* s, const float* bias, float* key, int64_t n) {
  add_bias_f32(s, bias, key, n);
}
void add_bias(const double* s, const double* bias, double* key, int64_t n) {
  for (int64_t i = 0; i < n; ++i) key[i] = s[i] + bias[i];
}
float softmax_stats(const float* x, float* p, int64_t n, float* entropy) {
  return softmax_stats_f32(x, p, n, entropy);
}
double softmax_stats(const double* x, double* p, int64_t n, double* entropy) {
  return softmax_stats_body(x, p, n, entropy);
}
void group_scores(const float* key, int64_t num_groups, int64_t group_size, float* score) {
  group_scores_f32(key, num_groups, group_size, score);
}
void group_scores(const double* key, int64_t num_groups, int64_t group_size, double* score) {
  group_scores_body(key, num_groups, group_size, score);
}
void add_row(const float* p, double* acc, int64_t n) { add_row_f32(p, acc, n); }
void add_row(const double* p, double* acc, int64_t n) { add_row_body(p, acc, n); }
void losses_backward_row(const float* x, const float* a, float ge_t, float gz2_t, float* grad,
                         int64_t n) {
  losses_backward_f32(x, a, ge_t, gz2_t, grad, n);
}
void losses_backward_row(const double* x, const double* a, double ge_t, double gz2_t,
                         double* grad, int64_t n) {
  losses_backward_body(x, a, ge_t, gz2_t, grad, n);
}

// ---------------------------------------------------------------------------------------
// Selection. Order: key descending, then position ascending; NaN ranks as -inf.

template <typename T>
inline T rank_key(T v) {
  return v != v ? kNegInf<T> : v;
}

// (key, position) as one integer, ascending in the selection order: the float order mapped
// monotonically onto unsigned integers, inverted, above the position. -0 becomes +0 first,
// as the two compare equal.
inline uint64_t packed_order(float v, int32_t position) {
  v = rank_key(v) + 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(position);
}

// The k best positions of key rows of up to max_n keys, best first, with their buffers.
struct TopK {
  std::vector<float> kept_keys;
  std::vector<int32_t> kept, rank, order;
  std::vector<uint64_t> packed;

  // kept_keys and rank have room for whole 16-wide blocks.
  explicit TopK(int64_t max_n)
      : kept_keys(max_n + kLanes), kept(max_n + kLanes), rank(max_n + kLanes), order(max_n),
        packed(max_n) {}

  // float, the speed path: keep the keys that can be among the k best, then rank them, or
  // sort them when there are many (large k, or many ties).
  void select(const float* key, int64_t n, int64_t k, int32_t* top) {
    int64_t m = n;
    const float bound = k <= kLanes ? kth_bound_f32(key, n, k) : kNegInf<float>;
    if (bound > kNegInf<float>) {
      // Only keys >= bound can be among the k best; as k keys exceed -inf, no NaN or -inf
      // key is needed. Branch-free compaction, positions ascending.
      m = keep_at_least(key, n, bound, kept.data());
    } else {
      std::iota(kept.begin(), kept.begin() + n, 0);
    }

    if (m <= kMaxRanked) {
      const int64_t m_pad = (m + kLanes - 1) / kLanes * kLanes;
      for (int64_t i = 0; i < m; ++i) kept_keys[i] = rank_key(key[kept[i]]);
      std::fill(kept_keys.begin() + m, kept_keys.begin() + m_pad, kNegInf<float>);
      rank_candidates_f32(kept_keys.data(), m, m_pad, rank.data());
      for (int64_t i = 0; i < m; ++i) order[rank[i]] = kept[i];
      std::copy(order.begin(), order.begin() + k, top);
      return;
    }
    for (int64_t i = 0; i < m; ++i) packed[i] = packed_order(key[kept[i]], kept[i]);
    std::nth_element(packed.begin(), packed.begin() + (k - 1), packed.begin() + m);
    std::sort(packed.begin(), packed.begin() + k);
    for (int64_t j = 0; j < k; ++j) top[j] = static_cast<int32_t>(packed[j] & 0xffffffffu);
  }

  // double, the verification dtype: a plain sort.
  void select(const double* key, int64_t n, int64_t k, int32_t* top) {
    std::iota(kept.begin(), kept.begin() + n, 0);
    auto goes_first = [key](int32_t a, int32_t b) {
      double ka = rank_key(key[a]), kb = rank_key(key[b]);
      return ka > kb || (ka == kb && a < b);
    };
    std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.begin() + n, goes_first);
    std::sort(kept.begin(), kept.begin() + k, goes_first);
    std::copy(kept.begin(), kept.begin() + k, top);
  }
};

struct RouteConfig {
  int64_t num_experts, k, num_groups, topk_groups;
  bool sigmoid, renormalize;
  double scale;
};

// Per-task buffers, sized once per parallel task.
template <typename T>
struct RouteScratch {
  std::vector<T> s, key, group_scores, candidates;
  std::vector<int32_t> kept_groups;
  TopK topk;

  explicit RouteScratch(const RouteConfig& c)
      : s(c.num_experts), key(c.num_experts), group_scores(c.num_groups),
        candidates(c.topk_groups * (c.num_experts / c.num_groups)),
        kept_groups(c.topk_groups), topk(c.num_experts) {}
};

// Expert ids of the k best experts among the topk_groups best groups of the row's keys.
template <typename T>
void select_grouped(const T* key, const RouteConfig& c, RouteScratch<T>& w, int32_t* ids) {
  const int64_t group_size = c.num_experts / c.num_groups;
  group_scores(key, c.num_groups, group_size, w.group_scores.data());
  int32_t* kept = w.kept_groups.data();
  w.topk.select(w.group_scores.data(), c.num_groups, c.topk_groups, kept);
  // Candidates in ascending expert id, so that position order is expert id order.
  std::sort(kept, kept + c.topk_groups);
  for (int64_t j = 0; j < c.topk_groups; ++j) {
    std::copy(key + kept[j] * group_size, key + (kept[j] + 1) * group_size,
              w.candidates.data() + j * group_size);
  }
  w.topk.select(w.candidates.data(), c.topk_groups * group_size, c.k, ids);
  for (int64_t j = 0; j < c.k; ++j) {
    ids[j] = kept[ids[j] / group_size] * group_size + ids[j] % group_size;
  }
}

// weights[j] holds the score p_j of the j-th chosen expert; renormalize (if asked) and scale.
// The clamp keeps an all-underflow sigmoid row at 0 instead of 0 / 0; NaN passes through.
template <typename T>
void finish_weights(const RouteConfig& c, T* weights) {
  T total = 0;
  for (int64_t j = 0; j < c.k; ++j) total += weights[j];
  const T tiny = std::numeric_limits<T>::min();
  const T factor = c.renormalize ? T(c.scale) / (total < tiny ? tiny : total) : T(c.scale);
  for (int64_t j = 0; j < c.k; ++j) weights[j] *= factor;
}

// The float32 fast path, for rows with no bias and no groups, scored by sigmoid or by a
// renormalized softmax (softmax without renormalize needs every exponential for its
// denominator). Softmax and sigmoid are increasing, so the k best scores belong to the k
// best logits: select on the logits and score only the k chosen experts; renormalized
// softmax then needs k exponentials instead of E, w_j = exp(x_j - x_top) / sum_i (...),
// whose common factor exp(x_top - lse) cancels. Ranking the logits is also the order of the
// exact scores, where float32 scores can round distinct logits to a tie.
// Returns false, having written nothing, for a row with a NaN or an infinity (softmax turns
// such a row all NaN, which ranks differently).
bool route_row_on_logits(const float* x, const RouteConfig& c, TopK& topk, float* weights,
                         int32_t* ids) {
  if (!all_finite_f32(x, c.num_experts)) return false;
  topk.select(x, c.num_experts, c.k, ids);
  const float top = x[ids[0]];
  for (int64_t j = 0; j < c.k; ++j) {
    const float v = x[ids[j]];
    weights[j] = c.sigmoid ? 1.0f / (1.0f + fast_expf(-v)) : fast_expf(v - top);
  }
  finish_weights(c, weights);
  return true;
}

template <typename T>
void route_row(const T* x, const T* bias, const RouteConfig& c, RouteScratch<T>& w, T* weights,
               int32_t* ids) {
  if constexpr (std::is_same_v<T, float>) {
    const bool on_logits = bias == nullptr && c.num_groups == 1 && (c.sigmoid || c.renormalize);
    if (on_logits && route_row_on_logits(x, c, w.topk, weights, ids)) return;
  }
  T* s = w.s.data();
  scores(x, s, c.num_experts, c.sigmoid);
  const T* key = s;
  if (bias != nullptr) {
    add_bias(s, bias, w.key.data(), c.num_experts);
    key = w.key.data();
  }
  if (c.num_groups == 1) {
    w.topk.select(key, c.num_experts, c.k, ids);
  } else {
    select_grouped(key, c, w, ids);
  }
  for (int64_t j = 0; j < c.k; ++j) weights[j] = s[ids[j]];
  finish_weights(c, weights);
}

// Rows per parallel task: enough work per task to amortize scheduling (~16k elements).
int64_t row_grain(int64_t num_experts) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, num_experts));
}

template <typename scalar_t>
void route_kernel(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                  const RouteConfig& c, at::Tensor& weights, at::Tensor& ids,
                  at::Tensor& counts) {
  using T = acc_t<scalar_t>;
  const int64_t num_tokens = logits.size(0), E = c.num_experts, k = c.k;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* w_out = weights.mutable_data_ptr<T>();
  int32_t* ids_out = ids.mutable_data_ptr<int32_t>();
  int32_t* counts_out = counts.mutable_data_ptr<int32_t>();

  at::parallel_for(0, num_tokens, row_grain(E), [&](int64_t begin, int64_t end) {
    RouteScratch<T> scratch(c);
    std::vector<T> widened(std::is_same_v<scalar_t, T> ? 0 : E);
    std::vector<int32_t> local_counts(E, 0);
    for (int64_t t = begin; t < end; ++t) {
      const T* row = widened.data();
      if constexpr (std::is_same_v<scalar_t, T>) {
        row = x + t * E;
      } else {
        for (int64_t e = 0; e < E; ++e) widened[e] = static_cast<T>(x[t * E + e]);
      }
      route_row(row, b, c, scratch, w_out + t * k, ids_out + t * k);
      for (int64_t j = 0; j < k; ++j) ++local_counts[ids_out[t * k + j]];
    }
    for (int64_t e = 0; e < E; ++e) {
      // The GCC / Clang builtin, not std::atomic_ref: torch 2.11 builds extensions as C++17.
      if (local_counts[e] != 0) {
        __atomic_fetch_add(&counts_out[e], local_counts[e], __ATOMIC_RELAXED);
      }
    }
  });
}

// One row of route_backward; grad (length E) also serves as the scores buffer.
template <typename T>
void route_backward_row(const T* x, const T* g, const int32_t* ids, const RouteConfig& c,
                        T* dp, T* grad) {
  const int64_t E = c.num_experts, k = c.k;
  scores(x, grad, E, c.sigmoid);
  T total = 0, weighted = 0;
  for (int64_t j = 0; j < k; ++j) {
    total += grad[ids[j]];
    weighted += g[j] * grad[ids[j]];
  }
  const T tiny = std::numeric_limits<T>::min();
  const bool clamped = c.renormalize && total < tiny;
  const T norm = c.renormalize ? (clamped ? tiny : total) : T(1);
  // sum_i g_i w_i; through an active clamp the normalizer is a constant.
  const T mean_g = c.renormalize && !clamped ? weighted / norm : T(0);
  for (int64_t j = 0; j < k; ++j) dp[j] = T(c.scale) * (g[j] - mean_g) / norm;

  if (c.sigmoid) {
    for (int64_t j = 0; j < k; ++j) dp[j] *= grad[ids[j]] * (T(1) - grad[ids[j]]);
    std::fill(grad, grad + E, T(0));
    for (int64_t j = 0; j < k; ++j) grad[ids[j]] += dp[j];
    return;
  }
  T dot = 0;
  for (int64_t j = 0; j < k; ++j) {
    dp[j] *= grad[ids[j]];  // now s_m dp_m of the selected m
    dot += dp[j];
  }
  for (int64_t e = 0; e < E; ++e) grad[e] *= -dot;
  for (int64_t j = 0; j < k; ++j) grad[ids[j]] += dp[j];
}

template <typename scalar_t>
void route_backward_kernel(const at::Tensor& grad_weights, const at::Tensor& logits,
                           const at::Tensor& ids, const RouteConfig& c, at::Tensor& grad) {
  using T = acc_t<scalar_t>;
  const int64_t num_tokens = logits.size(0), E = c.num_experts, k = c.k;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const T* g = grad_weights.const_data_ptr<T>();
  const int32_t* id = ids.const_data_ptr<int32_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, num_tokens, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<T> row(E), grad_row(E), dp(k);
    for (int64_t t = begin; t < end; ++t) {
      if constexpr (std::is_same_v<scalar_t, T>) {
        route_backward_row(x + t * E, g + t * k, id + t * k, c, dp.data(), out + t * E);
      } else {
        for (int64_t e = 0; e < E; ++e) row[e] = static_cast<T>(x[t * E + e]);
        route_backward_row(row.data(), g + t * k, id + t * k, c, dp.data(), grad_row.data());
        for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<scalar_t>(grad_row[e]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// router_losses

// Rows per chunk of partial sums: a function of the shape only, so results are bitwise the
// same for any thread count.
int64_t loss_chunk_rows(int64_t num_experts) { return row_grain(num_experts); }

// Partial sums of one chunk: [column sums of p (E) | sum lse^2 | sum entropy].
template <typename scalar_t>
void losses_kernel(const at::Tensor& logits, const at::Tensor& counts, int64_t k,
                   at::Tensor& losses, at::Tensor& mean_probs) {
  using T = acc_t<scalar_t>;
  const int64_t num_tokens = logits.size(0), E = logits.size(1);
  const int64_t chunk = loss_chunk_rows(E), num_chunks = (num_tokens + chunk - 1) / chunk;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  std::vector<double> partial(num_chunks * (E + 2), 0.0);

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<T> row(E), p(E);
    for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
      double* acc = partial.data() + ci * (E + 2);
      for (int64_t t = ci * chunk; t < std::min(num_tokens, (ci + 1) * chunk); ++t) {
        const T* xr = row.data();
        if constexpr (std::is_same_v<scalar_t, T>) {
          xr = x + t * E;
        } else {
          for (int64_t e = 0; e < E; ++e) row[e] = static_cast<T>(x[t * E + e]);
        }
        T entropy;
        const T lse = softmax_stats(xr, p.data(), E, &entropy);
        add_row(p.data(), acc, E);
        acc[E] += static_cast<double>(lse) * static_cast<double>(lse);
        acc[E + 1] += static_cast<double>(entropy);
      }
    }
  });

  // Reduce the chunks in order, then the losses, in float64.
  std::vector<double> total(E + 2, 0.0);
  for (int64_t ci = 0; ci < num_chunks; ++ci) {
    for (int64_t i = 0; i < E + 2; ++i) total[i] += partial[ci * (E + 2) + i];
  }
  const int32_t* cnt = counts.const_data_ptr<int32_t>();
  T* mp = mean_probs.mutable_data_ptr<T>();
  const double inv_tokens = num_tokens > 0 ? 1.0 / static_cast<double>(num_tokens) : 0.0;
  double balance = 0, batch_entropy = 0;
  for (int64_t e = 0; e < E; ++e) {
    const double mean_p = total[e] * inv_tokens;
    mp[e] = static_cast<T>(mean_p);
    balance += static_cast<double>(cnt[e]) * mean_p;
    if (mean_p > 0) batch_entropy -= mean_p * std::log(mean_p);
  }
  T* out = losses.mutable_data_ptr<T>();
  out[0] = static_cast<T>(static_cast<double>(E) * balance * inv_tokens / static_cast<double>(k));
  out[1] = static_cast<T>(total[E] * inv_tokens);
  out[2] = static_cast<T>(total[E + 1] * inv_tokens);
  out[3] = static_cast<T>(batch_entropy);
}

template <typename scalar_t>
void losses_backward_kernel(const at::Tensor& grad_losses, const at::Tensor& logits,
                            const at::Tensor& counts, int64_t k, const at::Tensor& mean_probs,
                            at::Tensor& grad) {
  using T = acc_t<scalar_t>;
  const int64_t num_tokens = logits.size(0), E = logits.size(1);
  const T* gl = grad_losses.const_data_ptr<T>();
  const double inv_tokens = 1.0 / static_cast<double>(num_tokens);
  const double gb = gl[0], gz = gl[1], ge = gl[2], gbe = gl[3];

  // a_e = (gb E f_e - gbe log P_e) / T, the per-column part of c_e.
  const int32_t* cnt = counts.const_data_ptr<int32_t>();
  const T* mp = mean_probs.const_data_ptr<T>();
  std::vector<T> a(E);
  for (int64_t e = 0; e < E; ++e) {
    const double f = static_cast<double>(cnt[e]) * inv_tokens / static_cast<double>(k);
    const double log_mean = mp[e] > 0 ? std::log(static_cast<double>(mp[e])) : 0.0;
    a[e] = static_cast<T>((gb * static_cast<double>(E) * f - gbe * log_mean) * inv_tokens);
  }
  const T ge_t = static_cast<T>(ge * inv_tokens), gz2_t = static_cast<T>(2 * gz * inv_tokens);

  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, num_tokens, row_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<T> row(E), grad_row(E);
    for (int64_t t = begin; t < end; ++t) {
      if constexpr (std::is_same_v<scalar_t, T>) {
        losses_backward_row(x + t * E, a.data(), ge_t, gz2_t, out + t * E, E);
      } else {
        for (int64_t e = 0; e < E; ++e) row[e] = static_cast<T>(x[t * E + e]);
        losses_backward_row(row.data(), a.data(), ge_t, gz2_t, grad_row.data(), E);
        for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<scalar_t>(grad_row[e]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view score, bool renormalize,
    const std::optional<at::Tensor>& expert_bias, int64_t num_groups, int64_t topk_groups,
    double scale) {
  // validate
  const char* op = "smoe_ops.route";
  check_logits(op, logits_in, Placement::cpu());
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  const bool sigmoid = parse_score(op, score);
  check_k(op, k, num_experts);
  check_groups(op, k, num_experts, num_groups, topk_groups);
  // counts are int32: one expert may receive every one of the T * k assignments.
  TORCH_CHECK_VALUE(num_tokens * k <= std::numeric_limits<int32_t>::max(), op,
                    ": num_tokens * k must fit int32 counts (at most 2^31 - 1), got ",
                    num_tokens, " * ", k);
  const auto wdtype = weight_dtype(logits_in.scalar_type());
  const auto bias =
      checked_expert_bias(op, expert_bias, num_experts, wdtype, Placement::cpu());

  // allocate
  auto logits = logits_in.contiguous();
  auto weights = at::empty({num_tokens, k}, logits.options().dtype(wdtype));
  auto ids = at::empty({num_tokens, k}, logits.options().dtype(at::kInt));
  auto counts = at::zeros({num_experts}, logits.options().dtype(at::kInt));
  if (num_tokens == 0) return {weights, ids, counts};

  // launch
  const RouteConfig config{num_experts, k,           num_groups, topk_groups,
                           sigmoid,     renormalize, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route", [&] {
    route_kernel<scalar_t>(logits, bias, config, weights, ids, counts);
  });
  return {weights, ids, counts};
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                              const at::Tensor& ids_in, c10::string_view score,
                              bool renormalize, double scale) {
  // validate
  const char* op = "smoe_ops.route_backward";
  check_logits(op, logits_in, Placement::cpu());
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  const bool sigmoid = parse_score(op, score);
  const int64_t k =
      check_route_backward_args(op, ids_in, grad_weights_in, logits_in, Placement::cpu());
  if (ids_in.numel() > 0) {
    auto [lo, hi] = at::aminmax(ids_in);
    TORCH_CHECK_INDEX(lo.item<int32_t>() >= 0 && hi.item<int32_t>() < num_experts, op,
                      ": ids must be in [0, num_experts = ", num_experts, "), got values in [",
                      lo.item<int32_t>(), ", ", hi.item<int32_t>(), "]");
  }

  // allocate
  auto logits = logits_in.contiguous();
  auto ids = ids_in.contiguous();
  auto grad_weights = grad_weights_in.contiguous();
  auto grad = at::empty_like(logits);
  if (num_tokens == 0) return grad;

  // launch
  const RouteConfig config{num_experts, k, 1, 1, sigmoid, renormalize, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward",
      [&] { route_backward_kernel<scalar_t>(grad_weights, logits, ids, config, grad); });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> router_losses_cpu(const at::Tensor& logits_in,
                                                     const at::Tensor& counts_in, int64_t k) {
  // validate
  const char* op = "smoe_ops.router_losses";
  check_logits(op, logits_in, Placement::cpu());
  const int64_t num_experts = logits_in.size(1);
  check_counts(op, counts_in, num_experts, Placement::cpu());
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);

  // allocate
  auto logits = logits_in.contiguous();
  auto counts = counts_in.contiguous();
  const auto options = logits.options().dtype(weight_dtype(logits.scalar_type()));
  auto losses = at::empty({4}, options);
  auto mean_probs = at::empty({num_experts}, options);

  // launch
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "router_losses",
      [&] { losses_kernel<scalar_t>(logits, counts, k, losses, mean_probs); });
  return {losses, mean_probs};
}

at::Tensor router_losses_backward_cpu(const at::Tensor& grad_losses_in,
                                      const at::Tensor& logits_in, const at::Tensor& counts_in,
                                      int64_t k, const at::Tensor& mean_probs_in) {
  // validate
  const char* op = "smoe_ops.router_losses_backward";
  check_logits(op, logits_in, Placement::cpu());
  const int64_t num_experts = logits_in.size(1);
  check_counts(op, counts_in, num_experts, Placement::cpu());
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  check_router_losses_backward_args(op, grad_losses_in, mean_probs_in, logits_in,
                                    Placement::cpu());

  // allocate
  auto logits = logits_in.contiguous();
  auto grad = at::empty_like(logits);
  if (logits.size(0) == 0) return grad;

  // launch
  auto counts = counts_in.contiguous();
  auto grad_losses = grad_losses_in.contiguous();
  auto mean_probs = mean_probs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "router_losses_backward", [&] {
        losses_backward_kernel<scalar_t>(grad_losses, logits, counts, k, mean_probs, grad);
      });
  return grad;
}

}  // namespace
}  // namespace smoe

TORCH_LIBRARY_IMPL(smoe_ops, CPU, m) {
  m.impl("route", &smoe::route_cpu);
  m.impl("route_backward", &smoe::route_backward_cpu);
  m.impl("router_losses", &smoe::router_losses_cpu);
  m.impl("router_losses_backward", &smoe::router_losses_backward_cpu);
}
