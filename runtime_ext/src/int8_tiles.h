// The accuracy_level-4 tile kernel shared by kernels_avx2_int8.cc (VPMADDUBSW) and
// kernels_vnni.cc (VPDPBUSD). Include only from those units: like simd_common.h it is all
// internal, so each unit compiles its own copy with its own instruction set.
//
// Per word column of a tile (sixteen channels: two 256-bit halves of eight 32-bit lanes),
// pass t of P = 8 / BITS turns the codes into bytes, (w >> t BITS) & mask, each lane then
// holding four codes of its channel; the activations for that pass are one broadcast 32-bit
// group of four int8 values (int8_prepare's lanes order). A u8 x s8 four-term dot per lane
// accumulates eight channels at once: no horizontal sums. Per group, exactly as
// int8_tiles_generic():
//   y += float(acc - zp * sum_q) * (scale * s_g)   (no fused multiply-add)
// so every path gives bit-identical results.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "kernels.h"
#include "simd_common.h"

namespace graphopt_ext {
namespace {

// Codes of pass t of a word column half as bytes: code (SCALED false) or code * 2^(t BITS)
// (SCALED true: the field masked in place, one instruction fewer; the Dot shifts the
// pass's exact sum back down).
template <int BITS, bool SCALED>
inline __m256i pass_bytes(__m256i w, int t) {
  const int field = (1 << BITS) - 1;
  if (SCALED) return _mm256_and_si256(w, _mm256_set1_epi8(static_cast<char>(field << (t * BITS))));
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(field));
  if (t == 0) return _mm256_and_si256(w, mask);
  return _mm256_and_si256(_mm256_srli_epi16(w, t * BITS), mask);
}

inline __m256i broadcast_i32(const std::int8_t* p) {
  std::int32_t value;
  __builtin_memcpy(&value, p, sizeof(value));
  return _mm256_set1_epi32(value);
}

// Zero points of half h of tile t in group g as int32 (implicit 2^(BITS-1) when absent).
template <int BITS>
inline __m256i zero_points_epi32(const LowBitProblem& p, std::size_t t, std::size_t g, int h) {
  const std::uint8_t* zps = p.tile_zero_points(t);
  if (!zps) return _mm256_set1_epi32(1 << (BITS - 1));
  const std::uint8_t* at = zps + g * kTileChannels + static_cast<std::size_t>(h) * kHalfChannels;
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
}

// Dot policy: kAccumulators per (half, row) and column parity (kLatency: whether to use
// the parity sets; kScaled: whether pass t's code bytes are code * 2^(t BITS));
// column(acc, u, a) adds the P passes of one word column half (u[t] the code bytes, a[t]
// the broadcast activations); finish() sums one set.
//   struct Dot { static constexpr int kAccumulators; static constexpr bool kLatency, kScaled;
//     template <int P> static void column(__m256i* acc, const __m256i* u, const __m256i* a);
//     template <int BITS> static __m256i finish(const __m256i* acc); };

// Tile t, rows m0 .. m0 + MR of A.
template <int BITS, int MR, class Dot>
void int8_block(const LowBitProblem& p, std::size_t t, std::size_t m0) {
  constexpr int kPasses = 8 / BITS;
  constexpr int kH = static_cast<int>(kHalves);
  constexpr std::size_t kFields = codes_per_word(BITS);
  constexpr int kAcc = Dot::kAccumulators;
  const std::size_t columns_per_group = p.group_size / kFields;
  Int8Row rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = int8_row(p, m0 + r);
  const std::uint8_t* tile = p.tile(t);
  const float* tile_scales = p.tile_scales(t);
  __m256 total[kH][MR];
  for (int h = 0; h < kH; ++h)
    for (int r = 0; r < MR; ++r) total[h][r] = _mm256_setzero_ps();
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t c0 = g * columns_per_group;
    const std::size_t c1 = min_size(c0 + columns_per_group, p.columns);
    // For one row of A, two sets of accumulators (even and odd columns) when Dot's
    // additions have latency, so consecutive columns do not wait on each other.
    constexpr bool kParity = Dot::kLatency && MR == 1;
    __m256i acc[kH][MR][2 * kAcc];
    for (int h = 0; h < kH; ++h)
      for (int r = 0; r < MR; ++r)
        for (int s = 0; s < 2 * kAcc; ++s) acc[h][r][s] = _mm256_setzero_si256();
    auto column = [&](std::size_t c, auto parity) {
      constexpr int kOffset = kParity ? decltype(parity)::value * kAcc : 0;
      __m256i u[kH][kPasses];
      for (int h = 0; h < kH; ++h) {
        const __m256i w = load_block(tile + c * kColumnBytes + static_cast<std::size_t>(h) * 32);
        for (int pass = 0; pass < kPasses; ++pass) u[h][pass] = pass_bytes<BITS, Dot::kScaled>(w, pass);
      }
      for (int r = 0; r < MR; ++r) {
        __m256i a[kPasses];
        for (int pass = 0; pass < kPasses; ++pass) a[pass] = broadcast_i32(rows[r].lanes + c * kFields + 4 * pass);
        for (int h = 0; h < kH; ++h) Dot::template column<kPasses>(acc[h][r] + kOffset, u[h], a);
      }
    };
    std::size_t c = c0;
    for (; c + 2 <= c1; c += 2) {
      column(c, std::integral_constant<int, 0>());
      column(c + 1, std::integral_constant<int, 1>());
    }
    if (c < c1) column(c, std::integral_constant<int, 0>());
    for (int h = 0; h < kH; ++h) {
      const __m256 scale = _mm256_loadu_ps(tile_scales + g * kTileChannels + static_cast<std::size_t>(h) * kHalfChannels);
      const __m256i zp = zero_points_epi32<BITS>(p, t, g, h);
      for (int r = 0; r < MR; ++r) {
        const __m256i sum = _mm256_add_epi32(Dot::template finish<BITS>(acc[h][r]), Dot::template finish<BITS>(acc[h][r] + kAcc));
        const __m256i dot = _mm256_sub_epi32(sum, _mm256_mullo_epi32(zp, _mm256_set1_epi32(rows[r].sums[g])));
        const __m256 combined = _mm256_mul_ps(scale, _mm256_set1_ps(rows[r].scales[g]));
        total[h][r] = _mm256_add_ps(total[h][r], _mm256_mul_ps(_mm256_cvtepi32_ps(dot), combined));
      }
    }
  }
  for (int h = 0; h < kH; ++h)
    for (int r = 0; r < MR; ++r) store_half_row(p, t, static_cast<std::size_t>(h), m0 + r, total[h][r]);
}

// Each tile: rows of A in blocks of four, then the remainder.
template <int BITS, class Dot>
void int8_tiles_bits(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  for (std::size_t t = t_begin; t < t_end; ++t) {
    std::size_t m = 0;
    for (; m + 4 <= p.m; m += 4) int8_block<BITS, 4, Dot>(p, t, m);
    switch (p.m - m) {
      case 3: int8_block<BITS, 3, Dot>(p, t, m); break;
      case 2: int8_block<BITS, 2, Dot>(p, t, m); break;
      case 1: int8_block<BITS, 1, Dot>(p, t, m); break;
      default: break;
    }
  }
}

}  // namespace
}  // namespace graphopt_ext
