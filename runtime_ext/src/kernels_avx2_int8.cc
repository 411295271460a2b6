// AVX2 kernels for accuracy_level 4 (int8 activations). Compiled with -mavx2 -mfma like
// kernels_avx2.cc and entered only through it.
#include <immintrin.h>

#include "kernels.h"
#include "simd_common.h"

namespace graphopt_ext {
namespace {

// accuracy_level 4, bits 4, group_size % 64 == 0 (groups of whole blocks). Per 64-code
// block and row: AND and shift+AND split the nibbles into two vectors of 32 unsigned bytes
// (fields 0, 2, 4, 6 and 1, 3, 5, 7), VPMADDUBSW against the block-ordered int8
// activations and VPADDWs; up to four blocks are summed in int16 before one VPMADDWD
// widens them to int32. The integer group sum is exact, so this equals
// int8_rows_generic() bit for bit.

template <int NR>
void int8_tile(const LowBitProblem& p, std::size_t n0, std::size_t m) {
  const Int8Row act = int8_row(p, m);
  const std::size_t blocks = p.padded_k / 64;
  const std::size_t blocks_per_group = p.group_size / 64;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const std::uint8_t* rows[NR];
  const float* scales[NR];
  const std::uint8_t* zps[NR];
  float total[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = p.packed + (n0 + r) * p.row_bytes;
    scales[r] = p.scales + (n0 + r) * p.groups;
    zps[r] = p.zero_points ? p.zero_points + (n0 + r) * p.groups : nullptr;
    total[r] = 0.0f;
  }
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t b0 = g * blocks_per_group;
    const std::size_t b1 = min_size(b0 + blocks_per_group, blocks);
    __m256i acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_si256();
    // int16 pair sums stay below 2 * 2 * 15 * 127 = 7620 per block: four blocks fit in int16
    // before widening to int32.
    for (std::size_t b = b0; b < b1;) {
      const std::size_t b_end = min_size(b + 4, b1);
      __m256i pairs[NR];
      for (int r = 0; r < NR; ++r) pairs[r] = _mm256_setzero_si256();
      for (; b < b_end; ++b) {
        const __m256i a_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64));
        const __m256i a_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64 + 32));
        for (int r = 0; r < NR; ++r) {
          const __m256i words = load_block(rows[r] + b * kBlockBytes);
          const __m256i even = _mm256_and_si256(words, nibble);
          const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
          pairs[r] = _mm256_add_epi16(pairs[r], _mm256_add_epi16(_mm256_maddubs_epi16(even, a_even),
                                                                 _mm256_maddubs_epi16(odd, a_odd)));
        }
      }
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs[r], ones));
    }
    std::int32_t sums[NR];
    hsum_rows<NR>(acc, sums);
    for (int r = 0; r < NR; ++r) {
      const std::int32_t zp = zps[r] ? zps[r][g] : 8;
      const std::int64_t dot = static_cast<std::int64_t>(sums[r]) - static_cast<std::int64_t>(zp) * act.sums[g];
      total[r] += static_cast<float>(dot) * (scales[r][g] * act.scales[g]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    float y = total[r];
    if (p.bias) y += p.bias[n0 + r];
    p.y[m * p.n + n0 + r] = y;
  }
}

// group_size 32: a block holds two groups, and they sit in the same byte positions of the
// even and odd vectors (bytes 0-1 of each word: k < 32; bytes 2-3: k >= 32), so the int16
// pair sums alternate between the groups; VPMADDWD against (1, 0) and (0, 1) splits them.
template <int NR>
void int8_tile32(const LowBitProblem& p, std::size_t n0, std::size_t m) {
  const Int8Row act = int8_row(p, m);
  const std::size_t blocks = p.padded_k / 64;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i first = _mm256_set1_epi32(0x00000001);
  const __m256i second = _mm256_set1_epi32(0x00010000);
  const std::uint8_t* rows[NR];
  const float* scales[NR];
  const std::uint8_t* zps[NR];
  float total[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = p.packed + (n0 + r) * p.row_bytes;
    scales[r] = p.scales + (n0 + r) * p.groups;
    zps[r] = p.zero_points ? p.zero_points + (n0 + r) * p.groups : nullptr;
    total[r] = 0.0f;
  }
  for (std::size_t b = 0; b < blocks; ++b) {
    const __m256i a_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64));
    const __m256i a_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64 + 32));
    __m256i lo[NR];
    __m256i hi[NR];
    for (int r = 0; r < NR; ++r) {
      const __m256i words = load_block(rows[r] + b * kBlockBytes);
      const __m256i even = _mm256_and_si256(words, nibble);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(even, a_even), _mm256_maddubs_epi16(odd, a_odd));
      lo[r] = _mm256_madd_epi16(pairs, first);
      hi[r] = _mm256_madd_epi16(pairs, second);
    }
    for (int half = 0; half < 2; ++half) {
      const std::size_t g = 2 * b + static_cast<std::size_t>(half);
      if (g >= p.groups) break;  // the padding half of the last block
      std::int32_t sums[NR];
      hsum_rows<NR>(half ? hi : lo, sums);
      for (int r = 0; r < NR; ++r) {
        const std::int32_t zp = zps[r] ? zps[r][g] : 8;
        const std::int64_t dot = static_cast<std::int64_t>(sums[r]) - static_cast<std::int64_t>(zp) * act.sums[g];
        total[r] += static_cast<float>(dot) * (scales[r][g] * act.scales[g]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    float y = total[r];
    if (p.bias) y += p.bias[n0 + r];
    p.y[m * p.n + n0 + r] = y;
  }
}

}  // namespace

