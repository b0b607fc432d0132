// Probe for benchmarks/probe_loop.py: the CPU lookup loop (sum pooling, width 64, fp32, int64
// indices, bags of 32, padded layout) rebuilt step by step outside pme, to see what each part of
// pme's per-lookup work costs. Compiled by the script with -O3 -mavx2 -mfma; called through
// ctypes, one variant per call, over pme's own buffers. Not part of the library.
//
// Every variant prefetches as pme does (the offsets of lookup j + 24, the first and last line of
// the row of lookup j + 8) and sums a row's live 64-byte steps; the template switches add pme's
// work in this order:
//   kIndex  the index range test and the padding-row test,
//   kSpan   the row-span test (three unsigned comparisons: hi <= total, lo <= hi, size <= 64),
//   kRead   how a partial step is read: 0 two masked loads (the second one empty for a row that
//           ends in the first half, but its address is past the row), 1 by halves (plain load for
//           a whole half, masked for a partial one, none past the row: a branch on the size), 2
//           two masked loads, the second from the row's start when its mask is empty (no branch,
//           no address past the row),
//   kPfTest the range test before the row prefetch reads the offsets,
//   kPrePass every index checked in one pass before the loop (pme's register kernels since
//           2026-11-28), and kRead 3: a step whose live entries fill whole halves (multiples of 8)
//           read without a branch on the size (the second half, when the row ends before it,
//           loaded from the first half's address and zeroed), others by halves.
// A failing test only records the position (the probe is fed valid input).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace {

constexpr int kD = 64;
constexpr int64_t kAheadOffsets = 24, kAheadRow = 8;

struct Args {
  const int64_t* idx;
  const int64_t* bag_offsets;  // [B + 1]
  const int64_t* offsets;      // [V + 1]
  const float* w;
  float* out;  // [B, 64]
  int64_t num_bags, num_rows, total;
};

__attribute__((target("avx2"))) inline __m256 masked(const float* p, int n) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, m);
}

template <int kRead, int K>
__attribute__((target("avx2"), always_inline)) inline void add_step(__m256* a, const float* row, int live) {
  if (16 * K >= live) return;
  const float* p = row + 16 * K;
  const int r = live - 16 * K;
  __m256 x0, x1;
  if (kRead == 3 && r % 8 == 0) {  // clamped (pme's kernel now): whole halves, no branch on the size
    const int64_t two = -static_cast<int64_t>(r > 8);
    x0 = _mm256_loadu_ps(p);
    x1 = _mm256_and_ps(_mm256_loadu_ps(p + (two & 8)), _mm256_castsi256_ps(_mm256_set1_epi64x(two)));
  } else if (kRead == 0) {
    x0 = masked(p, r);
    x1 = masked(p + 8, r - 8);
  } else if (kRead == 2) {
    x0 = masked(p, r);
    x1 = masked(r > 8 ? p + 8 : p, r - 8);
  } else if (r >= 16) {
    x0 = _mm256_loadu_ps(p);
    x1 = _mm256_loadu_ps(p + 8);
  } else if (r >= 8) {
    x0 = _mm256_loadu_ps(p);
    x1 = r > 8 ? masked(p + 8, r - 8) : _mm256_setzero_ps();
  } else {
    x0 = masked(p, r);
    x1 = _mm256_setzero_ps();
  }
  a[2 * K] = _mm256_add_ps(a[2 * K], x0);
  a[2 * K + 1] = _mm256_add_ps(a[2 * K + 1], x1);
}

template <int kRead>
__attribute__((target("avx2"), always_inline)) inline void add_row(__m256* a, const float* row, int live) {
  if (live == kD) {
    for (int k = 0; k < 8; ++k) a[k] = _mm256_add_ps(a[k], _mm256_loadu_ps(row + 8 * k));
    return;
  }
  add_step<kRead, 0>(a, row, live);
  add_step<kRead, 1>(a, row, live);
  add_step<kRead, 2>(a, row, live);
  add_step<kRead, 3>(a, row, live);
}

