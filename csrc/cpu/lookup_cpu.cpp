// CPU lookup operators: pooled (bag_forward / bag_backward) and non-pooled
// (embedding_forward / embedding_backward) over a flat multi-size table.
// Forward: one task per range of bags, fp32 (fp64 for fp64 weights) accumulation; the common
// case (sum/mean, padded layout, fp32/fp16/bf16, width <= 256) runs a kernel that keeps the bag's
// sums in registers, AVX-512 or AVX2 (+FMA, F16C) as the CPU has them, everything else (and a CPU
// with neither) a portable kernel.
// Backward: lookups grouped by row (row_groups.h), one task per row: deterministic.
#include "cpu/pool_bags.h"
#include "cpu/row_groups.h"
#include "cpu/validate_cpu.h"
#include "lookup_ops.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PME_HAVE_SIMD_KERNELS 1
#include <immintrin.h>
#else
#define PME_HAVE_SIMD_KERNELS 0
#endif

namespace pme::cpu {
namespace {

// The portable kernel's loops, cloned for AVX2 where GCC can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PME_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PME_CLONES
#endif

// Element to accumulation type; bf16 widened from its raw bits (a shift the compiler
// vectorises, unlike the generic conversion operator).
template <class A, class T>
inline A widen(const T& x) {
  return static_cast<A>(x);
}

template <>
inline float widen<float, c10::BFloat16>(const c10::BFloat16& x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Accumulation type to element; bf16 rounded to nearest even exactly as c10::BFloat16(float)
// does, written without a branch so that the output loop vectorises.
template <class T, class A>
inline T narrow(A x) {
  return static_cast<T>(x);
}

template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  c10::BFloat16 out;
  out.x = x != x ? uint16_t{0x7FC0} : rounded;
  return out;
}

// a[0:n] += s * row[0:n] (and a[0:n] += row[0:n]) in the accumulation type; restrict lets the
// compiler vectorise.
template <class T, class A>
inline void axpy(A* __restrict__ a, const T* __restrict__ row, int64_t n, A s) {
  for (int64_t c = 0; c < n; ++c) a[c] += s * widen<A>(row[c]);
}

template <class T, class A>
inline void add(A* __restrict__ a, const T* __restrict__ row, int64_t n) {
  for (int64_t c = 0; c < n; ++c) a[c] += widen<A>(row[c]);
}

inline void note_bad(std::atomic<int64_t>& bad, int64_t j) {
  int64_t cur = bad.load();
  while (j < cur && !bad.compare_exchange_weak(cur, j)) {
  }
}

// Bag b spans lookups [bag_begin, bag_end); without bag offsets lookup b is bag b.
template <class I>
inline int64_t bag_begin(const I* bo, int64_t b) {
  return bo ? static_cast<int64_t>(bo[b]) : b;
}

// How far ahead the forward kernels look: the offsets of lookup j + kAheadOffsets are
// prefetched, and the row of lookup j + kAheadRow (its offsets are in cache by then), so the
// two dependent misses of a lookup (offset table, then row) overlap with other lookups' work.
constexpr int64_t kAheadOffsets = 24;
constexpr int64_t kAheadRow = 8;

// Prefetches for lookup j (see kAheadRow); reads only offsets of rows in range, and a prefetch
// never faults, so a bad index here is harmless (it is reported when its turn comes).
// Always inlined: GCC's IPA takes a function whose only effect is __builtin_prefetch for a
// pure one and deletes its calls (the previous forward's prefetch lambda compiled to nothing).
template <class T, class I>
__attribute__((always_inline)) inline void prefetch_ahead(const T* w, const TableView& t, const I* idx, int64_t j,
                                                          int64_t jend) {
  if (j + kAheadOffsets < jend) {
    const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[j + kAheadOffsets]));
    if (r < static_cast<uint64_t>(t.num_rows)) __builtin_prefetch(t.offsets + r);
  }
  if (j + kAheadRow < jend) {
    const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[j + kAheadRow]));
    if (r < static_cast<uint64_t>(t.num_rows)) {
      // Integer arithmetic: the offsets are not checked yet, the address may be anything.
      const uintptr_t lo = reinterpret_cast<uintptr_t>(w) + static_cast<uintptr_t>(t.offsets[r]) * sizeof(T);
      const uintptr_t hi = reinterpret_cast<uintptr_t>(w) + static_cast<uintptr_t>(t.offsets[r + 1]) * sizeof(T);
      __builtin_prefetch(reinterpret_cast<const void*>(lo));
      __builtin_prefetch(reinterpret_cast<const void*>(hi - 1));
    }
  }
}

