// AVX512-VNNI (256-bit, EVEX) kernel for accuracy_level 4, bits 4, group_size % 64 == 0.
// This translation unit alone is compiled with -mavx512vnni -mavx512vl (plus AVX2 and
// AVX512F/BW for the intrinsics); it is only entered after select_kernels() checked the
// CPU. Same arithmetic as int8_rows_generic(): VPDPBUSD replaces VPMADDUBSW + VPMADDWD +
// VPADDD of the AVX2 kernel. Like kernels_avx2.cc, it instantiates no standard-library
// template and keeps everything but the entry point internal.
#include <immintrin.h>

#include "kernels.h"
#include "simd_common.h"

namespace graphopt_ext {
namespace {

template <int NR>
void int8_tile(const LowBitProblem& p, std::size_t n0, std::size_t m) {
  const Int8Row act = int8_row(p, m);
  const std::size_t blocks = p.padded_k / 64;
  const std::size_t blocks_per_group = p.group_size / 64;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
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
    for (std::size_t b = b0; b < b1; ++b) {
      const __m256i a_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64));
      const __m256i a_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act.blocked + b * 64 + 32));
      for (int r = 0; r < NR; ++r) {
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + b * kBlockBytes));
        const __m256i even = _mm256_and_si256(words, nibble);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
        acc[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[r], even, a_even), odd, a_odd);
      }
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

}  // namespace

// Eight rows per tile (EVEX has 32 vector registers); one accumulator per row, the even
// and odd VPDPBUSD chained (measured faster here than two accumulators per row).
void int8_rows_vnni(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  std::size_t n = n_begin;
  for (; n + 8 <= n_end; n += 8) {
    for (std::size_t m = 0; m < p.m; ++m) int8_tile<8>(p, n, m);
  }
  for (; n + 4 <= n_end; n += 4) {
    for (std::size_t m = 0; m < p.m; ++m) int8_tile<4>(p, n, m);
  }
  for (; n < n_end; ++n) {
    for (std::size_t m = 0; m < p.m; ++m) int8_tile<1>(p, n, m);
  }
}

}  // namespace graphopt_ext
