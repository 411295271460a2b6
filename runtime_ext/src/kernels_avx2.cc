// AVX2+FMA fp32 kernels for graphopt.MatMulLowBit. This unit and kernels_avx2_int8.cc
// alone are compiled with -mavx2 -mfma; entered only after select_kernels() checked the CPU.
// Everything here has internal linkage and no standard-library template is instantiated,
// so no AVX2-compiled inline function can be merged into code the other units run.
#include <immintrin.h>

#include "kernels.h"
#include "simd_common.h"

namespace graphopt_ext {
namespace {

// ---------------------------------------------------------------- fp32 activations
//
// A 256-bit load of half of word column c of a tile holds field f (code k = c F + f) of the eight
// channels in the eight lanes, as code * 2^(f bits) after an AND with the field's mask;
// that converts to float exactly. prepare() scales A's element k by 2^-(f bits) so no shift
// is needed (the top field of a full word is shifted instead, as its mask would reach the
// sign bit). Then each field costs AND, convert and one FMA per row of A against A's
// broadcast element, and the lanes of a column's two halves accumulate sixteen output
// channels: no horizontal sums. Zero points enter once per group, sum((code - zp) a) = sum(code a) - zp sum(a),
// with A's group sums from prepare(); scales once per group.
//
// prepared, per row of A (prepared_stride bytes): float a_scaled[padded_k] (zero past K),
// float group_sum[groups].

std::size_t fp32_row_floats(const LowBitProblem& p) { return (p.padded_k() + p.groups + 15) / 16 * 16; }

std::size_t fp32_workspace(const LowBitProblem& p) { return p.m * fp32_row_floats(p) * sizeof(float); }

template <int BITS>
constexpr bool top_field_shifted() {
  return codes_per_word(BITS) * BITS == 32;
}

template <int BITS>
void fp32_prepare_bits(LowBitProblem& p, std::uint8_t* workspace) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  float factors[kFields];
  for (std::size_t f = 0; f < kFields; ++f) {
    const bool shifted = top_field_shifted<BITS>() && f == kFields - 1;
    factors[f] = shifted ? 1.0f : 1.0f / static_cast<float>(1u << (f * BITS));  // exact powers of 2
  }
  const std::size_t stride = fp32_row_floats(p);
  float* base = reinterpret_cast<float*>(workspace);  // float arrays created in byte storage
  for (std::size_t m = 0; m < p.m; ++m) {
    const float* a = p.a + m * p.k;
    float* scaled = base + m * stride;
    float* group_sums = scaled + p.padded_k();
    for (std::size_t k = 0; k < p.padded_k(); ++k) scaled[k] = k < p.k ? a[k] * factors[k % kFields] : 0.0f;
    for (std::size_t g = 0; g < p.groups; ++g) {
      const std::size_t k0 = g * p.group_size;
      const std::size_t k1 = min_size(k0 + p.group_size, p.k);
      __m256 acc = _mm256_setzero_ps();
      std::size_t k = k0;
      for (; k + kLanes <= k1; k += kLanes) acc = _mm256_add_ps(acc, _mm256_loadu_ps(a + k));
      float sum = hsum(acc);
      for (; k < k1; ++k) sum += a[k];
      group_sums[g] = sum;
    }
  }
  p.prepared = workspace;
  p.prepared_stride = stride * sizeof(float);
}

void fp32_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  switch (p.bits) {
    case 2: fp32_prepare_bits<2>(p, workspace); break;
    case 3: fp32_prepare_bits<3>(p, workspace); break;
    case 4: fp32_prepare_bits<4>(p, workspace); break;
    default: fp32_prepare_bits<8>(p, workspace); break;
  }
}

// Field f of word column vector w, as float (exact): code * 2^(f BITS).
template <int BITS>
inline __m256 field_as_float(__m256i w, std::size_t f) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  if (top_field_shifted<BITS>() && f == kFields - 1) return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 32 - BITS));
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (f * BITS)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
}

// Zero points of half h of tile t in group g as floats (implicit 2^(BITS-1) when absent).
template <int BITS>
inline __m256 zero_points_ps(const LowBitProblem& p, std::size_t t, std::size_t g, std::size_t h) {
  const std::uint8_t* zps = p.tile_zero_points(t);
  if (!zps) return _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));
  const std::uint8_t* at = zps + g * kTileChannels + h * kHalfChannels;
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
}