// int8_quantize_group() eight activations at a time, bit for bit: |a| by clearing the sign,
// finiteness by |a| <= FLT_MAX (false for NaN and Inf), the same round-to-even by adding and
// removing 1.5 * 2^23, the same clamp; int32 -> int8 by two saturating packs (values are
// already in [-127, 127]). A short tail is zero-padded, which changes neither amax nor
// sum(q) (q of 0 is 0), and only its count bytes are stored.
void int8_quantize_group_avx2(const float* a, std::size_t count, std::int8_t* q, float* scale,
                              std::int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 max_finite = _mm256_set1_ps(3.40282347e+38f);
  const std::size_t full = count / kLanes * kLanes;
  float tail[kLanes] = {};
  for (std::size_t k = full; k < count; ++k) tail[k - full] = a[k];
  auto chunk = [&](std::size_t k) { return k < full ? _mm256_loadu_ps(a + k) : _mm256_loadu_ps(tail); };

  __m256 amax = _mm256_setzero_ps();
  __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (std::size_t k = 0; k < count; k += kLanes) {
    const __m256 magnitude = _mm256_and_ps(chunk(k), abs_mask);
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(magnitude, max_finite, _CMP_LE_OQ));
    amax = _mm256_max_ps(amax, magnitude);
  }
  if (_mm256_movemask_ps(finite) != 0xFF) {  // a NaN or Inf: Y is NaN as in fp32
    for (std::size_t k = 0; k < count; ++k) q[k] = 0;
    *scale = _mm_cvtss_f32(_mm_castsi128_ps(_mm_set1_epi32(0x7FC00000)));  // quiet NaN
    *sum = 0;
    return;
  }
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 0x55));
  const float group_max = _mm_cvtss_f32(half);
  const __m256 inverse = _mm256_set1_ps(group_max > 0.0f ? 127.0f / group_max : 0.0f);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 upper = _mm256_set1_ps(127.0f);
  const __m256 lower = _mm256_set1_ps(-127.0f);
  __m256i total = _mm256_setzero_si256();
  for (std::size_t k = 0; k < count; k += kLanes) {
    const __m256 rounded = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(chunk(k), inverse), magic), magic);
    const __m256i value = _mm256_cvttps_epi32(_mm256_max_ps(_mm256_min_ps(rounded, upper), lower));
    total = _mm256_add_epi32(total, value);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(value), _mm256_extracti128_si256(value, 1));
    const __m128i bytes = _mm_packs_epi16(words, words);
    if (k < full) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), bytes);
    } else {
      alignas(16) std::int8_t last[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(last), bytes);
      for (std::size_t i = 0; k + i < count; ++i) q[k + i] = last[i];
    }
  }
  *scale = group_max / 127.0f;
  *sum = hsum_i32(total);
}

void int8_rows_avx2(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  if (p.bits == 4 && p.group_size == 32) {
    std::size_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) {
      for (std::size_t m = 0; m < p.m; ++m) int8_tile32<4>(p, n, m);
    }
    for (; n < n_end; ++n) {
      for (std::size_t m = 0; m < p.m; ++m) int8_tile32<1>(p, n, m);
    }
    return;
  }
  if (p.bits != 4 || p.group_size % 64 != 0) {
    int8_rows_generic(p, n_begin, n_end);
    return;
  }
  // Rows of four output channels stay in L1 while every row of A passes over them.
  std::size_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    for (std::size_t m = 0; m < p.m; ++m) int8_tile<4>(p, n, m);
  }
  for (; n < n_end; ++n) {
    for (std::size_t m = 0; m < p.m; ++m) int8_tile<1>(p, n, m);
  }
}

}  // namespace graphopt_ext
