// Packed low-bit matmul kernels behind graphopt.MatMulLowBit.
//
// Weight layout ("channel tiles", see runtime_ext/README.md): output channels are grouped
// into tiles of kTileChannels = 16. A tile is a run of 64-byte word columns (one cache
// line each); column c holds sixteen little-endian uint32 words, word j belonging to
// channel 16 t + j and holding its F = 32 / bits consecutive codes k = c F + f at bits
// [f bits, (f + 1) bits). So one tile is one contiguous stream, and each 256-bit half of a
// column gives eight channels in eight lanes. Scales and zero points are tile-major too:
// [tiles, groups, 16]. Codes past K, channels past N and unused bits are zero.
#pragma once

#include <cstddef>
#include <cstdint>

namespace graphopt_ext {

constexpr std::size_t kTileChannels = 16;
constexpr std::size_t kColumnBytes = 4 * kTileChannels;  // one word per channel of a tile
constexpr std::size_t kHalfChannels = 8;                 // channels per 256-bit vector
constexpr std::size_t kHalves = kTileChannels / kHalfChannels;

constexpr std::size_t codes_per_word(int bits) { return static_cast<std::size_t>(32 / bits); }

// One MatMulLowBit evaluation: Y[M, N] = A[M, K] * dequant(W[N, K])^T (+ bias).
struct LowBitProblem {
  const float* a = nullptr;         // A rows, row stride k (not padded)
  std::size_t m = 0;                // rows of A and Y
  std::size_t k = 0;                // input features
  std::size_t n = 0;                // output channels
  int bits = 4;                     // 2, 3, 4 or 8
  std::size_t group_size = 0;       // codes per group along K (last group may be short)
  std::size_t groups = 0;           // ceil(K / group_size)
  std::size_t columns = 0;          // ceil(K / F): word columns per tile
  std::size_t tiles = 0;            // ceil(N / 16)
  const std::uint8_t* packed = nullptr;  // [tiles, columns * 32]
  const float* scales = nullptr;         // [tiles, groups, 16]
  const std::uint8_t* zero_points = nullptr;  // [tiles, groups, 16] or null: 2^(bits-1)
  const float* bias = nullptr;      // [N] or null
  float* y = nullptr;               // [M, N]
  int accuracy_level = 0;           // 0: fp32 activations; 4: int8 activations
  // What KernelSet::prepare derived from A (layout owned by the kernel set).
  const std::uint8_t* prepared = nullptr;
  std::size_t prepared_stride = 0;  // bytes per row of A in prepared

  std::size_t padded_k() const { return columns * codes_per_word(bits); }
  const std::uint8_t* tile(std::size_t t) const { return packed + t * columns * kColumnBytes; }
  const float* tile_scales(std::size_t t) const { return scales + t * groups * kTileChannels; }
  const std::uint8_t* tile_zero_points(std::size_t t) const {
    return zero_points ? zero_points + t * groups * kTileChannels : nullptr;
  }
};

// Code k of channel lane j (0..15) of tile t.
std::uint32_t code_at(const LowBitProblem& p, std::size_t t, std::size_t j, std::size_t k);

// Zero point of channel lane j of tile t in group g.
inline std::int32_t zero_point_at(const LowBitProblem& p, std::size_t t, std::size_t j, std::size_t g) {
  const std::uint8_t* zps = p.tile_zero_points(t);
  return zps ? zps[g * kTileChannels + j] : (1 << (p.bits - 1));
}

// ---------------------------------------------------------------- int8 activations
//
// accuracy_level 4: each row of A is quantized per group g to
//   q[k] = nearbyint(a[k] * (127 / amax_g)), clamped to [-127, 127], s_g = amax_g / 127
// and Y[m, n] = sum_g float(sum_k (code - zp) * q[k]) * (scale[n, g] * s_g), the inner sums
// exact in integers, accumulated in float group by group (no fused multiply-add), so every
// kernel gives bit-identical results. Per row of A, at prepared + m * prepared_stride:
//   int8 natural[padded_k]; int8 lanes[padded_k] (each word's F codes in pass order: for
//   bits b in {2, 4, 8}, P = 8 / b passes, pass t's four bytes are q[c F + P i + t],
//   i = 0..3, which is what (word >> t b) & mask yields per byte); float scale[groups];
//   int32 sum_q[groups].
struct Int8Row {
  const std::int8_t* natural;
  const std::int8_t* lanes;
  const float* scales;
  const std::int32_t* sums;
};
Int8Row int8_row(const LowBitProblem& p, std::size_t m);
// The same arrays of row m, writable, in a workspace being prepared (p.prepared_stride set).
struct Int8RowBuffers {
  std::int8_t* natural;
  std::int8_t* lanes;
  float* scales;
  std::int32_t* sums;
};
Int8RowBuffers int8_row_buffers(const LowBitProblem& p, std::uint8_t* workspace, std::size_t m);
std::size_t int8_workspace_bytes(const LowBitProblem& p);
std::size_t int8_row_stride(const LowBitProblem& p);  // bytes per row of A in the workspace
void int8_prepare(LowBitProblem& p, std::uint8_t* workspace);
// The same quantization with AVX2 (bit-identical; kernels_avx2.cc, AVX2 CPUs only).
void int8_prepare_avx2(LowBitProblem& p, std::uint8_t* workspace);

// Portable accuracy_level-4 kernel (any bits and group size); used by every ISA for the
// configurations its fast path does not cover. Computes tiles [t_begin, t_end).
void int8_tiles_generic(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end);

// Whether the SIMD int8 kernels handle p: bits 2, 4 or 8 (AVX2: 2 or 4) and whole words
// per group.
bool int8_simd_shape(const LowBitProblem& p);

// Computes Y[:, 16 t_begin : 16 t_end] (bias included; lanes past N are not written).
// Thread-safe for disjoint ranges.
using TileRangeKernel = void (*)(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end);

// One instruction-set's kernels. Per call: workspace_bytes(p) bytes of scratch (a byte
// buffer, aligned for floats, in which prepare() creates its arrays), then
// prepare(p, workspace) once (sets p.prepared), then tiles() over disjoint tile ranges.
struct KernelSet {
  const char* isa;
  std::size_t (*workspace_bytes)(const LowBitProblem& p);
  void (*prepare)(LowBitProblem& p, std::uint8_t* workspace);
  TileRangeKernel tiles;
};

// Portable kernels (any bits, any group size).
const KernelSet& scalar_kernels();

// AVX2+FMA kernels; only use when cpu_has_avx2_fma() is true.
const KernelSet& avx2_kernels();

// AVX2 int8 tiles (kernels_avx2_int8.cc); bits 2 and 4 with int8_simd_shape(p).
void int8_tiles_avx2(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end);

// AVX2+FMA kernels whose accuracy_level-4 path uses AVX512-VNNI (256-bit); only use when
// cpu_has_avx512_vnni() is true as well.
const KernelSet& avx2_vnni_kernels();

// The AVX512-VNNI int8 tiles (kernels_vnni.cc); int8_simd_shape(p).
void int8_tiles_vnni(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end);

// Whether this CPU and OS support AVX2 and FMA.
bool cpu_has_avx2_fma();

// Whether this CPU and OS support AVX512-VNNI with 256-bit (VL) and byte/word (BW) forms.
bool cpu_has_avx512_vnni();

// The kernels to use: the best the CPU supports; GRAPHOPT_EXT_ISA=avx2 or =scalar caps it.
const KernelSet& select_kernels();

}  // namespace graphopt_ext
