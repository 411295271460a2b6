// AVX512-VNNI (256-bit, EVEX) kernel for accuracy_level 4, bits 2, 4 and 8. This
// translation unit alone is compiled with -mavx512vnni -mavx512vl (plus AVX2 and
// AVX512F/BW for the intrinsics); it is only entered after select_kernels() checked the
// CPU. VPDPBUSD adds the four u8 x s8 products of each lane into int32 without saturation;
// one accumulator per pass (and column parity) keeps the chains independent. Same results as the generic
// kernel, bit for bit.
#include <immintrin.h>

#include "int8_tiles.h"
#include "kernels.h"

namespace graphopt_ext {
namespace {

template <int P>
struct DpbusdDot {
  static constexpr int kAccumulators = P;
  static constexpr bool kLatency = true;  // VPDPBUSD: several cycles
  // Fields masked in place: pass t's sum is exactly 2^(t bits) times the code sum.
  static constexpr bool kScaled = true;
  template <int Passes>
  static void column(__m256i* acc, const __m256i* u, const __m256i* a) {
    for (int t = 0; t < Passes; ++t) acc[t] = _mm256_dpbusd_epi32(acc[t], u[t], a[t]);
  }
  template <int BITS>
  static __m256i finish(const __m256i* acc) {
    __m256i sum = acc[0];
    for (int t = 1; t < P; ++t) sum = _mm256_add_epi32(sum, _mm256_srai_epi32(acc[t], t * BITS));
    return sum;
  }
};

}  // namespace

void int8_tiles_vnni(const LowBitProblem& p, std::size_t t_begin, std::size_t t_end) {
  switch (p.bits) {
    case 2: int8_tiles_bits<2, DpbusdDot<4>>(p, t_begin, t_end); break;
    case 4: int8_tiles_bits<4, DpbusdDot<2>>(p, t_begin, t_end); break;
    default: int8_tiles_bits<8, DpbusdDot<1>>(p, t_begin, t_end); break;
  }
}

}  // namespace graphopt_ext