// Locates lookup j: false for the padding row and for a bad lookup (noted in `bad`; the caller
// throws after the kernel), else the row's start, size and output column. A row is read only
// after these checks: index in range, row inside the buffer, row inside the output width.
// kPadded: the caller knows the layout is padded (t.col_of_size == nullptr, column 0).
template <bool kPadded = false, class I>
inline bool locate(const TableView& t, const I* idx, int64_t j, int64_t pad, std::atomic<int64_t>& bad,
                   int64_t& lo, int64_t& size, int64_t& col) {
  const int64_t r = static_cast<int64_t>(idx[j]);
  if (__builtin_expect(static_cast<uint64_t>(r) >= static_cast<uint64_t>(t.num_rows), 0)) {
    note_bad(bad, j);
    return false;
  }
  if (r == pad) return false;  // pad is -1 (none) or a row
  lo = t.offsets[r];
  const int64_t hi = t.offsets[r + 1];
  // Overflow-safe (validate_table has checked the whole table already; this is the second line
  // of defence): the span inside the buffer first, then the size and column against the width
  // without forming col + size.
  if (__builtin_expect(!(lo >= 0 && hi >= lo && hi <= t.total && hi - lo <= t.width), 0)) {
    note_bad(bad, j);
    return false;
  }
  size = hi - lo;
  col = kPadded || !t.col_of_size ? 0 : (size < t.num_cols ? t.col_of_size[size] : -1);
  if (__builtin_expect(!(col >= 0 && col <= t.width - size), 0)) {
    note_bad(bad, j);
    return false;
  }
  return true;
}

// Portable forward over bags [b0, b1): every mode and layout, accumulator in memory.
template <class T, class I>
PME_CLONES void bag_forward_generic(const T* w, const TableView& table, const I* idx, const I* bo, int64_t b0,
                                    int64_t b1, const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax,
                                    std::atomic<int64_t>& bad) {
  using A = acc_t<T>;
  const TableView t = table;  // a local copy stays in registers (the atomic in note_bad would force reloads)
  const int64_t W = t.width;
  std::vector<A> acc(W);
  std::vector<int64_t> cov(mode == kMax ? W : 0);
  const int64_t jend = bag_begin(bo, b1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = bag_begin(bo, b), end = bag_begin(bo, b + 1);
    T* o = out + b * W;
    int64_t n = 0;
    if (mode == kMax) {
      int64_t* am = argmax + b * W;
      std::fill(acc.begin(), acc.end(), -std::numeric_limits<A>::infinity());
      std::fill(cov.begin(), cov.end(), 0);
      std::fill(am, am + W, int64_t{-1});
      for (int64_t j = start; j < end; ++j) {
        prefetch_ahead(w, t, idx, j, jend);
        int64_t lo, size, col;
        if (!locate(t, idx, j, pad, bad, lo, size, col)) continue;
        ++n;
        const T* row = w + lo;
        for (int64_t c = 0; c < size; ++c) {
          const A v = widen<A>(row[c]);
          ++cov[col + c];
          if (v > acc[col + c]) {
            acc[col + c] = v;
            am[col + c] = j;
          }
        }
      }
      // Columns that some token of the bag does not store hold an implicit zero in the
      // dense view; it takes part in the max (and, winning, passes gradient to no entry).
      for (int64_t c = 0; c < W; ++c) {
        if (n == 0 || (cov[c] < n && acc[c] < A(0))) {
          acc[c] = A(0);
          am[c] = -1;
        }
        o[c] = narrow<T>(acc[c]);
      }
      continue;
    }
    std::fill(acc.begin(), acc.end(), A(0));
    for (int64_t j = start; j < end; ++j) {
      prefetch_ahead(w, t, idx, j, jend);
      int64_t lo, size, col;
      if (!locate(t, idx, j, pad, bad, lo, size, col)) continue;
      ++n;
      if (psw) axpy(acc.data() + col, w + lo, size, widen<A>(psw[j]));
      else add(acc.data() + col, w + lo, size);
    }
    if (mode == kMean && n > 0) {
      const A inv = static_cast<A>(n);
      for (int64_t c = 0; c < W; ++c) o[c] = narrow<T>(acc[c] / inv);
    } else {
      for (int64_t c = 0; c < W; ++c) o[c] = narrow<T>(acc[c]);
    }
  }
}

