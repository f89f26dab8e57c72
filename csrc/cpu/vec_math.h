// Scalar math written so that GCC's auto-vectorizer turns loops over it into SIMD code, and
// the SMOE_MULTIVERSION attribute that compiles a hot function for AVX-512, AVX2 and baseline
// x86-64, picked once at load time. The .so is built without -march=native, so this is how
// the hot loops get wide vectors and still run on any x86-64 CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define SMOE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SMOE_MULTIVERSION
#endif

namespace smoe {

// exp(x) for float32, within 2 ulp over the whole range, branch-free (selects only) so that it
// vectorizes. exp(x) = 2^n * e^r with n = round(x / ln2), |r| <= ln2 / 2; e^r is a degree-7
// Taylor polynomial (truncation error below 6e-9 relative). Inputs beyond the float range
// give 0 and +inf exactly; NaN propagates.
__attribute__((always_inline)) inline float fast_expf(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln2 split so that n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMax = 88.7228394f;    // ln(FLT_MAX)
  constexpr float kMin = -87.3365479f;   // ln(FLT_MIN): below it, the result flushes to 0
  float xc = x > kMax ? kMax : (x < kMin ? kMin : x);
  float n = (xc * kLog2e + kRound) - kRound;
  float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x > kMax ? std::numeric_limits<float>::infinity() : y;
  y = x < kMin ? 0.0f : y;
  return x != x ? x : y;
}

// always_inline: a call out of a vector loop would leave that loop scalar.
__attribute__((always_inline)) inline double fast_exp(double x) { return std::exp(x); }
__attribute__((always_inline)) inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace smoe
