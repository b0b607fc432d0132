// CPU: the lookup's AVX2 (+FMA, F16C) register kernel (see lookup_kernels.h): sum / mean over bags,
// padded layout, fp32 / fp16 / bf16 rows, width <= 256, the bag's sums in vector registers.
// Compiled with a target attribute (no flags of its own): lookup_cpu.cpp calls it only on a CPU
// that has the instruction set.
#include "cpu/lookup_kernels.h"

#if PME_HAVE_SIMD_KERNELS
#include <immintrin.h>

#include <algorithm>
#include <limits>

namespace pme::cpu {
namespace {

#define PME_AVX2 __attribute__((target("avx2,fma,f16c")))

// ---- AVX2: 8 floats a register; a step of 64 bytes (16 fp32 or 32 fp16/bf16 entries, the same
// steps as AVX-512, hence the same branches) is two 32-byte loads, one per half of the step.
// A half that the row fills is a plain load, a half past the row's end is not loaded (zero), and
// a half in which the row ends is a masked load. AVX2 masks loads only per 32-bit element, so in
// a 16-bit half the whole live pairs of entries come under a mask and, for a row of odd length,
// the last entry from a scalar load: every load reads the row's own bytes only, and masked-out
// lanes read as 0, as with AVX-512's zero-masked loads. Plain loads wherever possible because
// AVX2's masked loads cost about twice as much on AMD CPUs (a full-width fp32 sum over a cached
// table: 0.68 ms masked, 0.40 ms plain, in a C++ loop on this project's AMD EPYC); rows whose
// sizes are multiples of 8 entries take no masked load (a 16-bit half holding 8 live entries, the
// 16-bit quantum, is one plain 16-byte load).
// An fp32 row of whole halves also takes no branch on its size inside a step (clamped()): the
// second half, when the row ends before it, is loaded from the first half's address and zeroed
// by an AND, so it reads the row's own bytes and no line the row does not touch. A branch there
// would follow the sizes of the rows in turn, which a mix of sizes makes unpredictable
// (probe_loop.cpp under callgrind: 0.74 mispredicted branches a lookup by halves, 0.24 clamped,
// on the benchmark's 8/16/32/64 mix). The 16-bit kernels keep the branches: the same per 16-byte
// quarter (four loads a step) was slower there.

// An fp32 step's two halves from p, r (a multiple of 8, >= 8) live entries from p on: the first
// half whole, the second whole when r > 8, else loaded from p and zeroed (see above).
PME_AVX2 inline void clamped(const float* p, int r, __m256* x) {
  const int64_t two = -static_cast<int64_t>(r > 8);  // all ones or zero
  x[0] = _mm256_loadu_ps(p);
  x[1] = _mm256_and_ps(_mm256_loadu_ps(p + (two & 8)), _mm256_castsi256_ps(_mm256_set1_epi64x(two)));
}

template <class T>
struct Avx2Row;

template <>
struct Avx2Row<float> {
  static constexpr int kStep = 16;
  static constexpr bool kInterleaved = false;
  template <bool kWhole>
  PME_AVX2 static inline void load(const float* row, int k, int live, __m256* x) {
    const float* p = row + 16 * k;
    if constexpr (kWhole) {
      x[0] = _mm256_loadu_ps(p);
      x[1] = _mm256_loadu_ps(p + 8);
      return;
    }
    // Each half of 8 entries as the header says (a lane under a zero mask is not read and cannot
    // fault, even past the end of the buffer).
    const int r = live - 16 * k;  // live entries from p on, >= 1
    if (__builtin_expect(r % 8 == 0, 1)) {
      clamped(p, r, x);
      return;
    }
    const __m256i n = _mm256_set1_epi32(r);
    if (r >= 16) {
      x[0] = _mm256_loadu_ps(p);
      x[1] = _mm256_loadu_ps(p + 8);
    } else if (r >= 8) {
      x[0] = _mm256_loadu_ps(p);
      x[1] = r > 8 ? _mm256_maskload_ps(p + 8, _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)))
                   : _mm256_setzero_ps();
    } else {
      x[0] = _mm256_maskload_ps(p, _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      x[1] = _mm256_setzero_ps();
    }
  }
};

// The 32 16-bit entries of step k, the lanes past the row zero, as four vectors of 8 floats:
// Row::widen converts each half of 16 entries into two (CRTP: Row is the 16-bit type's Avx2Row).
template <class Row>
struct Avx2Row16 {
  static constexpr int kStep = 32;
  template <bool kWhole, class T>
  PME_AVX2 static inline void load(const T* row, int k, int live, __m256* x) {
    __m256i v[2];
    if constexpr (kWhole) {
      const auto* p = reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + 32 * k);
      v[0] = _mm256_loadu_si256(p);
      v[1] = _mm256_loadu_si256(p + 1);
    } else {
      load16(reinterpret_cast<const uint16_t*>(row), k, live, v);
    }
    Row::widen(v[0], x[0], x[1]);
    Row::widen(v[1], x[2], x[3]);
  }
  // Step k's 32 entries, the lanes past the row zero: each half of 16 entries a plain load when it
  // is whole, none when it is past the row, part() where the row ends inside it.
  PME_AVX2 static inline void load16(const uint16_t* row, int k, int live, __m256i* v) {
    const uint16_t* p = row + 32 * k;
    const int r = live - 32 * k;  // live entries from p on, >= 1
    if (r >= 16) {
      v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      v[1] = r >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))
                     : (r > 16 ? part(p + 16, r - 16) : _mm256_setzero_si256());
    } else {
      v[0] = part(p, r);
      v[1] = _mm256_setzero_si256();
    }
  }
  // The first n (1..15) entries from q, the other lanes zero: the whole pairs under a mask of
  // 32-bit lanes, and for odd n the last entry from a scalar load (so only the row's own bytes).
  PME_AVX2 static inline __m256i part(const uint16_t* q, int n) {
    // 8 entries (the 16-bit quantum: the common partial half) are one plain 16-byte load.
    if (__builtin_expect(n == 8, 1))
      return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m256i pairs = _mm256_set1_epi32(n >> 1);
    __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(q),
                                      _mm256_cmpgt_epi32(pairs, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    if (n & 1) {
      const __m256i lane = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m256i at = _mm256_cmpeq_epi16(lane, _mm256_set1_epi16(static_cast<int16_t>(n - 1)));
      v = _mm256_blendv_epi8(v, _mm256_set1_epi16(static_cast<int16_t>(q[n - 1])), at);
    }
    return v;
  }
};