// The forward's register kernel, chosen once per call by cpu_kernel().
enum class CpuKernel { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

#if PME_HAVE_SIMD_KERNELS
// Register kernels: sum/mean over bags [b0, b1), padded layout, output width W <= 256, the bag's
// sums kept in NV vector registers of floats. Two instruction sets, AVX-512 and AVX2 (+FMA,
// F16C), share one kernel (bag_sum_simd: the bag loop, prefetches, locate's checks, which steps
// of a row are live, mean) and differ only in the vector step, an accumulator type Acc:
//   Acc::kSteps          steps that cover the width (a step is 64 bytes of a row: one
//                        AVX-512 register's load, two AVX2 ones; the same steps for both),
//   acc.zero()           clears the sums,
//   acc.step<kW, k>(row, live, s)  adds (s times, kW) step k of a row of `live` entries,
//                        called only when k * kStep < live; it reads the row's own bytes and
//                        nothing past them,
//   acc.finish(o, W, n)  divides by n (when n > 0) and stores W outputs rounded as
//                        static_cast<T>(float) does.
// Row entries are widened exactly (fp16 by F16C, bf16 by a 16-bit shift), summed in fp32 in
// lookup order (weighted: one FMA per entry), so both kernels give identical outputs (and, where
// no FMA is involved, the portable kernel's).
#define PME_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,bmi,bmi2,lzcnt,popcnt,fma,f16c")))
#define PME_AVX2 __attribute__((target("avx2,fma,f16c")))

// The shared code has no target attribute of its own (its vector code is all in Acc's methods):
// it is compiled inlined, with those methods, into bag_sum_avx512 / bag_sum_avx2, whose
// `flatten` makes GCC inline the whole call tree there (an always_inline intrinsic cannot be
// inlined into a function without the target, hence Acc methods that are not always_inline).

// Only the live steps of a row: one branch per step, rows of the common small sizes skip most.
// The step numbers are template arguments, so that every accumulator is named by a constant
// from the start (a loop over them, unrolled only late, left the sums in memory).
template <bool kWeighted, class Acc, class T, int... K>
inline void add_live_steps(Acc& acc, const T* row, int live, float s, std::integer_sequence<int, K...>) {
  ((Acc::kStep * K < live ? acc.template step<kWeighted, K>(row, live, s) : void()), ...);
}

template <class Acc, class T, class I, bool kWeighted>
inline void bag_sum_simd(const T* w, const TableView& table, const I* idx, const I* bo, int64_t b0, int64_t b1,
                         const T* psw, bool mean, int64_t pad, T* out, std::atomic<int64_t>& bad) {
  const TableView t = table;  // a local copy stays in registers (the atomic in note_bad would force reloads)
  const int64_t W = t.width;
  const int64_t jend = bag_begin(bo, b1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = bag_begin(bo, b), end = bag_begin(bo, b + 1);
    Acc acc;
    acc.zero();
    int64_t n = 0;
    for (int64_t j = start; j < end; ++j) {
      prefetch_ahead(w, t, idx, j, jend);
      int64_t lo, size, col;
      if (!locate<true>(t, idx, j, pad, bad, lo, size, col)) continue;
      ++n;
      const T* row = w + lo;
      const int live = static_cast<int>(size);  // <= W <= 256
      const float s = kWeighted ? widen<float>(psw[j]) : 1.0f;
      add_live_steps<kWeighted>(acc, row, live, s, std::make_integer_sequence<int, Acc::kSteps>{});
    }
    acc.finish(out + b * W, W, mean ? n : 0);
  }
}

// ---- AVX-512: 16 floats a register; a step of 64 bytes (16 fp32 or 32 fp16/bf16 entries) is
// one load under a mask of its live entries (a load under an empty mask would still touch its
// cache lines, hence the branch on live steps).
template <class T>
struct Avx512Row;  // loads one step of a row (under a mask of its live entries) as floats

template <>
struct Avx512Row<float> {
  static constexpr int kStep = 16;
  // Mask of the entries k * 16 + i < n (a compare, no branch).
  PME_AVX512 static inline uint32_t mask(int n, int k) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(n), _mm512_add_epi32(lane, _mm512_set1_epi32(16 * k)));
  }
  PME_AVX512 static inline void load(const float* p, uint32_t m, __m512* x) {
    x[0] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  }
};

// The 16-bit rows: masks over 32 lanes of 16 bits.
struct Avx512Row16 {
  static constexpr int kStep = 32;
  PME_AVX512 static inline uint32_t mask(int n, int k) {
    const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14,
                                          13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_cmpgt_epi16_mask(_mm512_set1_epi16(static_cast<int16_t>(n)),
                                   _mm512_add_epi16(lane, _mm512_set1_epi16(static_cast<int16_t>(32 * k))));
  }
};

