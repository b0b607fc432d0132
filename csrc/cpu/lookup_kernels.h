// CPU: what the lookup's forward kernels share (lookup_cpu.cpp dispatches to them once per
// call): the per-lookup checks (locate), the prefetches, the element conversions, the register
// kernels' common bag loop (bag_sum_simd, compiled into each instruction set's file) and the
// entry points of the kernels, one file each:
//   lookup_portable.cpp  every mode, layout and dtype, accumulator in memory (any CPU),
//   lookup_avx2.cpp      sum/mean, padded layout, fp32/fp16/bf16, width <= 256, AVX2 + FMA + F16C,
//   lookup_avx512.cpp    the same with AVX-512 (F, BW, VL).
#pragma once

#include "cpu/pool_bags.h"
#include "cpu/validate_cpu.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The register kernels exist where GCC / clang target x86-64 (target attributes + intrinsics).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PME_HAVE_SIMD_KERNELS 1
#else
#define PME_HAVE_SIMD_KERNELS 0
#endif

// X(T, I) for every weight type T and index type I the register kernels are compiled for
// (PME_SIMD_TYPES: fp32, fp16, bf16) and that every other kernel is (PME_ALL_TYPES: fp64 too).
#define PME_SIMD_TYPES(X)    \
  X(float, int32_t);         \
  X(float, int64_t);         \
  X(c10::Half, int32_t);     \
  X(c10::Half, int64_t);     \
  X(c10::BFloat16, int32_t); \
  X(c10::BFloat16, int64_t)
#define PME_ALL_TYPES(X) \
  PME_SIMD_TYPES(X);     \
  X(double, int32_t);    \
  X(double, int64_t)

namespace pme::cpu {

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

// Prefetches for lookup j (see kAheadRow). It reads the offsets of in-range rows only, and a
// prefetch never faults, so a bad index here is harmless (it is reported when its turn comes):
// the offsets prefetch takes any index unchecked (its address formed in integers).
// Few instructions, since a batch whose rows stay in cache is bound by them: one test covers both
// distances away from the chunk's end.
// Always inlined: GCC's IPA takes a function whose only effect is __builtin_prefetch for a
// pure one and deletes its calls (the previous forward's prefetch lambda compiled to nothing).
// kIndexChecked: every index in [.., jend) is known to be in range (the register kernels'
// batches, see indices_in_range), so the row prefetch needs no test of its own.
template <bool kIndexChecked = false, class T, class I>
__attribute__((always_inline)) inline void prefetch_ahead(const T* w, const TableView& t, const I* idx, int64_t j,
                                                          int64_t jend) {
  if (__builtin_expect(j + kAheadOffsets < jend, 1)) {
    const uintptr_t r = static_cast<uintptr_t>(static_cast<int64_t>(idx[j + kAheadOffsets]));
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(t.offsets) + r * sizeof(int64_t)));
  } else if (j + kAheadRow >= jend) {
    return;
  }
  const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[j + kAheadRow]));
  if (kIndexChecked || r < static_cast<uint64_t>(t.num_rows)) {
    // Integer arithmetic: the offsets are not checked yet, the address may be anything.
    const uintptr_t lo = reinterpret_cast<uintptr_t>(w) + static_cast<uintptr_t>(t.offsets[r]) * sizeof(T);
    const uintptr_t hi = reinterpret_cast<uintptr_t>(w) + static_cast<uintptr_t>(t.offsets[r + 1]) * sizeof(T);
    __builtin_prefetch(reinterpret_cast<const void*>(lo));
    __builtin_prefetch(reinterpret_cast<const void*>(hi - 1));
  }
}

// Locates lookup j: false for the padding row and for a bad lookup (noted in `bad`; the caller
// throws after the kernel), else the row's start, size and output column. A row is read only
// after these checks: index in range, row inside the buffer, row inside the output width.
// kPadded: the caller knows the layout is padded (t.col_of_size == nullptr, column 0).
// kIndexChecked: the caller has checked this lookup's index (indices_in_range).
template <bool kPadded = false, bool kIndexChecked = false, class I>
inline bool locate(const TableView& t, const I* idx, int64_t j, int64_t pad, std::atomic<int64_t>& bad, int64_t& lo,
                   int64_t& size, int64_t& col) {
  const int64_t r = static_cast<int64_t>(idx[j]);
  if (!kIndexChecked && __builtin_expect(static_cast<uint64_t>(r) >= static_cast<uint64_t>(t.num_rows), 0)) {
    note_bad(bad, j);
    return false;
  }
  if (r == pad) return false;  // pad is -1 (none) or a row
  lo = t.offsets[r];
  const int64_t hi = t.offsets[r + 1];
  // validate_table has checked the whole table already; this is the second line of defence, in
  // three unsigned comparisons: 0 <= hi <= total, 0 <= lo <= hi, size <= width. Then the column
  // (padded: 0, which fits whenever the size does) against the width without forming col + size.
  const uint64_t ulo = static_cast<uint64_t>(lo), uhi = static_cast<uint64_t>(hi);
  if (__builtin_expect(
          (uhi > static_cast<uint64_t>(t.total)) | (ulo > uhi) | (uhi - ulo > static_cast<uint64_t>(t.width)), 0)) {
    note_bad(bad, j);
    return false;
  }
  size = hi - lo;
  if constexpr (kPadded) {
    col = 0;
    return true;
  }
  col = !t.col_of_size ? 0 : (size < t.num_cols ? t.col_of_size[size] : -1);
  if (__builtin_expect(!(col >= 0 && col <= t.width - size), 0)) {
    note_bad(bad, j);
    return false;
  }
  return true;
}

