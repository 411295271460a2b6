// Portable kernels, the int8 activation preparation and runtime ISA selection for
// graphopt.MatMulLowBit.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace graphopt_ext {

std::uint32_t code_at(const LowBitProblem& p, std::size_t t, std::size_t j, std::size_t k) {
  const std::size_t per_word = codes_per_word(p.bits);
  std::uint32_t word = 0;
  std::memcpy(&word, p.tile(t) + (k / per_word) * kColumnBytes + j * 4, sizeof(word));  // little-endian host
  return (word >> ((k % per_word) * static_cast<std::size_t>(p.bits))) & ((1u << p.bits) - 1u);
}

namespace {

std::size_t min_size(std::size_t a, std::size_t b) { return a < b ? a : b; }

std::size_t round_up(std::size_t value, std::size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

std::size_t scalar_workspace(const LowBitProblem& p) {
  return p.accuracy_level == 4 ? int8_workspace_bytes(p) : 0;
}

void scalar_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  if (p.accuracy_level == 4) int8_prepare(p, workspace);
}

// fp32 activations: Y[m, n] = sum_g scale * sum_k (code - zp) * a[k], in that order.
void fp32_tiles_scalar(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  for (std::size_t t = t_begin; t < t_end; ++t) {
    const float* scales = p.tile_scales(t);
    for (std::size_t j = 0; j < kTileChannels; ++j) {
      const std::size_t n = t * kTileChannels + j;
      if (n >= p.n) break;
      for (std::size_t m = 0; m < p.m; ++m) {
        const float* a = p.a + m * p.k;
        float total = 0.0f;
        for (std::size_t g = 0; g < p.groups; ++g) {
          const std::size_t k0 = g * p.group_size;
          const std::size_t k1 = min_size(k0 + p.group_size, p.k);
          const auto zp = static_cast<float>(zero_point_at(p, t, j, g));
          float acc = 0.0f;
          for (std::size_t k = k0; k < k1; ++k) acc += (static_cast<float>(code_at(p, t, j, k)) - zp) * a[k];
          total += acc * scales[g * kTileChannels + j];
        }
        if (p.bias) total += p.bias[n];
        p.y[m * p.n + n] = total;
      }
    }
  }
}

void tiles_scalar(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  if (p.accuracy_level == 4) {
    int8_tiles_generic(p, t_begin, t_end);
  } else {
    fp32_tiles_scalar(p, t_begin, t_end);
  }
}

// Round to nearest, ties to even, for |x| <= 2^22 (here |x| <= 127): adding and removing
// 1.5 * 2^23 leaves no fraction bits (default rounding mode; no -ffast-math). Inline and
// exact, unlike a libm nearbyint call on baseline x86-64.
inline float round_to_even(float x) {
  constexpr float kMagic = 12582912.0f;
  return (x + kMagic) - kMagic;
}

}  // namespace

std::size_t int8_row_stride(const LowBitProblem& p) {
  return round_up(2 * p.padded_k() + p.groups * (sizeof(float) + sizeof(std::int32_t)), 64);
}

// ---------------------------------------------------------------- int8 activations

std::size_t int8_workspace_bytes(const LowBitProblem& p) { return p.m * int8_row_stride(p); }

Int8RowBuffers int8_row_buffers(const LowBitProblem& p, std::uint8_t* workspace, std::size_t m) {
  std::uint8_t* base = workspace + m * p.prepared_stride;
  const std::size_t padded_k = p.padded_k();
  auto* scales = reinterpret_cast<float*>(base + 2 * padded_k);
  return {reinterpret_cast<std::int8_t*>(base), reinterpret_cast<std::int8_t*>(base + padded_k), scales,
          reinterpret_cast<std::int32_t*>(scales + p.groups)};
}

Int8Row int8_row(const LowBitProblem& p, std::size_t m) {
  // prepare() wrote the workspace; the kernels only read it.
  const Int8RowBuffers row = int8_row_buffers(p, const_cast<std::uint8_t*>(p.prepared), m);
  return {row.natural, row.lanes, row.scales, row.sums};
}

void int8_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  const std::size_t padded_k = p.padded_k();
  const std::size_t per_word = codes_per_word(p.bits);
  p.prepared_stride = int8_row_stride(p);
  p.prepared = workspace;
  for (std::size_t m = 0; m < p.m; ++m) {
    const auto [natural, lanes, scales, sums] = int8_row_buffers(p, workspace, m);
    const float* a = p.a + m * p.k;
    std::memset(natural, 0, padded_k);
    for (std::size_t g = 0; g < p.groups; ++g) {
      const std::size_t k0 = g * p.group_size;
      const std::size_t k1 = min_size(k0 + p.group_size, p.k);
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
    if (p.bits == 2 || p.bits == 4 || p.bits == 8) {
      const std::size_t passes = static_cast<std::size_t>(8 / p.bits);
      for (std::size_t c = 0; c < p.columns; ++c) {
        const std::int8_t* src = natural + c * per_word;
        std::int8_t* dst = lanes + c * per_word;
        for (std::size_t pass = 0; pass < passes; ++pass) {
          for (std::size_t i = 0; i < 4; ++i) dst[4 * pass + i] = src[passes * i + pass];
        }
      }
    } else {
      std::memset(lanes, 0, padded_k);
    }
  }
}

void int8_tiles_generic(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  for (std::size_t t = t_begin; t < t_end; ++t) {
    const float* scales = p.tile_scales(t);
    for (std::size_t j = 0; j < kTileChannels; ++j) {
      const std::size_t n = t * kTileChannels + j;
      if (n >= p.n) break;
      for (std::size_t m = 0; m < p.m; ++m) {
        const Int8Row act = int8_row(p, m);
        float total = 0.0f;
        for (std::size_t g = 0; g < p.groups; ++g) {
          const std::size_t k0 = g * p.group_size;
          const std::size_t k1 = min_size(k0 + p.group_size, p.k);
          std::int64_t dot = 0;
          for (std::size_t k = k0; k < k1; ++k) dot += static_cast<std::int64_t>(code_at(p, t, j, k)) * act.natural[k];
          dot -= static_cast<std::int64_t>(zero_point_at(p, t, j, g)) * act.sums[g];
          const float scale = scales[g * kTileChannels + j] * act.scales[g];
          total = total + static_cast<float>(dot) * scale;
        }
        if (p.bias) total += p.bias[n];
        p.y[m * p.n + n] = total;
      }
    }
  }
}

bool int8_simd_shape(const LowBitProblem& p) {
  // Group sums in int32, the VNNI kernel's top pass scaled by up to 2^(8 - bits):
  // |sum| <= group_size * 255 * 127 * 2.
  const double bound = static_cast<double>(p.group_size) * 255.0 * 127.0 * 2.0;
  return (p.bits == 2 || p.bits == 4 || p.bits == 8) && p.group_size % codes_per_word(p.bits) == 0 &&
         bound < 2147483647.0;
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
  static const KernelSet kernels{"scalar", &scalar_workspace, &scalar_prepare, &tiles_scalar};
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