template <>
struct Avx512Row<c10::BFloat16> : Avx512Row16 {
  PME_AVX512 static inline void load(const c10::BFloat16* p, uint32_t m, __m512* x) {
    const __m512i v = _mm512_maskz_loadu_epi16(m, p);  // bf16 -> fp32 is a 16-bit shift
    x[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
    x[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  }
};

template <>
struct Avx512Row<c10::Half> : Avx512Row16 {
  PME_AVX512 static inline void load(const c10::Half* p, uint32_t m, __m512* x) {
    const __m512i v = _mm512_maskz_loadu_epi16(m, p);
    x[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
    x[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
  }
};

template <class T>
struct Avx512Store;  // 16 floats rounded to T (as static_cast<T> does), stored under a mask

template <>
struct Avx512Store<float> {
  PME_AVX512 static inline void store(float* p, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(p, m, x); }
};

template <>
struct Avx512Store<c10::BFloat16> {
  // c10's round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
  PME_AVX512 static inline void store(c10::BFloat16* p, __mmask16 m, __m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
};

template <>
struct Avx512Store<c10::Half> {
  // Round to nearest even like c10::Half(float); a NaN becomes c10's 0x7E00 with its sign.
  PME_AVX512 static inline void store(c10::Half* p, __mmask16 m, __m512 x) {
    __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i sign = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16));
    const __m256i nan = _mm256_or_si256(_mm256_and_si256(sign, _mm256_set1_epi16(-0x8000)), _mm256_set1_epi16(0x7E00));
    h = _mm256_mask_blend_epi16(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), h, nan);
    _mm256_mask_storeu_epi16(p, m, h);
  }
};

template <class T, int NV>
struct Avx512Acc {
  using Row = Avx512Row<T>;
  static constexpr int kStep = Row::kStep;
  static constexpr int kPer = kStep / 16;  // accumulators per step
  static_assert(NV % kPer == 0, "whole steps");
  static constexpr int kSteps = NV / kPer;
  using Seq = std::make_integer_sequence<int, NV>;
  __m512 a[NV];  // indexed by constants only (fold expressions), so that they stay in registers

  template <bool kWeighted>
  PME_AVX512 static inline void add(__m512& acc, __m512 x, float s) {
    acc = kWeighted ? _mm512_fmadd_ps(x, _mm512_set1_ps(s), acc) : _mm512_add_ps(acc, x);
  }
  PME_AVX512 inline void zero() { zero(Seq{}); }
  template <int... V>
  PME_AVX512 inline void zero(std::integer_sequence<int, V...>) {
    ((a[V] = _mm512_setzero_ps()), ...);
  }
  template <bool kWeighted, int K>
  PME_AVX512 inline void step(const T* row, int live, float s) {
    __m512 x[kPer];
    Row::load(row + kStep * K, Row::mask(live, K), x);
    add<kWeighted>(a[kPer * K], x[0], s);
    if constexpr (kPer == 2) add<kWeighted>(a[kPer * K + 1], x[1], s);
  }
  PME_AVX512 inline void finish(T* o, int64_t W, int64_t n) { finish(o, W, n, Seq{}); }
  template <int... V>
  PME_AVX512 inline void finish(T* o, int64_t W, int64_t n, std::integer_sequence<int, V...>) {
    if (n > 0) {
      const __m512 d = _mm512_set1_ps(static_cast<float>(n));
      ((a[V] = _mm512_div_ps(a[V], d)), ...);
    }
    ((16 * V < W ? Avx512Store<T>::store(o + 16 * V,
                                         W - 16 * V >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - 16 * V)) - 1),
                                         a[V])
                 : void()),
     ...);
  }
};

// ---- AVX2: 8 floats a register; a step of 64 bytes (16 fp32 or 32 fp16/bf16 entries, the same
// steps as AVX-512, hence the same branches) is two 32-byte loads, without a branch of its own.
// AVX2 masks loads only per 32-bit element: an fp32 step is two _mm256_maskload_ps of its live
// entries; a 16-bit step loads its whole live pairs of entries with _mm256_maskload_epi32 and puts
// the last live entry in from a scalar load (a row of odd length ends in half a pair), so it too
// reads the row's own bytes only. Masked-out lanes read as 0, as with AVX-512's zero-masked loads.
template <class T>
struct Avx2Row;

