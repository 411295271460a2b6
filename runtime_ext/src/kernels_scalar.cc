// Portable kernels and runtime ISA selection for graphopt.MatMulLowBit.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace graphopt_ext {
namespace {

// Code k of a packed row.
inline std::uint32_t code_at(const std::uint8_t* row, int bits, std::size_t k) {
  const std::size_t per_word = codes_per_word(bits);
  const std::size_t per_block = codes_per_block(bits);
  const std::size_t block = k / per_block;
  const std::size_t in_block = k % per_block;
  const std::size_t field = in_block / kWordsPerBlock;
  const std::size_t word = in_block % kWordsPerBlock;
  (void)per_word;
  std::uint32_t value = 0;
  std::memcpy(&value, row + block * kBlockBytes + word * 4, sizeof(value));  // little-endian host
  return (value >> (field * static_cast<std::size_t>(bits))) & ((1u << bits) - 1u);
}

std::size_t scalar_workspace(const LowBitProblem& p) {
  return p.accuracy_level == 4 ? int8_workspace_bytes(p) : 0;
}

}  // namespace

static void scalar_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  if (p.accuracy_level == 4) int8_prepare(p, workspace);
}

static void matmul_rows_scalar(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  if (p.accuracy_level == 4) {
    int8_rows_generic(p, n_begin, n_end);
    return;
  }
  const std::uint32_t implicit_zp = 1u << (p.bits - 1);
  for (std::size_t n = n_begin; n < n_end; ++n) {
    const std::uint8_t* row = p.packed + n * p.row_bytes;
    const float* scales = p.scales + n * p.groups;
    const std::uint8_t* zps = p.zero_points ? p.zero_points + n * p.groups : nullptr;
    for (std::size_t m = 0; m < p.m; ++m) {
      const float* a = p.a + m * p.padded_k;
      float total = 0.0f;
      for (std::size_t g = 0; g < p.groups; ++g) {
        const std::size_t k0 = g * p.group_size;
        const std::size_t k1 = (k0 + p.group_size < p.k) ? k0 + p.group_size : p.k;
        const float zp = static_cast<float>(zps ? zps[g] : implicit_zp);
        float acc = 0.0f;
        for (std::size_t k = k0; k < k1; ++k) {
          acc += (static_cast<float>(code_at(row, p.bits, k)) - zp) * a[k];
        }
        total += acc * scales[g];
      }
      if (p.bias) total += p.bias[n];
      p.y[m * p.n + n] = total;
    }
  }
}

// ---------------------------------------------------------------- int8 activations

namespace {
// Round to nearest, ties to even, for |x| <= 2^22 (here |x| <= 127): adding and removing
// 1.5 * 2^23 leaves no fraction bits (default rounding mode; no -ffast-math). Inline and
// exact, unlike a libm nearbyint call on baseline x86-64.
inline float round_to_even(float x) {
  constexpr float kMagic = 12582912.0f;
  return (x + kMagic) - kMagic;
}

std::size_t round_up(std::size_t value, std::size_t multiple) { return (value + multiple - 1) / multiple * multiple; }
}  // namespace

std::size_t int8_workspace_bytes(const LowBitProblem& p) {
  return p.m * round_up(2 * p.padded_k + p.groups * (sizeof(float) + sizeof(std::int32_t)), 64);
}

Int8Row int8_row(const LowBitProblem& p, std::size_t m) {
  const std::uint8_t* base = p.int8_prepared + m * p.int8_stride;
  const auto* scales = reinterpret_cast<const float*>(base + 2 * p.padded_k);
  return {reinterpret_cast<const std::int8_t*>(base), reinterpret_cast<const std::int8_t*>(base + p.padded_k),
          scales, reinterpret_cast<const std::int32_t*>(scales + p.groups)};
}

