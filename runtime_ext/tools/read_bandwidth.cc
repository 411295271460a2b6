// graphopt_read_bandwidth: the machine's streaming read bandwidth, the roofline of the
// memory-bound GEMV benchmarks (tools/bench_kernels.py runs it).
//
//   graphopt_read_bandwidth [MiB=1024] [threads=2] [repeats=9]
//
// Each thread reads its contiguous share of one buffer with 256-bit loads (four independent
// XOR chains, so the loads never wait on arithmetic); prints the best rate in GB/s
// (10^9 bytes per second) for 1 thread and for the requested thread count, as
// "threads=<t> gbps=<rate>" lines. Plain SSE2 when the compiler does not target AVX2.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

#if defined(__AVX2__)
using Vec = __m256i;
inline Vec load(const char* p) { return _mm256_load_si256(reinterpret_cast<const Vec*>(p)); }
inline Vec mix(Vec a, Vec b) { return _mm256_xor_si256(a, b); }
inline Vec zero() { return _mm256_setzero_si256(); }
inline std::uint64_t low(Vec v) { return static_cast<std::uint64_t>(_mm256_extract_epi64(v, 0)); }
#else
using Vec = __m128i;
inline Vec load(const char* p) { return _mm_load_si128(reinterpret_cast<const Vec*>(p)); }
inline Vec mix(Vec a, Vec b) { return _mm_xor_si128(a, b); }
inline Vec zero() { return _mm_setzero_si128(); }
inline std::uint64_t low(Vec v) { return static_cast<std::uint64_t>(_mm_cvtsi128_si64(v)); }
#endif
constexpr std::size_t kStep = 4 * sizeof(Vec);

std::uint64_t read_range(const char* p, std::size_t bytes) {
  Vec a = zero(), b = zero(), c = zero(), d = zero();
  for (std::size_t i = 0; i + kStep <= bytes; i += kStep) {
    a = mix(a, load(p + i));
    b = mix(b, load(p + i + sizeof(Vec)));
    c = mix(c, load(p + i + 2 * sizeof(Vec)));
    d = mix(d, load(p + i + 3 * sizeof(Vec)));
  }
  return low(mix(mix(a, b), mix(c, d)));
}

// Best rate over repeats; the threads start together and are timed until the last ends.
double best_rate(const char* buffer, std::size_t bytes, unsigned threads, int repeats) {
  const std::size_t share = bytes / threads / kStep * kStep;
  double best = 0.0;
  std::vector<std::uint64_t> sinks(threads);
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (unsigned t = 1; t < threads; ++t)
      workers.emplace_back([&, t] { sinks[t] = read_range(buffer + t * share, share); });
    sinks[0] = read_range(buffer, share);
    for (auto& w : workers) w.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double rate = static_cast<double>(share * threads) / seconds / 1e9;
    if (rate > best) best = rate;
  }
  std::uint64_t sink = 0;
  for (auto s : sinks) sink ^= s;
  if (sink == 0x5a5a5a5a5a5a5a5aull) std::puts("");  // keeps the reads observable
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const long mib = argc > 1 ? std::atol(argv[1]) : 1024;
  const long threads = argc > 2 ? std::atol(argv[2]) : 2;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 9;
  if (mib < 1 || threads < 1 || threads > 256 || repeats < 1) {
    std::fprintf(stderr, "usage: graphopt_read_bandwidth [MiB>=1] [threads 1..256] [repeats>=1]\n");
    return 2;
  }
  const std::size_t bytes = static_cast<std::size_t>(mib) << 20;
  char* buffer = static_cast<char*>(std::aligned_alloc(64, bytes));
  if (!buffer) {
    std::fprintf(stderr, "graphopt_read_bandwidth: cannot allocate %ld MiB\n", mib);
    return 1;
  }
  std::memset(buffer, 1, bytes);  // touch every page before timing
  std::printf("threads=1 gbps=%.2f\n", best_rate(buffer, bytes, 1, repeats));
  if (threads > 1) std::printf("threads=%ld gbps=%.2f\n", threads, best_rate(buffer, bytes, static_cast<unsigned>(threads), repeats));
  std::free(buffer);
  return 0;
}