template <>
struct Avx2Row<float> {
  static constexpr int kStep = 16;
  static constexpr bool kInterleaved = false;
  PME_AVX2 static inline void load(const float* row, int k, int live, __m256* x) {
    const float* p = row + 16 * k;
    const __m256i n = _mm256_set1_epi32(live - 16 * k);  // live entries from p on, >= 1
    // (A lane under a zero mask is not read and cannot fault, even past the end of the buffer.)
    x[0] = _mm256_maskload_ps(p, _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    x[1] = _mm256_maskload_ps(p + 8, _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)));
  }
};

// The 32 16-bit entries of step k, the lanes past the row zero.
struct Avx2Row16 {
  static constexpr int kStep = 32;
  PME_AVX2 static inline void load16(const uint16_t* row, int k, int live, __m256i* v) {
    const uint16_t* p = row + 32 * k;
    const int r = live - 32 * k < 32 ? live - 32 * k : 32;  // live entries in this step, 1..32
    const __m256i pairs = _mm256_set1_epi32(r >> 1);          // whole pairs of live entries
    v[0] = _mm256_maskload_epi32(reinterpret_cast<const int*>(p),
                                 _mm256_cmpgt_epi32(pairs, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    v[1] = _mm256_maskload_epi32(reinterpret_cast<const int*>(p + 16),
                                 _mm256_cmpgt_epi32(pairs, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)));
    // The last live entry, read alone (when r is even it was read already: the same value).
    const __m256i last = _mm256_set1_epi16(static_cast<int16_t>(r - 1));
    const __m256i value = _mm256_set1_epi16(static_cast<int16_t>(p[r - 1]));
    const __m256i lane = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    v[0] = _mm256_blendv_epi8(v[0], value, _mm256_cmpeq_epi16(lane, last));
    v[1] = _mm256_blendv_epi8(v[1], value, _mm256_cmpeq_epi16(_mm256_add_epi16(lane, _mm256_set1_epi16(16)), last));
  }
};

// bf16 -> fp32 puts the 16 bits above 16 zero bits: one unpack with zero per 8 entries, which
// works within 128-bit halves, so the sums are kept interleaved: accumulator 2i holds entries
// 0-3 and 8-11 of its 16, accumulator 2i + 1 entries 4-7 and 12-15 (put back in order once,
// in finish: kInterleaved).
template <>
struct Avx2Row<c10::BFloat16> : Avx2Row16 {
  static constexpr bool kInterleaved = true;
  PME_AVX2 static inline void load(const c10::BFloat16* row, int k, int live, __m256* x) {
    __m256i v[2];
    load16(reinterpret_cast<const uint16_t*>(row), k, live, v);
    const __m256i z = _mm256_setzero_si256();
    x[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v[0]));
    x[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v[0]));
    x[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v[1]));
    x[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v[1]));
  }
  PME_AVX2 static inline void in_order(__m256& lo, __m256& hi) {
    const __m256 a = lo;
    lo = _mm256_permute2f128_ps(a, hi, 0x20);
    hi = _mm256_permute2f128_ps(a, hi, 0x31);
  }
};

template <>
struct Avx2Row<c10::Half> : Avx2Row16 {
  static constexpr bool kInterleaved = false;
  PME_AVX2 static inline void load(const c10::Half* row, int k, int live, __m256* x) {
    __m256i v[2];
    load16(reinterpret_cast<const uint16_t*>(row), k, live, v);
    x[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(v[0]));
    x[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(v[0], 1));
    x[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(v[1]));
    x[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(v[1], 1));
  }
};

template <class T>
struct Avx2Store;  // 8 floats rounded to T (as static_cast<T> does), the first k (1..8) stored

template <>
struct Avx2Store<float> {
  PME_AVX2 static inline void store(float* p, int k, __m256 x) {
    if (k >= 8) {
      _mm256_storeu_ps(p, x);
    } else {
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(p, m, x);
    }
  }
};

// 8 values of 16 bits held in 32-bit lanes (each <= 0xFFFF) to 8 contiguous ones, first k stored.
PME_AVX2 inline void avx2_store16(void* p, int k, __m256i r) {
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (k >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, sizeof(uint16_t) * static_cast<size_t>(k));
  }
}

template <>
struct Avx2Store<c10::BFloat16> {
  // c10's round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
  PME_AVX2 static inline void store(c10::BFloat16* p, int k, __m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    avx2_store16(p, k, _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                                             _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan)));
  }
};

