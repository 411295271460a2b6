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
