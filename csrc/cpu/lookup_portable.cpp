// CPU: the lookup's portable forward kernel (every mode, layout and dtype; the accumulator in
// memory), for any CPU. Called by the dispatch in lookup_cpu.cpp when no register kernel serves
// the call.
#include "cpu/lookup_kernels.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace pme::cpu {
namespace {

// The portable kernel's loops, cloned for AVX2 where GCC can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PME_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PME_CLONES
#endif

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

template <class T, class I>
PME_CLONES void forward_bags(const T* w, const TableView& table, const I* idx, const I* bo, int64_t b0, int64_t b1,
                             const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax,
                             std::atomic<int64_t>& bad) {
  using A = acc_t<T>;
  const TableView t = table;  // a local copy stays in registers (the atomic in note_bad would force reloads)
  const int64_t W = t.width;
  std::vector<A> acc(W);
  const int64_t jend = bag_begin(bo, b1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = bag_begin(bo, b), end = bag_begin(bo, b + 1);
    T* o = out + out_row(t, b);
    int64_t n = 0;
    if (mode == kMax) {
      // As nn.EmbeddingBag on the dense view (CPU): the bag's first counted lookup sets every
      // column (its stored entries, and zeros in the columns it does not store, which pass
      // gradient to no entry); a later lookup's column replaces the current one only when it is
      // strictly greater. So ties go to the earlier lookup, a NaN set first stays, a NaN later
      // is never taken, and a stored -inf can be the max.
      int64_t* am = argmax + b * W;
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(am, am + W, int64_t{-1});
      for (int64_t j = start; j < end; ++j) {
        prefetch_ahead(w, t, idx, j, jend);
        int64_t lo, size, col;
        if (!locate(t, idx, j, pad, bad, lo, size, col)) continue;
        const T* row = w + lo;
        if (n++ == 0) {
          for (int64_t c = 0; c < size; ++c) {
            acc[col + c] = widen<A>(row[c]);
            am[col + c] = j;
          }
          continue;
        }
        for (int64_t c = 0; c < W; ++c) {  // each column: the row's stored entry, or its implicit zero
          if (c >= col && c < col + size) {
            const A v = widen<A>(row[c - col]);
            if (v > acc[c]) {
              acc[c] = v;
              am[c] = j;
            }
          } else if (A(0) > acc[c]) {
            acc[c] = A(0);
            am[c] = -1;
          }
        }
      }
      for (int64_t c = 0; c < W; ++c) o[c] = narrow<T>(acc[c]);
      continue;
    }
    std::fill(acc.begin(), acc.end(), A(0));
    for (int64_t j = start; j < end; ++j) {
      prefetch_ahead(w, t, idx, j, jend);
      int64_t lo, size, col;
      if (!locate(t, idx, j, pad, bad, lo, size, col)) continue;
      ++n;
      if (psw)
        axpy(acc.data() + col, w + lo, size, widen<A>(psw[j]));
      else
        add(acc.data() + col, w + lo, size);
    }
    if (mode == kMean && n > 0) {
      const A inv = static_cast<A>(n);
      for (int64_t c = 0; c < W; ++c) o[c] = narrow<T>(acc[c] / inv);
    } else {
      for (int64_t c = 0; c < W; ++c) o[c] = narrow<T>(acc[c]);
    }
  }
}

}  // namespace

template <class T, class I>
void bag_forward_generic(const T* w, const TableView& table, const I* idx, const I* bo, int64_t b0, int64_t b1,
                         const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax, std::atomic<int64_t>& bad) {
  forward_bags(w, table, idx, bo, b0, b1, psw, mode, pad, out, argmax, bad);
}

#define PME_GENERIC(T, I)                                                                                             \
  template void bag_forward_generic<T, I>(const T*, const TableView&, const I*, const I*, int64_t, int64_t, const T*, \
                                          int64_t, int64_t, T*, int64_t*, std::atomic<int64_t>&)
PME_ALL_TYPES(PME_GENERIC);
#undef PME_GENERIC

}  // namespace pme::cpu