template <>
struct Avx2Store<c10::Half> {
  // Round to nearest even like c10::Half(float); a NaN becomes c10's 0x7E00 with its sign.
  PME_AVX2 static inline void store(c10::Half* p, int k, __m256 x) {
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i r = _mm256_cvtepu16_epi32(h);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16), _mm256_set1_epi32(0x8000));
    const __m256i nan = _mm256_or_si256(sign, _mm256_set1_epi32(0x7E00));
    avx2_store16(p, k, _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan),
                                                             _mm256_cmp_ps(x, x, _CMP_UNORD_Q))));
  }
};

template <class T, int NV>
struct Avx2Acc {
  using Row = Avx2Row<T>;
  static constexpr int kStep = Row::kStep;
  static constexpr int kPer = kStep / 8;  // accumulators per step
  static_assert(NV % kPer == 0, "whole steps");
  static constexpr int kSteps = NV / kPer;
  using Seq = std::make_integer_sequence<int, NV>;
  __m256 a[NV];  // indexed by constants only, as in Avx512Acc

  template <bool kWeighted>
  PME_AVX2 static inline void add(__m256& acc, __m256 x, float s) {
    acc = kWeighted ? _mm256_fmadd_ps(x, _mm256_set1_ps(s), acc) : _mm256_add_ps(acc, x);
  }
  PME_AVX2 inline void zero() { zero(Seq{}); }
  template <int... V>
  PME_AVX2 inline void zero(std::integer_sequence<int, V...>) {
    ((a[V] = _mm256_setzero_ps()), ...);
  }
  template <bool kWeighted, int K>
  PME_AVX2 inline void step(const T* row, int live, float s) {
    __m256 x[kPer];
    Row::load(row, K, live, x);
    add<kWeighted>(a[kPer * K], x[0], s);
    add<kWeighted>(a[kPer * K + 1], x[1], s);
    if constexpr (kPer == 4) {
      add<kWeighted>(a[kPer * K + 2], x[2], s);
      add<kWeighted>(a[kPer * K + 3], x[3], s);
    }
  }
  PME_AVX2 inline void finish(T* o, int64_t W, int64_t n) { finish(o, W, n, Seq{}); }
  template <int... P>
  PME_AVX2 inline void in_order(std::integer_sequence<int, P...>) {
    (Row::in_order(a[2 * P], a[2 * P + 1]), ...);
  }
  template <int... V>
  PME_AVX2 inline void finish(T* o, int64_t W, int64_t n, std::integer_sequence<int, V...>) {
    if constexpr (Row::kInterleaved) in_order(std::make_integer_sequence<int, NV / 2>{});
    if (n > 0) {
      const __m256 d = _mm256_set1_ps(static_cast<float>(n));
      ((a[V] = _mm256_div_ps(a[V], d)), ...);
    }
    ((8 * V < W ? Avx2Store<T>::store(o + 8 * V, static_cast<int>(W - 8 * V), a[V]) : void()), ...);
  }
};

template <class T, class I, int NV, bool kWeighted>
PME_AVX512 __attribute__((flatten)) void bag_sum_avx512(const T* w, const TableView& t, const I* idx, const I* bo,
                                                        int64_t b0, int64_t b1, const T* psw, bool mean, int64_t pad,
                                                        T* out, std::atomic<int64_t>& bad) {
  bag_sum_simd<Avx512Acc<T, NV>, T, I, kWeighted>(w, t, idx, bo, b0, b1, psw, mean, pad, out, bad);
}

template <class T, class I, int NV, bool kWeighted>
PME_AVX2 __attribute__((flatten)) void bag_sum_avx2(const T* w, const TableView& t, const I* idx, const I* bo,
                                                    int64_t b0, int64_t b1, const T* psw, bool mean, int64_t pad,
                                                    T* out, std::atomic<int64_t>& bad) {
  bag_sum_simd<Avx2Acc<T, NV>, T, I, kWeighted>(w, t, idx, bo, b0, b1, psw, mean, pad, out, bad);
}

// __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi") &&
                         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

