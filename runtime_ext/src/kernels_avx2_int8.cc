// AVX2 kernel for accuracy_level 4 (int8 activations), bits 2 and 4. Compiled with
// -mavx2 -mfma like kernels_avx2.cc and entered only through it. VPMADDUBSW multiplies the
// code bytes with the int8 activations into int16 pair sums; the passes of one word column
// add in int16 (at most 2 * 2 * 15 * 127 = 7620 for int4, 4 * 2 * 3 * 127 = 3048 for int2,
// so no saturation) and one VPMADDWD widens them: exact, like the generic kernel. 8-bit
// codes would saturate VPMADDUBSW and use the generic kernel.
#include <immintrin.h>

#include "int8_tiles.h"
#include "kernels.h"

namespace graphopt_ext {
namespace {

struct MaddubsDot {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLatency = false;  // VPADDD: one cycle
  static constexpr bool kScaled = false;   // VPMADDUBSW's int16 sums would saturate
  template <int P>
  static void column(__m256i* acc, const __m256i* u, const __m256i* a) {
    __m256i pairs = _mm256_maddubs_epi16(u[0], a[0]);
    for (int t = 1; t < P; ++t) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u[t], a[t]));
    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  template <int BITS>
  static __m256i finish(const __m256i* acc) {
    return acc[0];
  }
};

}  // namespace

void int8_tiles_avx2(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  if (p.bits == 2) {
    int8_tiles_bits<2, MaddubsDot>(p, t_begin, t_end);
  } else {
    int8_tiles_bits<4, MaddubsDot>(p, t_begin, t_end);
  }
}

}  // namespace graphopt_ext