// Y[m0 .. m0 + MR, tile t] += sum over group g's columns, then the group's scale and zero
// points. group_size % F == 0 (whole columns per group). Independent accumulators per
// (half, row) and field parity: eight FMA chains in flight for any MR.
template <int BITS, int MR>
void fp32_block(const LowBitProblem& p, std::size_t t, std::size_t m0) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  constexpr int kH = static_cast<int>(kHalves);
  constexpr int kSplit = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const std::size_t columns_per_group = p.group_size / kFields;
  const float* rows[MR];
  const float* group_sums[MR];
  for (int r = 0; r < MR; ++r) {
    rows[r] = reinterpret_cast<const float*>(p.prepared + (m0 + r) * p.prepared_stride);
    group_sums[r] = rows[r] + p.padded_k();
  }
  const std::uint8_t* tile = p.tile(t);
  const float* tile_scales = p.tile_scales(t);
  __m256 total[kH][MR];
  for (int h = 0; h < kH; ++h)
    for (int r = 0; r < MR; ++r) total[h][r] = _mm256_setzero_ps();
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t c0 = g * columns_per_group;
    const std::size_t c1 = min_size(c0 + columns_per_group, p.columns);
    __m256 acc[kH][MR][kSplit];
    for (int h = 0; h < kH; ++h)
      for (int r = 0; r < MR; ++r)
        for (int s = 0; s < kSplit; ++s) acc[h][r][s] = _mm256_setzero_ps();
    for (std::size_t c = c0; c < c1; ++c) {
      __m256i w[kH];
      for (int h = 0; h < kH; ++h) w[h] = load_block(tile + c * kColumnBytes + static_cast<std::size_t>(h) * 32);
      const std::size_t k = c * kFields;
#pragma GCC unroll 16
      for (std::size_t f = 0; f < kFields; ++f) {
        __m256 codes[kH];
        for (int h = 0; h < kH; ++h) codes[h] = field_as_float<BITS>(w[h], f);
        for (int r = 0; r < MR; ++r) {
          const __m256 a = _mm256_broadcast_ss(rows[r] + k + f);
          for (int h = 0; h < kH; ++h) acc[h][r][f % kSplit] = _mm256_fmadd_ps(codes[h], a, acc[h][r][f % kSplit]);
        }
      }
    }
    for (int h = 0; h < kH; ++h) {
      const __m256 scale = _mm256_loadu_ps(tile_scales + g * kTileChannels + static_cast<std::size_t>(h) * kHalfChannels);
      const __m256 zp = zero_points_ps<BITS>(p, t, g, static_cast<std::size_t>(h));
      for (int r = 0; r < MR; ++r) {
        __m256 sum = acc[h][r][0];
        for (int s = 1; s < kSplit; ++s) sum = _mm256_add_ps(sum, acc[h][r][s]);
        const __m256 centered = _mm256_fnmadd_ps(zp, _mm256_broadcast_ss(group_sums[r] + g), sum);
        total[h][r] = _mm256_fmadd_ps(centered, scale, total[h][r]);
      }
    }
  }
  for (int h = 0; h < kH; ++h)
    for (int r = 0; r < MR; ++r) store_half_row(p, t, static_cast<std::size_t>(h), m0 + r, total[h][r]);
}

