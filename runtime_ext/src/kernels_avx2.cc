// AVX2+FMA fp32 kernels for graphopt.MatMulLowBit. This unit and kernels_avx2_int8.cc
// alone are compiled with -mavx2 -mfma; entered only after select_kernels() checked the CPU.
// Everything here has internal linkage and no standard-library template is instantiated,
// so no AVX2-compiled inline function can be merged into code the other units run.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd_common.h"

namespace graphopt_ext {
namespace {

// ---------------------------------------------------------------- GEMV (M == 1)
//
// Needs group_size % 8 == 0 (each chunk of 8 consecutive codes lies in one group).
// Field f of a word holds code * 2^(f * BITS) after a plain AND with its mask, and that
// converts to float exactly; prepare() scales A's chunk of field f by 2^-(f * BITS) so no
// shift is needed (the top field of a full word is shifted instead, as its mask would hit
// the sign bit). Zero points enter once per group: sum((code - zp) * a) =
// sum(code * a) - zp * sum(a), with the group sums of A from prepare(). So one 8-code
// chunk of one row costs AND, convert and FMA.
//
// prepared layout: a_scaled[padded_k], then group_sums[groups].

template <int BITS>
std::size_t gemv_workspace(const LowBitProblem& p) {
  return (p.padded_k + p.groups) * sizeof(float);
}

template <int BITS>
constexpr bool top_field_shifted() {
  return codes_per_word(BITS) * BITS == 32;
}

template <int BITS>
void gemv_prepare(LowBitProblem& p, std::uint8_t* workspace) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  float* a_scaled = reinterpret_cast<float*>(workspace);  // float arrays created in byte storage
  float* group_sums = a_scaled + p.padded_k;
  const std::size_t chunks = p.padded_k / kLanes;
  float factors[kFields];
  for (std::size_t field = 0; field < kFields; ++field) {
    const bool shifted = top_field_shifted<BITS>() && field == kFields - 1;
    factors[field] = shifted ? 1.0f : 1.0f / static_cast<float>(1u << (field * BITS));  // exact powers of 2
  }
  for (std::size_t c = 0; c < chunks; ++c) {
    const __m256 factor = _mm256_set1_ps(factors[c % kFields]);
    _mm256_storeu_ps(a_scaled + c * kLanes, _mm256_mul_ps(_mm256_loadu_ps(p.a + c * kLanes), factor));
  }
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t k0 = g * p.group_size;
    const std::size_t k1 = min_size(k0 + p.group_size, p.k);
    __m256 acc = _mm256_setzero_ps();
    std::size_t k = k0;
    for (; k + kLanes <= k1; k += kLanes) acc = _mm256_add_ps(acc, _mm256_loadu_ps(p.a + k));
    float sum = hsum(acc);
    for (; k < k1; ++k) sum += p.a[k];
    group_sums[g] = sum;
  }
  p.prepared = a_scaled;
}

template <int BITS, int NR>
void gemv_tile(const LowBitProblem& p, std::size_t n0) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  constexpr std::size_t kCodesPerBlock = codes_per_block(BITS);
  constexpr std::uint32_t kMask = (1u << BITS) - 1u;
  const float* a_scaled = p.prepared;
  const float* group_sums = p.prepared + p.padded_k;
  const std::size_t blocks = p.padded_k / kCodesPerBlock;
  const std::size_t chunks_per_group = p.group_size / kLanes;
  const std::size_t last_group = p.groups - 1;

  const std::uint8_t* rows[NR];
  const float* scales[NR];
  // Two accumulators per row (even and odd fields) keep 2 * NR FMA chains in flight.
  __m256 acc[NR][2];
  float total[NR][kLanes] = {};
  for (int r = 0; r < NR; ++r) {
    rows[r] = p.packed + (n0 + r) * p.row_bytes;
    scales[r] = p.scales + (n0 + r) * p.groups;
    acc[r][0] = _mm256_setzero_ps();
    acc[r][1] = _mm256_setzero_ps();
  }
  auto flush = [&](std::size_t group) {
    // Past the last group only zero padding accumulates: clamp the scale index.
    const std::size_t g = group < last_group ? group : last_group;
    for (int r = 0; r < NR; ++r) {
      const __m256 sum = _mm256_add_ps(acc[r][0], acc[r][1]);
      _mm256_storeu_ps(total[r], _mm256_fmadd_ps(sum, _mm256_set1_ps(scales[r][g]), _mm256_loadu_ps(total[r])));
      acc[r][0] = _mm256_setzero_ps();
      acc[r][1] = _mm256_setzero_ps();
    }
  };
  std::size_t group = 0;
  std::size_t in_group = 0;
  for (std::size_t b = 0; b < blocks; ++b) {
    __m256i words[NR];
    for (int r = 0; r < NR; ++r) words[r] = load_block(rows[r] + b * kBlockBytes);
    const float* a_block = a_scaled + b * kCodesPerBlock;
#pragma GCC unroll 16
    for (std::size_t f = 0; f < kFields; ++f) {
      const __m256 av = _mm256_loadu_ps(a_block + f * kLanes);
      const bool shifted = top_field_shifted<BITS>() && f == kFields - 1;
      const __m256i mask = _mm256_set1_epi32(static_cast<int>(kMask << (f * BITS)));
      for (int r = 0; r < NR; ++r) {
        const __m256i codes = shifted ? _mm256_srli_epi32(words[r], 32 - BITS) : _mm256_and_si256(words[r], mask);
        acc[r][f & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), av, acc[r][f & 1]);
      }
      if (++in_group == chunks_per_group) {
        flush(group);
        ++group;
        in_group = 0;
      }
    }
  }
  if (in_group) flush(group);
  const float implicit_zp = static_cast<float>(1 << (BITS - 1));
  for (int r = 0; r < NR; ++r) {
    const std::uint8_t* zps = p.zero_points ? p.zero_points + (n0 + r) * p.groups : nullptr;
    float correction = 0.0f;
    for (std::size_t g = 0; g < p.groups; ++g) {
      const float zp = zps ? static_cast<float>(zps[g]) : implicit_zp;
      correction += scales[r][g] * zp * group_sums[g];
    }
    float y = hsum(_mm256_loadu_ps(total[r])) - correction;
    if (p.bias) y += p.bias[n0 + r];
    p.y[n0 + r] = y;
  }
}