// Portable forward over bags [b0, b1): every mode and layout (lookup_portable.cpp).
template <class T, class I>
void bag_forward_generic(const T* w, const TableView& table, const I* idx, const I* bo, int64_t b0, int64_t b1,
                         const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax, std::atomic<int64_t>& bad);

#if PME_HAVE_SIMD_KERNELS
// Register kernels: sum/mean over bags [b0, b1), padded layout, output width W <= 256, the bag's
// sums kept in NV vector registers of floats. Two instruction sets, AVX-512 and AVX2 (+FMA,
// F16C), share one kernel (bag_sum_simd: the bag loop, prefetches, locate's checks, which steps
// of a row are live, mean) and differ only in the vector step, an accumulator type Acc:
//   Acc::kSteps          steps that cover the width (a step is 64 bytes of a row: one
//                        AVX-512 register's load, two AVX2 ones; the same steps for both),
//   acc.zero()           clears the sums,
//   acc.step<kW, k, kWhole>(row, live, s)  adds (s times, kW) step k of a row of `live`
//                        entries, called only when k * kStep < live (kWhole: every entry of
//                        the step is live); it reads the row's own bytes and nothing past them,
//   acc.finish(o, W, n)  divides by n (when n > 0) and stores W outputs rounded as
//                        static_cast<T>(float) does.
// Row entries are widened exactly (fp16 by F16C, bf16 by a 16-bit shift), summed in fp32 in
// lookup order (weighted: one FMA per entry), so both kernels give identical outputs (and, where
// no FMA is involved, the portable kernel's).
// The shared code has no target attribute of its own (its vector code is all in Acc's methods):
// it is compiled inlined, with those methods, into each instruction set's kernel, whose
// `flatten` makes GCC inline the whole call tree there (an always_inline intrinsic cannot be
// inlined into a function without the target, hence Acc methods that are not always_inline).

// Only the live steps of a row: one branch per step, rows of the common small sizes skip most.
// A row that fills every step (a full-size row when the width is a whole number of steps) takes
// one branch in all, and its steps are whole (kWhole: plain loads where the kernel has them).
// The step numbers are template arguments, so that every accumulator is named by a constant
// from the start (a loop over them, unrolled only late, left the sums in memory).
template <bool kWeighted, class Acc, class T, int... K>
inline void add_live_steps(Acc& acc, const T* row, int live, float s, std::integer_sequence<int, K...>) {
  constexpr int kFull = Acc::kStep * Acc::kSteps;
  if (live == kFull) {
    (acc.template step<kWeighted, K, true>(row, kFull, s), ...);
  } else {
    ((Acc::kStep * K < live ? acc.template step<kWeighted, K, false>(row, live, s) : void()), ...);
  }
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
      prefetch_ahead<true>(w, t, idx, j, jend);
      int64_t lo, size, col;
      if (!locate<true, true>(t, idx, j, pad, bad, lo, size, col)) continue;
      ++n;
      const T* row = w + lo;
      const int live = static_cast<int>(size);  // <= W <= 256
      const float s = kWeighted ? widen<float>(psw[j]) : 1.0f;
      add_live_steps<kWeighted>(acc, row, live, s, std::make_integer_sequence<int, Acc::kSteps>{});
    }
    acc.finish(out + out_row(t, b), W, mean ? n : 0);
  }
}

// Calls run(nv, weighted) with nv an integral_constant: the accumulators of kLanes floats that
// cover the width W (1..256), rounded up to a power of two (fewer instantiations) and to at
// least one step's worth (a step is 64 bytes of a row: 1 to 4 accumulators); weighted a
// bool_constant. Each instruction set's entry point instantiates its kernel through it.
template <int kLanes, class T, class Run>
inline void with_accumulators(int64_t W, bool weighted, Run&& run) {
  constexpr int kMin = (std::is_same_v<T, float> ? 16 : 32) / kLanes;
  const int64_t nv = (W + kLanes - 1) / kLanes;
  auto with_width = [&](auto weighted_tag) {
    auto go = [&](auto nv_tag) {
      constexpr int kNv = decltype(nv_tag)::value;
      run(std::integral_constant<int, (kNv < kMin ? kMin : kNv)>{}, weighted_tag);
    };
    if (nv <= 1)
      go(std::integral_constant<int, 1>{});
    else if (nv <= 2)
      go(std::integral_constant<int, 2>{});
    else if (nv <= 4)
      go(std::integral_constant<int, 4>{});
    else if (nv <= 8)
      go(std::integral_constant<int, 8>{});
    else if (nv <= 16)
      go(std::integral_constant<int, 16>{});
    else if constexpr (kLanes == 8)
      go(std::integral_constant<int, 32>{});
  };
  if (weighted)
    with_width(std::true_type{});
  else
    with_width(std::false_type{});
}

// Whether idx[j0, j1) are all in [0, rows): one vectorised pass (AVX2), run before a register
// kernel on the same lookups, which then tests only the rows' spans (a batch's indices are
// read-only while the operator runs). Called only on a CPU with AVX2.
template <class I>
bool indices_in_range(const I* idx, int64_t j0, int64_t j1, int64_t rows);

// The register kernels' entry points: sum (mean: mean = true) over bags [b0, b1), padded
// layout, 1 <= t.width <= 256, T in {float, Half, BFloat16}; called only on a CPU that has
// the instruction set (cpu_kernel()), for lookups whose indices indices_in_range has passed.
template <class T, class I>
void bag_sum_avx512(const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1, const T* psw,
                    bool mean, int64_t pad, T* out, std::atomic<int64_t>& bad);

template <class T, class I>
void bag_sum_avx2(const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1, const T* psw,
                  bool mean, int64_t pad, T* out, std::atomic<int64_t>& bad);
#endif

}  // namespace pme::cpu
