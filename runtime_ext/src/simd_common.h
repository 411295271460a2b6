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

inline std::int32_t hsum_i32(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}

// Horizontal sums of NR int32 vectors (exact): three VPHADDDs and one add for four rows.
template <int NR>
void hsum_rows(const __m256i* acc, std::int32_t* out) {
  if constexpr (NR == 4) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    const __m128i x = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), x);
  } else {
    for (int r = 0; r < NR; ++r) out[r] = hsum_i32(acc[r]);
  }
}

}  // namespace
}  // namespace graphopt_ext