void int8_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  p.int8_stride = round_up(2 * p.padded_k + p.groups * (sizeof(float) + sizeof(std::int32_t)), 64);
  p.int8_prepared = workspace;
  for (std::size_t m = 0; m < p.m; ++m) {
    std::uint8_t* base = workspace + m * p.int8_stride;
    auto* natural = reinterpret_cast<std::int8_t*>(base);
    auto* blocked = reinterpret_cast<std::int8_t*>(base + p.padded_k);
    auto* scales = reinterpret_cast<float*>(base + 2 * p.padded_k);
    auto* sums = reinterpret_cast<std::int32_t*>(scales + p.groups);
    const float* a = p.a + m * p.padded_k;
    std::memset(natural, 0, p.padded_k);
    for (std::size_t g = 0; g < p.groups; ++g) {
      const std::size_t k0 = g * p.group_size;
      const std::size_t k1 = (k0 + p.group_size < p.k) ? k0 + p.group_size : p.k;
      float amax = 0.0f;
      bool finite = true;
      for (std::size_t k = k0; k < k1; ++k) {
        const float magnitude = a[k] < 0.0f ? -a[k] : a[k];
        finite = finite && std::isfinite(a[k]);
        amax = magnitude > amax ? magnitude : amax;
      }
      // A non-finite activation makes the group's scale NaN, so Y is NaN as in fp32.
      const float inverse = (finite && amax > 0.0f) ? 127.0f / amax : 0.0f;
      std::int32_t sum = 0;
      for (std::size_t k = k0; k < k1; ++k) {
        const float value = finite ? round_to_even(a[k] * inverse) : 0.0f;
        const auto q = static_cast<std::int8_t>(value > 127.0f ? 127.0f : (value < -127.0f ? -127.0f : value));
        natural[k] = q;
        sum += q;
      }
      scales[g] = finite ? amax / 127.0f : std::nanf("");
      sums[g] = sum;
    }
    if (p.bits == 4) {
      for (std::size_t block = 0; block < p.padded_k / 64; ++block) {
        const std::int8_t* src = natural + block * 64;
        std::int8_t* dst = blocked + block * 64;
        for (std::size_t w = 0; w < 8; ++w) {
          for (std::size_t b = 0; b < 4; ++b) {
            dst[4 * w + b] = src[16 * b + w];
            dst[32 + 4 * w + b] = src[16 * b + 8 + w];
          }
        }
      }
    } else {
      std::memset(blocked, 0, p.padded_k);
    }
  }
}

void int8_rows_generic(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  const std::int32_t implicit_zp = 1 << (p.bits - 1);
  for (std::size_t n = n_begin; n < n_end; ++n) {
    const std::uint8_t* row = p.packed + n * p.row_bytes;
    const float* scales = p.scales + n * p.groups;
    const std::uint8_t* zps = p.zero_points ? p.zero_points + n * p.groups : nullptr;
    for (std::size_t m = 0; m < p.m; ++m) {
      const Int8Row act = int8_row(p, m);
      float total = 0.0f;
      for (std::size_t g = 0; g < p.groups; ++g) {
        const std::size_t k0 = g * p.group_size;
        const std::size_t k1 = (k0 + p.group_size < p.k) ? k0 + p.group_size : p.k;
        std::int64_t dot = 0;
        for (std::size_t k = k0; k < k1; ++k) {
          dot += static_cast<std::int64_t>(code_at(row, p.bits, k)) * act.natural[k];
        }
        dot -= static_cast<std::int64_t>(zps ? zps[g] : implicit_zp) * act.sums[g];
        total += static_cast<float>(dot) * (scales[g] * act.scales[g]);
      }
      if (p.bias) total += p.bias[n];
      p.y[m * p.n + n] = total;
    }
  }
}

float* thread_scratch(std::size_t count) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelSet& scalar_kernels() {
  static const KernelSet kernels{"scalar", &scalar_workspace, &scalar_prepare, &matmul_rows_scalar};
  return kernels;
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

const KernelSet& select_kernels() {
  const char* forced = std::getenv("GRAPHOPT_EXT_ISA");
  const bool want_scalar = forced && std::strcmp(forced, "scalar") == 0;
  const bool want_avx2 = forced && std::strcmp(forced, "avx2") == 0;
#if defined(GRAPHOPT_EXT_HAVE_AVX2)
  if (!want_scalar && cpu_has_avx2_fma()) {
#if defined(GRAPHOPT_EXT_HAVE_AVX512VNNI)
    if (!want_avx2 && cpu_has_avx512_vnni()) return avx2_vnni_kernels();
#endif
    return avx2_kernels();
  }
#endif
  (void)want_scalar;
  (void)want_avx2;
  return scalar_kernels();
}

}  // namespace graphopt_ext
