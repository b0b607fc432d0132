// CPU: the lookup's AVX-512 register kernel (see lookup_kernels.h): sum / mean over bags,
// padded layout, fp32 / fp16 / bf16 rows, width <= 256, the bag's sums in vector registers.
// Compiled with a target attribute (no flags of its own): lookup_cpu.cpp calls it only on a CPU
// that has the instruction set.
#include "cpu/lookup_kernels.h"

#if PME_HAVE_SIMD_KERNELS
#include <immintrin.h>

namespace pme::cpu {
namespace {

#define PME_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,bmi,bmi2,lzcnt,popcnt,fma,f16c")))

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
    const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                          12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
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
  template <bool kWeighted, int K, bool kWhole>  // kWhole (all live): the same masked load, at no cost
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
    ((16 * V < W ? Avx512Store<T>::store(
                       o + 16 * V, W - 16 * V >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - 16 * V)) - 1), a[V])
                 : void()),
     ...);
  }
};

template <class T, class I, int NV, bool kWeighted>
PME_AVX512 __attribute__((flatten)) void bag_sum_avx512_nv(const T* w, const TableView& t, const I* idx, const I* bo,
                                                           int64_t b0, int64_t b1, const T* psw, bool mean, int64_t pad,
                                                           T* out, std::atomic<int64_t>& bad) {
  bag_sum_simd<Avx512Acc<T, NV>, T, I, kWeighted>(w, t, idx, bo, b0, b1, psw, mean, pad, out, bad);
}
}  // namespace

template <class T, class I>
void bag_sum_avx512(const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1, const T* psw,
                    bool mean, int64_t pad, T* out, std::atomic<int64_t>& bad) {
  with_accumulators<16, T>(t.width, psw != nullptr, [&](auto nv, auto weighted) {
    bag_sum_avx512_nv<T, I, decltype(nv)::value, decltype(weighted)::value>(w, t, idx, bo, b0, b1, psw, mean, pad, out,
                                                                            bad);
  });
}

#define PME_ENTRY(T, I)                                                                                                \
  template void bag_sum_avx512<T, I>(const T*, const TableView&, const I*, const I*, int64_t, int64_t, const T*, bool, \
                                     int64_t, T*, std::atomic<int64_t>&)
PME_SIMD_TYPES(PME_ENTRY);
#undef PME_ENTRY

}  // namespace pme::cpu
#endif
