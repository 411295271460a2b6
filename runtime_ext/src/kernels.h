// Packed low-bit matmul kernels behind graphopt.MatMulLowBit.
//
// Weight layout (see runtime_ext/README.md): each output channel n is a row of
// ceil(K / C) 32-byte blocks; a block is eight little-endian uint32 words holding
// C = 8 * F codes with F = 32 / bits codes per word. Code k = block * C + f * 8 + w is in
// word w at bits [f * bits, (f + 1) * bits). Codes past K are zero.
#pragma once

#include <cstddef>
#include <cstdint>

namespace graphopt_ext {

// One MatMulLowBit evaluation: Y[M, N] = A[M, K] * dequant(W[N, K])^T (+ bias).
struct LowBitProblem {
  const float* a = nullptr;         // A rows, zero-padded to padded_k, row stride padded_k
  std::size_t m = 0;                // rows of A and Y
  std::size_t k = 0;                // input features
  std::size_t padded_k = 0;         // multiple of codes_per_block(bits)
  std::size_t n = 0;                // output channels
  int bits = 4;                     // 2, 3, 4 or 8
  std::size_t group_size = 0;       // codes per group along K (last group may be short)
  std::size_t groups = 0;           // ceil(K / group_size)
  const std::uint8_t* packed = nullptr;  // N rows of row_bytes
  std::size_t row_bytes = 0;        // padded_k / codes_per_block(bits) * 32
  const float* scales = nullptr;    // [N, groups]
  const std::uint8_t* zero_points = nullptr;  // [N, groups] or null: 2^(bits-1)
  const float* bias = nullptr;      // [N] or null
  float* y = nullptr;               // [M, N]
  const float* prepared = nullptr;  // what KernelSet::prepare derived from A (ISA-specific)
  // accuracy_level 4: A quantized to int8 per group (see Int8Activations).
  int accuracy_level = 0;
  const std::uint8_t* int8_prepared = nullptr;
  std::size_t int8_stride = 0;  // bytes per row of A in int8_prepared
};

// accuracy_level 4: each row of A is quantized per group g to
//   q[k] = nearbyint(a[k] * 127 / amax_g), clamped to [-127, 127], scale_g = amax_g / 127
// and Y[m, n] = sum_g (scale[n, g] * scale_g) * float(sum_k (code - zp) * q[k]) with the
// inner sums exact in integers. Per row of A, at int8_prepared + m * int8_stride:
//   int8 q[padded_k] (natural order), int8 q[padded_k] (4-bit block order: the bytes of
//   word w, byte b are k = 16 b + w (first 32 bytes) and 16 b + 8 + w (next 32 bytes) of
//   each 64-code block), float scale[groups], int32 sum_q[groups].
struct Int8Row {
  const std::int8_t* natural;
  const std::int8_t* blocked;
  const float* scales;
  const std::int32_t* sums;
};
Int8Row int8_row(const LowBitProblem& p, std::size_t m);
std::size_t int8_workspace_bytes(const LowBitProblem& p);
void int8_prepare(LowBitProblem& p, std::uint8_t* workspace);
// AVX2 accuracy_level-4 rows (kernels_avx2_int8.cc): bits 4 with group_size % 64 == 0 or
// == 32; int8_rows_generic() otherwise.
void int8_rows_avx2(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end);

// Portable accuracy_level-4 kernel (any bits and group size); used by every ISA for the
// configurations its fast path does not cover.
void int8_rows_generic(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end);

constexpr std::size_t kBlockBytes = 32;
constexpr std::size_t kWordsPerBlock = 8;

constexpr std::size_t codes_per_word(int bits) { return static_cast<std::size_t>(32 / bits); }
constexpr std::size_t codes_per_block(int bits) { return kWordsPerBlock * codes_per_word(bits); }

// Computes Y[:, n_begin:n_end] (bias included). Thread-safe for disjoint ranges.
using RowRangeKernel = void (*)(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end);

// One instruction-set's kernels. Per call: workspace_bytes(p) bytes of scratch (a byte
// buffer, aligned for floats, in which prepare() creates its arrays), then
// prepare(p, workspace) once (sets p.prepared or p.int8_prepared), then rows() over
// disjoint N ranges.
struct KernelSet {
  const char* isa;
  std::size_t (*workspace_bytes)(const LowBitProblem& p);
  void (*prepare)(LowBitProblem& p, std::uint8_t* workspace);
  RowRangeKernel rows;
};

// Portable kernels (any bits, any group size).
const KernelSet& scalar_kernels();

// AVX2+FMA kernels; only use when cpu_has_avx2_fma() is true.
const KernelSet& avx2_kernels();

// A per-thread float buffer of at least count elements (valid until the next call on the
// same thread). Throws std::bad_alloc.
float* thread_scratch(std::size_t count);

// AVX2+FMA kernels whose accuracy_level-4 fast path uses AVX512-VNNI (256-bit); only use
// when cpu_has_avx512_vnni() is true as well.
const KernelSet& avx2_vnni_kernels();

// The AVX512-VNNI accuracy_level-4 rows (bits 4, group_size % 64 == 0 only).
void int8_rows_vnni(const LowBitProblem& p, std::size_t n_begin, std::size_t n_end);

// Whether this CPU and OS support AVX2 and FMA.
bool cpu_has_avx2_fma();

// Whether this CPU and OS support AVX512-VNNI with 256-bit (VL) and byte/word (BW) forms.
bool cpu_has_avx512_vnni();

// The kernels to use: the best the CPU supports; GRAPHOPT_EXT_ISA=avx2 or =scalar caps it.
const KernelSet& select_kernels();

}  // namespace graphopt_ext