// Any group size: fields one at a time with runtime masks (groups may split a word).
template <int BITS>
void fp32_tile_any_group(const LowBitProblem& p, std::size_t t, std::size_t m) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  const float* row = reinterpret_cast<const float*>(p.prepared + m * p.prepared_stride);
  const float* group_sums = row + p.padded_k();
  const std::uint8_t* tile = p.tile(t);
  for (std::size_t h = 0; h < kHalves; ++h) {
    __m256 total = _mm256_setzero_ps();
    for (std::size_t g = 0; g < p.groups; ++g) {
      const std::size_t k0 = g * p.group_size;
      const std::size_t k1 = min_size(k0 + p.group_size, p.k);
      __m256 acc = _mm256_setzero_ps();
      for (std::size_t k = k0; k < k1; ++k) {
        const std::size_t f = k % kFields;
        const __m256i w = load_block(tile + (k / kFields) * kColumnBytes + h * 32);
        __m256 codes;
        if (top_field_shifted<BITS>() && f == kFields - 1) {
          codes = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 32 - BITS));
        } else {
          const __m256i mask = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (f * BITS)));
          codes = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
        }
        acc = _mm256_fmadd_ps(codes, _mm256_broadcast_ss(row + k), acc);
      }
      const __m256 scale = _mm256_loadu_ps(p.tile_scales(t) + g * kTileChannels + h * kHalfChannels);
      const __m256 centered = _mm256_fnmadd_ps(zero_points_ps<BITS>(p, t, g, h), _mm256_broadcast_ss(group_sums + g), acc);
      total = _mm256_fmadd_ps(centered, scale, total);
    }
    store_half_row(p, t, h, m, total);
  }
}

// Each tile: rows of A in blocks of four, then the remainder.
template <int BITS>
void fp32_tiles_bits(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  const bool whole_columns = p.group_size % codes_per_word(BITS) == 0;
  for (std::size_t t = t_begin; t < t_end; ++t) {
    if (!whole_columns) {
      for (std::size_t m = 0; m < p.m; ++m) fp32_tile_any_group<BITS>(p, t, m);
      continue;
    }
    std::size_t m = 0;
    for (; m + 4 <= p.m; m += 4) fp32_block<BITS, 4>(p, t, m);
    switch (p.m - m) {
      case 3: fp32_block<BITS, 3>(p, t, m); break;
      case 2: fp32_block<BITS, 2>(p, t, m); break;
      case 1: fp32_block<BITS, 1>(p, t, m); break;
      default: break;
    }
  }
}

void fp32_tiles(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  switch (p.bits) {
    case 2: fp32_tiles_bits<2>(p, t_begin, t_end); break;
    case 3: fp32_tiles_bits<3>(p, t_begin, t_end); break;
    case 4: fp32_tiles_bits<4>(p, t_begin, t_end); break;
    default: fp32_tiles_bits<8>(p, t_begin, t_end); break;
  }
}

// ---------------------------------------------------------------- int8 activations
//
// int8_prepare() eight values at a time: |a| by clearing the sign bit, the group's amax
// with VMAXPS, finiteness by |a| < inf, a * (127 / amax) rounded with VROUNDPS to nearest
// even (the scalar code's exact rounding), clamped, packed to bytes; the same float
// operations in the same order, so the results are identical. Lanes order by one byte
// shuffle per 16 codes.

// Quantizes a[k0, k1) with inverse into q (and returns the sum), scalar tail included.
inline std::int32_t quantize_run(const float* a, std::size_t k0, std::size_t k1, float inverse, std::int8_t* q) {
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256 hi = _mm256_set1_ps(127.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f);
  __m256i sums = _mm256_setzero_si256();
  std::size_t k = k0;
  for (; k + kLanes <= k1; k += kLanes) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + k), scale);
    const __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    const __m256i v = _mm256_cvtps_epi32(r);
    sums = _mm256_add_epi32(sums, v);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(words, words));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  std::int32_t sum = _mm_cvtsi128_si32(s4);
  for (; k < k1; ++k) {
    const __m128 x = _mm_mul_ss(_mm_set_ss(a[k]), _mm_set_ss(inverse));
    const __m128 r = _mm_min_ss(_mm_max_ss(_mm_round_ss(x, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                           _mm_set_ss(-127.0f)), _mm_set_ss(127.0f));
    const auto value = static_cast<std::int8_t>(_mm_cvtss_si32(r));
    q[k] = value;
    sum += value;
  }
  return sum;
}

// Largest |a[k]| over [k0, k1) and whether all are finite.
inline float group_amax(const float* a, std::size_t k0, std::size_t k1, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  __m256 amax = _mm256_setzero_ps();
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  std::size_t k = k0;
  for (; k + kLanes <= k1; k += kLanes) {
    const __m256 magnitude = _mm256_andnot_ps(sign, _mm256_loadu_ps(a + k));
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(magnitude, inf, _CMP_LT_OQ));
    amax = _mm256_max_ps(amax, magnitude);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, amax);
  float result = 0.0f;
  for (float lane : lanes) result = lane > result ? lane : result;
  bool all = _mm256_movemask_ps(ok) == 0xFF;
  for (; k < k1; ++k) {
    const float magnitude = a[k] < 0.0f ? -a[k] : a[k];
    all = all && magnitude < __builtin_inff();
    result = magnitude > result ? magnitude : result;
  }
  *finite = all;
  return result;
}

}  // namespace

