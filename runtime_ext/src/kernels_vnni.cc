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

// The group's per-row integer dot products, sum_k code * q (exact int32), of eight rows as
// one vector: the three VPHADDD levels and a 128-bit lane swap transpose-and-reduce the
// eight accumulators (lane r of the result is row r's sum).
inline __m256i hsum_rows8(const __m256i* acc) {
  const __m256i s0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
  const __m256i s4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]), _mm256_hadd_epi32(acc[6], acc[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                          _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

inline __m256i load_block32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// The dot products must stay below 2^31 in int32: |sum_k (code - zp) * q| <= 15 * 127 *
// group_size < 2^27 here. Larger groups take int8_tile<8>, whose epilogue is in int64.
constexpr std::size_t kMaxVectorGroup = std::size_t{1} << 16;

// Eight output channels n0..n0+7 of row m of Y, group_size <= kMaxVectorGroup. Same inner
// loop as int8_tile<8>, but the per-group epilogue stays in vectors with one lane per
// channel: hsum_rows8() turns the eight accumulators into one vector of group sums, the
// zero-point term zp * sum_q[g] is subtracted in int32, and lane r accumulates
// float(dot) * (scale[n0 + r, g] * scale_g) in fp32: the operations and order of the scalar
// epilogue of int8_tile(), so Y is bit-identical to it. Eight scalar horizontal sums plus
// scalar arithmetic per group cost about as much as the group's VPDPBUSD work at
// group_size 128; this epilogue is about a quarter of that. The channel scales (and zero
// points), one column of a [N, groups] array, are assembled from scalar loads (measured a
// little faster than VGATHERDPS here).
void int8_tile8(const LowBitProblem& p, std::size_t n0, std::size_t m) {
  const Int8Row act = int8_row(p, m);
  const std::size_t blocks = p.padded_k / 64;
  const std::size_t blocks_per_group = p.group_size / 64;
  const std::size_t stride = p.groups;  // between the tile's rows of scales / zero points
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const std::uint8_t* rows[8];
  for (int r = 0; r < 8; ++r) rows[r] = p.packed + (n0 + r) * p.row_bytes;
  const float* scales = p.scales + n0 * stride;
  const std::uint8_t* zps = p.zero_points ? p.zero_points + n0 * stride : nullptr;
  __m256i zp = _mm256_set1_epi32(8);  // symmetric codes
  __m256 total = _mm256_setzero_ps();
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t b0 = g * blocks_per_group;
    const std::size_t b1 = min_size(b0 + blocks_per_group, blocks);
    __m256i acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();
    for (std::size_t b = b0; b < b1; ++b) {
      const __m256i a_even = load_block32(act.blocked + b * 64);
      const __m256i a_odd = load_block32(act.blocked + b * 64 + 32);
      for (int r = 0; r < 8; ++r) {
        const __m256i words = load_block32(rows[r] + b * kBlockBytes);
        const __m256i even = _mm256_and_si256(words, nibble);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
        acc[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[r], even, a_even), odd, a_odd);
      }
    }
    if (zps) {
      const std::uint8_t* z = zps + g;
      zp = _mm256_setr_epi32(z[0], z[stride], z[2 * stride], z[3 * stride], z[4 * stride], z[5 * stride],
                             z[6 * stride], z[7 * stride]);
    }
    const __m256i dot = _mm256_sub_epi32(hsum_rows8(acc), _mm256_mullo_epi32(zp, _mm256_set1_epi32(act.sums[g])));
    const float* s = scales + g;
    const __m256 channel_scale = _mm256_setr_ps(s[0], s[stride], s[2 * stride], s[3 * stride], s[4 * stride],
                                                s[5 * stride], s[6 * stride], s[7 * stride]);
    const __m256 scale = _mm256_mul_ps(channel_scale, _mm256_set1_ps(act.scales[g]));
    total = _mm256_add_ps(total, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale));
  }
  if (p.bias) total = _mm256_add_ps(total, _mm256_loadu_ps(p.bias + n0));
  _mm256_storeu_ps(p.y + m * p.n + n0, total);
}

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
  if (p.group_size <= kMaxVectorGroup) {
    for (; n + 8 <= n_end; n += 8) {
      for (std::size_t m = 0; m < p.m; ++m) int8_tile8(p, n, m);
    }
  }
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