// The forward kernel for this call: the best the CPU has (AVX-512, else AVX2, else portable).
// PME_CPU_KERNEL=avx512 / avx2 / generic forces one (read once per call, before the parallel
// loop; the tests use it), but never
// beyond what the CPU has: a forced kernel the CPU lacks falls back to the best one it has
// (avx512 on an AVX2-only CPU runs AVX2; avx2 or avx512 without AVX2 run the portable kernel),
// so no setting can execute an unsupported instruction. Any other value means the default.
CpuKernel cpu_kernel() {
  const CpuKernel best = cpu_has_avx512() ? CpuKernel::kAvx512
                         : cpu_has_avx2() ? CpuKernel::kAvx2
                                          : CpuKernel::kGeneric;
  const char* force = std::getenv("PME_CPU_KERNEL");
  if (force == nullptr) return best;
  CpuKernel want = best;
  if (std::strcmp(force, "generic") == 0) want = CpuKernel::kGeneric;
  else if (std::strcmp(force, "avx2") == 0) want = CpuKernel::kAvx2;
  else if (std::strcmp(force, "avx512") == 0) want = CpuKernel::kAvx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

// Runs a register kernel when one serves this call; false leaves it to the portable one.
template <class T, class I>
bool bag_sum_fast(CpuKernel kernel, const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1,
                  const T* psw, int64_t mode, int64_t pad, T* out, std::atomic<int64_t>& bad) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    const int64_t W = t.width;
    if (mode == kMax || t.col_of_size != nullptr || W < 1 || W > 256) return false;
    if (kernel == CpuKernel::kGeneric) return false;
    const bool mean = mode == kMean;
    // NV: the accumulators that cover W, rounded up to a power of two (fewer instantiations),
    // at least one step's worth (a step is 64 bytes of a row: 1 to 4 accumulators).
    auto dispatch = [&](auto lanes_tag, auto run) {
      constexpr int kLanes = decltype(lanes_tag)::value;
      constexpr int kMin = (std::is_same_v<T, float> ? 16 : 32) / kLanes;
      const int64_t nv = (W + kLanes - 1) / kLanes;
      auto with_width = [&](auto weighted_tag) {
        auto go = [&](auto nv_tag) {
          constexpr int kNv = decltype(nv_tag)::value;
          run(std::integral_constant<int, (kNv < kMin ? kMin : kNv)>{}, weighted_tag);
        };
        if (nv <= 1) go(std::integral_constant<int, 1>{});
        else if (nv <= 2) go(std::integral_constant<int, 2>{});
        else if (nv <= 4) go(std::integral_constant<int, 4>{});
        else if (nv <= 8) go(std::integral_constant<int, 8>{});
        else if (nv <= 16) go(std::integral_constant<int, 16>{});
        else if constexpr (kLanes == 8) go(std::integral_constant<int, 32>{});
      };
      if (psw) with_width(std::true_type{});
      else with_width(std::false_type{});
    };
    if (kernel == CpuKernel::kAvx512) {
      dispatch(std::integral_constant<int, 16>{}, [&](auto nv_tag, auto weighted_tag) {
        bag_sum_avx512<T, I, decltype(nv_tag)::value, decltype(weighted_tag)::value>(w, t, idx, bo, b0, b1, psw, mean,
                                                                                   pad, out, bad);
      });
    } else {
      dispatch(std::integral_constant<int, 8>{}, [&](auto nv_tag, auto weighted_tag) {
        bag_sum_avx2<T, I, decltype(nv_tag)::value, decltype(weighted_tag)::value>(w, t, idx, bo, b0, b1, psw, mean,
                                                                                 pad, out, bad);
      });
    }
    return true;
  }
}
#else
CpuKernel cpu_kernel() { return CpuKernel::kGeneric; }

template <class T, class I>
bool bag_sum_fast(CpuKernel, const T*, const TableView&, const I*, const I*, int64_t, int64_t, const T*, int64_t,
                  int64_t, T*, std::atomic<int64_t>&) {
  return false;
}
#endif

// Forward over bags [b0, b1). Each lookup is checked before its row is read (index in range,
// row inside the buffer and the width); the first bad position goes to `bad` and the lookup
// is skipped, so a bad input never reads out of bounds; the caller then throws.
template <class T, class I>
void bag_forward_range(CpuKernel kernel, const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0,
                       int64_t b1, const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax,
                       std::atomic<int64_t>& bad) {
  if (bag_sum_fast(kernel, w, t, idx, bo, b0, b1, psw, mode, pad, out, bad)) return;
  bag_forward_generic(w, t, idx, bo, b0, b1, psw, mode, pad, out, argmax, bad);
}