template <int BITS>
void gemv_rows(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  std::size_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) gemv_tile<BITS, 4>(p, n);
  for (; n < n_end; ++n) gemv_tile<BITS, 1>(p, n);
}

// Dequantizes row n into out[0 .. chunks * 8): (code - zp) * scale, zeros past K.
template <int BITS>
void dequant_row_vec(const LowBitProblem& p, std::size_t n, float* out) {
  constexpr std::size_t kFields = codes_per_word(BITS);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int implicit_zp = 1 << (BITS - 1);
  const std::size_t chunks = (p.k + kLanes - 1) / kLanes;
  const std::size_t chunks_per_group = p.group_size / kLanes;
  const std::uint8_t* row = p.packed + n * p.row_bytes;
  const float* scales = p.scales + n * p.groups;
  const std::uint8_t* zps = p.zero_points ? p.zero_points + n * p.groups : nullptr;
  std::size_t block_offset = 0;
  std::size_t field = 0;
  for (std::size_t g = 0; g < p.groups; ++g) {
    const std::size_t c0 = g * chunks_per_group;
    const std::size_t c1 = min_size(c0 + chunks_per_group, chunks);
    const __m256i zp = _mm256_set1_epi32(zps ? zps[g] : implicit_zp);
    const __m256 scale = _mm256_set1_ps(scales[g]);
    for (std::size_t c = c0; c < c1; ++c) {
      const __m128i count = _mm_cvtsi32_si128(static_cast<int>(field * BITS));
      const __m256i codes = _mm256_and_si256(_mm256_srl_epi32(load_block(row + block_offset), count), mask);
      _mm256_storeu_ps(out + c * kLanes, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes, zp)), scale));
      if (++field == kFields) {
        field = 0;
        block_offset += kBlockBytes;
      }
    }
  }
  // Codes past K dequantize to -zp * scale; A is zero there, but keep the row clean.
  for (std::size_t k = p.k; k < chunks * kLanes; ++k) out[k] = 0.0f;
}

// Any group size: one code at a time.
void dequant_row_any(const LowBitProblem& p, std::size_t n, float* out) {
  const std::uint8_t* row = p.packed + n * p.row_bytes;
  const float* scales = p.scales + n * p.groups;
  const std::uint8_t* zps = p.zero_points ? p.zero_points + n * p.groups : nullptr;
  const std::uint32_t implicit_zp = 1u << (p.bits - 1);
  const std::size_t per_block = kWordsPerBlock * static_cast<std::size_t>(32 / p.bits);
  const std::uint32_t mask = (1u << p.bits) - 1u;
  const std::size_t chunks = (p.k + kLanes - 1) / kLanes;
  for (std::size_t k = 0; k < p.k; ++k) {
    const std::size_t g = k / p.group_size;
    const std::size_t in_block = k % per_block;
    std::uint32_t word = 0;
    std::memcpy(&word, row + (k / per_block) * kBlockBytes + (in_block % kWordsPerBlock) * 4, 4);
    const std::uint32_t code = (word >> ((in_block / kWordsPerBlock) * p.bits)) & mask;
    const float zp = static_cast<float>(zps ? zps[g] : implicit_zp);
    out[k] = (static_cast<float>(code) - zp) * scales[g];
  }
  for (std::size_t k = p.k; k < chunks * kLanes; ++k) out[k] = 0.0f;
}

using DequantFn = void (*)(const LowBitProblem&, std::size_t, float*);