// bf16 -> fp32 puts the 16 bits above 16 zero bits: one unpack with zero per 8 entries, which
// works within 128-bit halves, so the sums are kept interleaved: accumulator 2i holds entries
// 0-3 and 8-11 of its 16, accumulator 2i + 1 entries 4-7 and 12-15 (put back in order once,
// in finish: kInterleaved).
template <>
struct Avx2Row<c10::BFloat16> : Avx2Row16<Avx2Row<c10::BFloat16>> {
  static constexpr bool kInterleaved = true;
  PME_AVX2 static inline void widen(__m256i v, __m256& lo, __m256& hi) {
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
  PME_AVX2 static inline void in_order(__m256& lo, __m256& hi) {
    const __m256 a = lo;
    lo = _mm256_permute2f128_ps(a, hi, 0x20);
    hi = _mm256_permute2f128_ps(a, hi, 0x31);
  }
};

template <>
struct Avx2Row<c10::Half> : Avx2Row16<Avx2Row<c10::Half>> {
  static constexpr bool kInterleaved = false;
  PME_AVX2 static inline void widen(__m256i v, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
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
    avx2_store16(p, k,
                 _mm256_castps_si256(
                     _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan)));
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
    avx2_store16(p, k,
                 _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan),
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
  template <bool kWeighted, int K, bool kWhole>
  PME_AVX2 inline void step(const T* row, int live, float s) {
    __m256 x[kPer];
    Row::template load<kWhole>(row, K, live, x);
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

// indices_in_range: 4 int64 or 8 int32 indices a compare, one test at the end.
PME_AVX2 inline __m256i out_of_range(__m256i x, __m256i top, const int64_t*) {
  return _mm256_or_si256(_mm256_cmpgt_epi64(x, top), _mm256_cmpgt_epi64(_mm256_setzero_si256(), x));
}
PME_AVX2 inline __m256i out_of_range(__m256i x, __m256i top, const int32_t*) {
  return _mm256_or_si256(_mm256_cmpgt_epi32(x, top), _mm256_cmpgt_epi32(_mm256_setzero_si256(), x));
}

template <class I>
PME_AVX2 bool avx2_in_range(const I* idx, int64_t j0, int64_t j1, int64_t rows) {
  constexpr int kLanes = 32 / sizeof(I);
  // The largest valid index as an I (an int32 index below 2^31 fits any larger table).
  const I last = static_cast<I>(std::min<int64_t>(rows - 1, std::numeric_limits<I>::max()));
  const __m256i top =
      sizeof(I) == 8 ? _mm256_set1_epi64x(static_cast<int64_t>(last)) : _mm256_set1_epi32(static_cast<int32_t>(last));
  __m256i out = _mm256_setzero_si256();  // lanes of an index < 0 or > last
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    out = _mm256_or_si256(out, out_of_range(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j)), top, idx));
  }
  bool ok = _mm256_testz_si256(out, out);
  for (; j < j1; ++j) ok &= idx[j] >= 0 && idx[j] <= last;
  return ok;
}

template <class T, class I, int NV, bool kWeighted>
PME_AVX2 __attribute__((flatten)) void bag_sum_avx2_nv(const T* w, const TableView& t, const I* idx, const I* bo,
                                                       int64_t b0, int64_t b1, const T* psw, bool mean, int64_t pad,
                                                       T* out, std::atomic<int64_t>& bad) {
  bag_sum_simd<Avx2Acc<T, NV>, T, I, kWeighted>(w, t, idx, bo, b0, b1, psw, mean, pad, out, bad);
}
}  // namespace

template <class I>
bool indices_in_range(const I* idx, int64_t j0, int64_t j1, int64_t rows) {
  return avx2_in_range(idx, j0, j1, rows);
}
template bool indices_in_range<int32_t>(const int32_t*, int64_t, int64_t, int64_t);
template bool indices_in_range<int64_t>(const int64_t*, int64_t, int64_t, int64_t);

template <class T, class I>
void bag_sum_avx2(const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1, const T* psw,
                  bool mean, int64_t pad, T* out, std::atomic<int64_t>& bad) {
  with_accumulators<8, T>(t.width, psw != nullptr, [&](auto nv, auto weighted) {
    bag_sum_avx2_nv<T, I, decltype(nv)::value, decltype(weighted)::value>(w, t, idx, bo, b0, b1, psw, mean, pad, out,
                                                                          bad);
  });
}

#define PME_ENTRY(T, I)                                                                                              \
  template void bag_sum_avx2<T, I>(const T*, const TableView&, const I*, const I*, int64_t, int64_t, const T*, bool, \
                                   int64_t, T*, std::atomic<int64_t>&)
PME_SIMD_TYPES(PME_ENTRY);
#undef PME_ENTRY

}  // namespace pme::cpu
#endif
