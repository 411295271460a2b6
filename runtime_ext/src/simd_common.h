// Helpers shared by the SIMD translation units (kernels_avx2*.cc, kernels_vnni.cc).
// Include only from those units: everything here is internal (anonymous namespace), so
// each unit gets its own copy compiled with its own flags and nothing is merged across
// units with different instruction sets.
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace graphopt_ext {
namespace {

constexpr std::size_t kLanes = 8;

inline std::size_t min_size(std::size_t a, std::size_t b) { return a < b ? a : b; }

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 0x55));
  return _mm_cvtss_f32(x);
}

inline __m256i load_block(const std::uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Stores half h (channels 16 t + 8 h .. + 7) of row m of Y, bias added, only channels < N.
inline void store_half_row(const LowBitProblem& p, std::size_t t, std::size_t h, std::size_t m, __m256 y) {
  const std::size_t n0 = t * kTileChannels + h * kHalfChannels;
  if (n0 >= p.n) return;
  float* out = p.y + m * p.n + n0;
  if (n0 + kHalfChannels <= p.n) {
    if (p.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(p.bias + n0));
    _mm256_storeu_ps(out, y);
    return;
  }
  alignas(32) float lanes[kHalfChannels];
  _mm256_store_ps(lanes, y);
  for (std::size_t j = 0; n0 + j < p.n; ++j) out[j] = p.bias ? lanes[j] + p.bias[n0 + j] : lanes[j];
}

}  // namespace
}  // namespace graphopt_ext