std::tuple<Tensor, Tensor> lookup_forward(const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                                          const std::optional<Tensor>& bag_offsets,
                                          const std::optional<Tensor>& per_sample_weights,
                                          const std::optional<Tensor>& col_of_size, int64_t out_width,
                                          int64_t mode, int64_t padding_idx) {
  const LookupArgs a = check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size,
                                         mode, padding_idx);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  const TableView tv = make_table(weight, offsets, col_of_size, out_width);

  Tensor out = torch::stable::new_empty(weight, {a.num_bags, out_width});
  Tensor argmax = torch::stable::new_empty(offsets, {mode == kMax ? a.num_bags : 0, mode == kMax ? out_width : 0});
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_table(tv);
    validate_bag_offsets(bo, a.num_bags, a.num_lookups);
    // Indices past the last bag are never read, but are checked as the backward (and the CUDA
    // validation) check them: one rule for what a valid call is.
    for (int64_t j = bo ? static_cast<int64_t>(bo[a.num_bags]) : a.num_lookups; j < a.num_lookups; ++j) {
      if (static_cast<uint64_t>(static_cast<int64_t>(idx[j])) >= static_cast<uint64_t>(a.num_rows)) {
        report_bad_lookup(idx, j, tv);
      }
    }
    std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const T* w = weight.const_data_ptr<T>();
      const T* psw = per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr;
      T* o = out.mutable_data_ptr<T>();
      int64_t* am = mode == kMax ? argmax.mutable_data_ptr<int64_t>() : nullptr;
      const CpuKernel kernel = cpu_kernel();  // getenv once per call, not per chunk
      torch::stable::parallel_for(0, a.num_bags, 64, [&](int64_t b0, int64_t b1) {
        bag_forward_range<T, I>(kernel, w, tv, idx, bo, b0, b1, psw, mode, padding_idx, o, am, bad);
      });
    });
    if (bad.load() != std::numeric_limits<int64_t>::max()) report_bad_lookup(idx, bad.load(), tv);
  });
  return {out, argmax};
}

std::tuple<Tensor, Tensor> lookup_backward(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets,
                                           const Tensor& indices, const std::optional<Tensor>& bag_offsets,
                                           const std::optional<Tensor>& per_sample_weights,
                                           const std::optional<Tensor>& col_of_size, const Tensor& argmax,
                                           int64_t mode, int64_t padding_idx, bool psw_grad) {
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  const int64_t N = indices.numel();
  Tensor grad_w = torch::stable::new_zeros(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_empty(weight, {psw_grad ? N : 0});
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, [&](const auto& in, const RowGroups& groups) {
    using T = typename std::decay_t<decltype(in)>::value_type;
    using A = acc_t<T>;
    const int64_t* off = in.offsets;
    T* gw = grad_w.mutable_data_ptr<T>();
    for_each_row_gradient(in, groups, [&](int64_t, int64_t r, const A* g) {
      T* dst = gw + off[r];
      for (int64_t c = 0, n = off[r + 1] - off[r]; c < n; ++c) dst[c] = static_cast<T>(g[c]);
    });
    if (psw_grad) {
      T* gp = grad_psw.mutable_data_ptr<T>();
      torch::stable::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t r = in.idx[j], b = groups.bag_of[j];
          if (b < 0 || r == padding_idx) {
            gp[j] = T(0);
            continue;
          }
          const int64_t size = off[r + 1] - off[r];
          const int64_t col = in.col_of_size ? in.col_of_size[size] : 0;
          const T* row = in.weight + off[r];
          const T* g = in.grad_out + b * in.W + col;
          A dot = 0;
          for (int64_t c = 0; c < size; ++c) dot += static_cast<A>(row[c]) * static_cast<A>(g[c]);
          gp[j] = static_cast<T>(dot);
        }
      });
    }
  });
  return {grad_w, grad_psw};
}

using Ops = LookupOps<&lookup_forward, &lookup_backward>;

}  // namespace

// The pooling kernel for other operators (pool_bags.h).
template <class T, class I>
void pool_bags(const T* w, const TableView& t, const I* idx, const I* bo, int64_t n, const T* psw, int64_t mode,
               T* out, std::atomic<int64_t>& bad) {
  bag_forward_range<T, I>(cpu_kernel(), w, t, idx, bo, 0, n, psw, mode, -1, out, nullptr, bad);
}

#define PME_POOL_BAGS(T, I)                                                                                     \
  template void pool_bags<T, I>(const T*, const TableView&, const I*, const I*, int64_t, const T*, int64_t, T*, \
                                std::atomic<int64_t>&)
PME_POOL_BAGS(float, int32_t);
PME_POOL_BAGS(float, int64_t);
PME_POOL_BAGS(double, int32_t);
PME_POOL_BAGS(double, int64_t);
PME_POOL_BAGS(c10::Half, int32_t);
PME_POOL_BAGS(c10::Half, int64_t);
PME_POOL_BAGS(c10::BFloat16, int32_t);
PME_POOL_BAGS(c10::BFloat16, int64_t);
#undef PME_POOL_BAGS

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) { PME_REGISTER_LOOKUPS(m, Ops); }

}  // namespace pme::cpu