void int8_prepare_avx2(LowBitProblem& p, std::uint8_t* workspace) {
  const std::size_t padded_k = p.padded_k();
  p.prepared_stride = int8_row_stride(p);
  p.prepared = workspace;
  // Byte order of one 16-code lane: pass t's four bytes are codes P i + t.
  alignas(16) static const std::int8_t kOrder4[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
  alignas(16) static const std::int8_t kOrder2[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  for (std::size_t m = 0; m < p.m; ++m) {
    const auto [natural, lanes, scales, sums] = int8_row_buffers(p, workspace, m);
    const float* a = p.a + m * p.k;
    for (std::size_t k = p.k; k < padded_k; ++k) natural[k] = 0;
    for (std::size_t g = 0; g < p.groups; ++g) {
      const std::size_t k0 = g * p.group_size;
      const std::size_t k1 = min_size(k0 + p.group_size, p.k);
      bool finite = true;
      const float amax = group_amax(a, k0, k1, &finite);
      // A non-finite activation makes the group's scale NaN, so Y is NaN as in fp32.
      const float inverse = (finite && amax > 0.0f) ? 127.0f / amax : 0.0f;
      if (finite) {
        sums[g] = quantize_run(a, k0, k1, inverse, natural);
      } else {
        for (std::size_t k = k0; k < k1; ++k) natural[k] = 0;
        sums[g] = 0;
      }
      scales[g] = finite ? amax / 127.0f : __builtin_nanf("");
    }
    if (p.bits == 4 || p.bits == 2) {
      const __m128i order = _mm_load_si128(reinterpret_cast<const __m128i*>(p.bits == 4 ? kOrder4 : kOrder2));
      std::size_t k = 0;
      for (; k + 16 <= padded_k; k += 16) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(natural + k));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes + k), _mm_shuffle_epi8(bytes, order));
      }
      if (k < padded_k) {  // int4: one last word of 8 codes (its order entries stay below 8)
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(natural + k));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(lanes + k), _mm_shuffle_epi8(bytes, order));
      }
    } else if (p.bits == 8) {
      for (std::size_t k = 0; k < padded_k; ++k) lanes[k] = natural[k];
    } else {
      for (std::size_t k = 0; k < padded_k; ++k) lanes[k] = 0;
    }
  }
}

namespace {

std::size_t workspace_bytes(const LowBitProblem& p) {
  return p.accuracy_level == 4 ? int8_workspace_bytes(p) : fp32_workspace(p);
}

void prepare(LowBitProblem& p, std::uint8_t* workspace) {
  if (p.accuracy_level == 4) {
    int8_prepare_avx2(p, workspace);
  } else {
    fp32_prepare(p, workspace);
  }
}

void tiles_avx2(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  if (p.accuracy_level != 4) {
    fp32_tiles(p, t_begin, t_end);
  } else if (int8_simd_shape(p) && p.bits != 8) {
    int8_tiles_avx2(p, t_begin, t_end);
  } else {
    int8_tiles_generic(p, t_begin, t_end);
  }
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet kernels{"avx2", &workspace_bytes, &prepare, &tiles_avx2};
  return kernels;
}

#if defined(GRAPHOPT_EXT_HAVE_AVX512VNNI)
namespace {
void tiles_vnni(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  if (p.accuracy_level == 4 && int8_simd_shape(p)) {
    int8_tiles_vnni(p, t_begin, t_end);
    return;
  }
  tiles_avx2(p, t_begin, t_end);
}
}  // namespace

const KernelSet& avx2_vnni_kernels() {
  static const KernelSet kernels{"avx2+avx512vnni", &workspace_bytes, &prepare, &tiles_vnni};
  return kernels;
}
#endif

}  // namespace graphopt_ext