DequantFn dequant_for(const LowBitProblem& p) {
  if (p.group_size % kLanes != 0) return &dequant_row_any;
  switch (p.bits) {
    case 2: return &dequant_row_vec<2>;
    case 3: return &dequant_row_vec<3>;
    case 4: return &dequant_row_vec<4>;
    case 8: return &dequant_row_vec<8>;
    default: return &dequant_row_any;
  }
}

// Y[m0 .. m0+MR, n0 .. n0+NR] from dequantized rows w[NR] (chunks * 8 floats each).
template <int MR, int NR>
void dot_tile(const LowBitProblem& p, const float* const* w, std::size_t m0, std::size_t n0,
              std::size_t chunks) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* a[MR];
  for (int i = 0; i < MR; ++i) a[i] = p.a + (m0 + i) * p.padded_k;
  for (std::size_t c = 0; c < chunks; ++c) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w[j] + c * kLanes);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a[i] + c * kLanes);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(wv[j], av, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float y = hsum(acc[i][j]);
      if (p.bias) y += p.bias[n0 + j];
      p.y[(m0 + i) * p.n + n0 + j] = y;
    }
  }
}

template <int NR>
void dot_rows(const LowBitProblem& p, const float* const* w, std::size_t n0, std::size_t chunks) {
  std::size_t m = 0;
  for (; m + 4 <= p.m; m += 4) dot_tile<4, NR>(p, w, m, n0, chunks);
  switch (p.m - m) {
    case 3: dot_tile<3, NR>(p, w, m, n0, chunks); break;
    case 2: dot_tile<2, NR>(p, w, m, n0, chunks); break;
    case 1: dot_tile<1, NR>(p, w, m, n0, chunks); break;
    default: break;
  }
}

// Small GEMM (and GEMV with odd group sizes): dequantize two rows, then dot with all of A.
void gemm_rows(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  const std::size_t chunks = (p.k + kLanes - 1) / kLanes;
  float* buffer = thread_scratch(2 * chunks * kLanes);
  float* rows[2] = {buffer, buffer + chunks * kLanes};
  const DequantFn dequant = dequant_for(p);
  std::size_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) {
    dequant(p, n, rows[0]);
    dequant(p, n + 1, rows[1]);
    dot_rows<2>(p, rows, n, chunks);
  }
  if (n < n_end) {
    dequant(p, n, rows[0]);
    dot_rows<1>(p, rows, n, chunks);
  }
}

bool use_gemv(const LowBitProblem& p) { return p.m == 1 && p.group_size % kLanes == 0; }

std::size_t workspace_bytes(const LowBitProblem& p) {
  if (p.accuracy_level == 4) return int8_workspace_bytes(p);
  if (!use_gemv(p)) return 0;
  switch (p.bits) {
    case 2: return gemv_workspace<2>(p);
    case 3: return gemv_workspace<3>(p);
    case 4: return gemv_workspace<4>(p);
    case 8: return gemv_workspace<8>(p);
    default: return 0;
  }
}

void prepare(LowBitProblem& p, std::uint8_t* workspace) {
  if (p.accuracy_level == 4) {
    int8_prepare(p, workspace);
    return;
  }
  if (!use_gemv(p)) return;
  switch (p.bits) {
    case 2: gemv_prepare<2>(p, workspace); break;
    case 3: gemv_prepare<3>(p, workspace); break;
    case 4: gemv_prepare<4>(p, workspace); break;
    case 8: gemv_prepare<8>(p, workspace); break;
    default: break;
  }
}

void matmul_rows(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  if (p.accuracy_level == 4) {
    int8_rows_avx2(p, n_begin, n_end);
    return;
  }
  if (use_gemv(p) && p.prepared) {
    switch (p.bits) {
      case 2: gemv_rows<2>(p, n_begin, n_end); return;
      case 3: gemv_rows<3>(p, n_begin, n_end); return;
      case 4: gemv_rows<4>(p, n_begin, n_end); return;
      case 8: gemv_rows<8>(p, n_begin, n_end); return;
      default: break;
    }
  }
  gemm_rows(p, n_begin, n_end);
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet kernels{"avx2", &workspace_bytes, &prepare, &matmul_rows};
  return kernels;
}

#if defined(GRAPHOPT_EXT_HAVE_AVX512VNNI)
namespace {
void matmul_rows_vnni(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end) {
  if (p.accuracy_level == 4 && p.bits == 4 && p.group_size % 64 == 0) {
    int8_rows_vnni(p, n_begin, n_end);
    return;
  }
  matmul_rows(p, n_begin, n_end);
}
}  // namespace

const KernelSet& avx2_vnni_kernels() {
  static const KernelSet kernels{"avx2+avx512vnni", &workspace_bytes, &prepare, &matmul_rows_vnni};
  return kernels;
}
#endif

}  // namespace graphopt_ext