template <bool kIndex, bool kSpan, int kRead, bool kPfTest, bool kPrePass = false>
__attribute__((target("avx2"), noinline)) int64_t loop(const Args& g) {
  const int64_t n_all = g.bag_offsets[g.num_bags];
  const uint64_t rows = static_cast<uint64_t>(g.num_rows), total = static_cast<uint64_t>(g.total);
  if (kPrePass) {  // every index checked first, in one pass the compiler vectorises (pme: per 4096)
    uint64_t top = 0;
    for (int64_t j = 0; j < n_all; ++j) top = std::max(top, static_cast<uint64_t>(g.idx[j]));
    if (n_all > 0 && top >= rows) return 0;
  }
  const int64_t pad = -1;
  int64_t bad = -1;
  for (int64_t b = 0; b < g.num_bags; ++b) {
    __m256 a[8];
    for (auto& x : a) x = _mm256_setzero_ps();
    for (int64_t j = g.bag_offsets[b]; j < g.bag_offsets[b + 1]; ++j) {
      if (j + kAheadOffsets < n_all)
        _mm_prefetch(reinterpret_cast<const char*>(g.offsets + g.idx[j + kAheadOffsets]), _MM_HINT_T0);
      if (j + kAheadRow < n_all) {
        const uint64_t r = static_cast<uint64_t>(g.idx[j + kAheadRow]);
        if (!kPfTest || r < rows) {
          _mm_prefetch(reinterpret_cast<const char*>(g.w + g.offsets[r]), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(g.w + g.offsets[r + 1]) - 1, _MM_HINT_T0);
        }
      }
      const int64_t r = g.idx[j];
      if (kIndex) {
        if (__builtin_expect(static_cast<uint64_t>(r) >= rows, 0)) {
          bad = j;
          continue;
        }
        if (r == pad) continue;
      }
      const int64_t lo = g.offsets[r], hi = g.offsets[r + 1];
      if (kSpan) {
        const uint64_t ulo = static_cast<uint64_t>(lo), uhi = static_cast<uint64_t>(hi);
        if (__builtin_expect((uhi > total) | (ulo > uhi) | (uhi - ulo > uint64_t{kD}), 0)) {
          bad = j;
          continue;
        }
      }
      add_row<kRead>(a, g.w + lo, static_cast<int>(hi - lo));
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(g.out + b * kD + 8 * k, a[k]);
  }
  return bad;
}

using Loop = int64_t (*)(const Args&);
// The variants in the order probe_loop.py names them.
const Loop kLoops[] = {
    loop<false, false, 0, false>,  // reads only
    loop<true, false, 0, false>,   // + index tests
    loop<true, true, 0, false>,    // + span test
    loop<true, true, 1, false>,    // + halves
    loop<true, true, 1, true>,     // + prefetch test: pme's work
    loop<false, false, 1, false>,  // reads only, by halves
    loop<true, true, 2, true>,     // pme's work, partial steps masked without an address past the row
    loop<false, false, 2, false>,  // reads only, the same
    loop<false, true, 3, false, true>,  // index pre-pass + span test + clamped halves: pme's work now
    loop<false, false, 3, false>,       // reads only, clamped
};

}  // namespace

// Runs variant k once; returns milliseconds (the first bad position, if any, in *bad).
extern "C" double probe_run(int k, const int64_t* idx, const int64_t* bag_offsets, const int64_t* offsets,
                            const float* w, float* out, int64_t num_bags, int64_t num_rows, int64_t total,
                            int64_t* bad) {
  const Args g{idx, bag_offsets, offsets, w, out, num_bags, num_rows, total};
  const auto t0 = std::chrono::steady_clock::now();
  *bad = kLoops[k](g);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

extern "C" int probe_count() {
  return static_cast<int>(sizeof(kLoops) / sizeof(kLoops[0]));
}
