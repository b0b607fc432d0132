// CPU lookup operators: pooled (bag_forward / bag_backward) and non-pooled
// (embedding_forward / embedding_backward) over a flat multi-size table.
// Forward: one task per bag, fp32 (fp64 for fp64 weights) accumulation.
// Backward: lookups grouped by row (row_groups.h), one task per row: deterministic.
#include "cpu/row_groups.h"
#include "lookup_ops.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace pme::cpu {
namespace {

// a[0:n] += s * row[0:n] in the accumulation type; restrict lets the compiler vectorise.
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

template <class T, class A>
inline void axpy(A* __restrict__ a, const T* __restrict__ row, int64_t n, A s) {
  for (int64_t c = 0; c < n; ++c) a[c] += s * widen<A>(row[c]);
}

template <class T, class A>
inline void add(A* __restrict__ a, const T* __restrict__ row, int64_t n) {
  for (int64_t c = 0; c < n; ++c) a[c] += widen<A>(row[c]);
}

constexpr int64_t kPrefetchRow = 16; // lookups ahead whose row is prefetched

// Forward over bags [b0, b1). Each lookup is checked before its row is read (index in range,
// row inside the buffer and the width); the first bad position goes to `bad` and the lookup
// is skipped, so a bad input never reads out of bounds; the caller then throws.
template <class T, class I>
PME_CLONES void bag_forward_range(const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0, int64_t b1,
                       const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax, std::atomic<int64_t>& bad) {
  using A = acc_t<T>;
  const int64_t W = t.width, V = t.num_rows;
  const int64_t* off = t.offsets;
  std::vector<A> acc(W);
  std::vector<int64_t> cov(mode == kMax ? W : 0);
  auto note_bad = [&](int64_t j) {
    int64_t cur = bad.load();
    while (j < cur && !bad.compare_exchange_weak(cur, j)) {
    }
  };
  const int64_t j0 = bo ? static_cast<int64_t>(bo[b0]) : b0;
  const int64_t jend = bo ? static_cast<int64_t>(bo[b1]) : b1;
  // Pass 1: locate every lookup's row (independent loads of the offset table, so many are in
  // flight at once) and check it. Size -1 marks a lookup to skip (padding or bad).
  const int64_t n_look = jend - j0;
  std::vector<int64_t> lo_of(n_look), size_of(n_look), col_of(n_look);
  for (int64_t k = 0; k < n_look; ++k) {
    const int64_t j = j0 + k, r = static_cast<int64_t>(idx[j]);
    int64_t lo = 0, size = -1, col = 0;
    if (pad >= 0 && r == pad) {
      size = -1;
    } else if (r < 0 || r >= V) {
      note_bad(j);
    } else {
      lo = off[r];
      const int64_t hi = off[r + 1];
      size = hi - lo;
      col = t.col_of_size ? (size >= 0 && size < t.num_cols ? t.col_of_size[size] : -1) : 0;
      if (!(size >= 0 && lo >= 0 && hi <= t.total && col >= 0 && col + size <= W)) {
        note_bad(j);
        size = -1;
      }
    }
    lo_of[k] = lo;
    size_of[k] = size;
    col_of[k] = col;
  }
  // Pass 2 prefetches rows kPrefetchRow lookups ahead: their addresses are known now.
  auto prefetch = [&](int64_t j) {
    const int64_t k = j - j0 + kPrefetchRow;
    if (k < n_look && size_of[k] > 0) {
      const char* p = reinterpret_cast<const char*>(w + lo_of[k]);
      const int64_t bytes = size_of[k] * static_cast<int64_t>(sizeof(T));
      for (int64_t q = 0; q < bytes && q < 1024; q += 64) __builtin_prefetch(p + q);
    }
  };
  auto locate = [&](int64_t j, int64_t& lo, int64_t& size, int64_t& col) {
    const int64_t k = j - j0;
    lo = lo_of[k];
    size = size_of[k];
    col = col_of[k];
    return size >= 0;
  };
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = bo ? static_cast<int64_t>(bo[b]) : b;
    const int64_t end = bo ? static_cast<int64_t>(bo[b + 1]) : b + 1;
    T* o = out + b * W;
    int64_t n = 0;
    if (mode == kMax) {
      int64_t* am = argmax + b * W;
      std::fill(acc.begin(), acc.end(), -std::numeric_limits<A>::infinity());
      std::fill(cov.begin(), cov.end(), 0);
      std::fill(am, am + W, int64_t{-1});
      for (int64_t j = start; j < end; ++j) {
        prefetch(j);
        int64_t lo, size, col;
        if (!locate(j, lo, size, col)) continue;
        ++n;
        const T* row = w + lo;
        for (int64_t c = 0; c < size; ++c) {
          const A v = static_cast<A>(row[c]);
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
        o[c] = static_cast<T>(acc[c]);
      }
      continue;
    }
    std::fill(acc.begin(), acc.end(), A(0));
    for (int64_t j = start; j < end; ++j) {
      prefetch(j);
      int64_t lo, size, col;
      if (!locate(j, lo, size, col)) continue;
      ++n;
      if (psw) axpy(acc.data() + col, w + lo, size, static_cast<A>(psw[j]));
      else add(acc.data() + col, w + lo, size);
    }
    if (mode == kMean && n > 0) {
      const A inv = static_cast<A>(n);
      for (int64_t c = 0; c < W; ++c) o[c] = static_cast<T>(acc[c] / inv);
    } else {
      for (int64_t c = 0; c < W; ++c) o[c] = static_cast<T>(acc[c]);
    }
  }
}

TableView table_view(const Tensor& weight, const Tensor& offsets, const std::optional<Tensor>& col_of_size,
                     int64_t width) {
  return {offsets.const_data_ptr<int64_t>(), offsets.numel() - 1, weight.numel(),
          col_of_size ? col_of_size->const_data_ptr<int64_t>() : nullptr, col_of_size ? col_of_size->numel() : 0,
          width};
}

std::tuple<Tensor, Tensor> lookup_forward(const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                                          const std::optional<Tensor>& bag_offsets,
                                          const std::optional<Tensor>& per_sample_weights,
                                          const std::optional<Tensor>& col_of_size, int64_t out_width,
                                          int64_t mode, int64_t padding_idx) {
  const LookupArgs a = check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size,
                                         mode, padding_idx);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  const TableView tv = table_view(weight, offsets, col_of_size, out_width);

  Tensor out = torch::stable::new_empty(weight, {a.num_bags, out_width});
  Tensor argmax = torch::stable::new_empty(offsets, {mode == kMax ? a.num_bags : 0, mode == kMax ? out_width : 0});
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_bag_offsets(bo, a.num_bags, a.num_lookups, tv);
    std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const T* w = weight.const_data_ptr<T>();
      const T* psw = per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr;
      T* o = out.mutable_data_ptr<T>();
      int64_t* am = mode == kMax ? argmax.mutable_data_ptr<int64_t>() : nullptr;
      torch::stable::parallel_for(0, a.num_bags, 64, [&](int64_t b0, int64_t b1) {
        bag_forward_range<T, I>(w, tv, idx, bo, b0, b1, psw, mode, padding_idx, o, am, bad);
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
  const LookupArgs a = check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size,
                                         mode, padding_idx);
  const int64_t W = check_grad_args(grad_out, weight, argmax, a, mode);
  const Tensor go = torch::stable::contiguous(grad_out);
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  const TableView tv = table_view(weight, offsets, col_of_size, W);
  const int64_t* off = tv.offsets;
  const int64_t* cos = tv.col_of_size;

  Tensor grad_w = torch::stable::new_zeros(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_empty(weight, {psw_grad ? a.num_lookups : 0});
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_lookups(idx, a.num_lookups, bo, a.num_bags, tv);
    const RowGroups groups = group_by_row(idx, a.num_lookups, bo, a.num_bags, padding_idx);
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      using A = acc_t<T>;
      const GradInputs<T, I> in{go.const_data_ptr<T>(),
                                W,
                                weight.const_data_ptr<T>(),
                                off,
                                idx,
                                per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
                                cos,
                                mode == kMax ? argmax.const_data_ptr<int64_t>() : nullptr,
                                mode};
      T* gw = grad_w.mutable_data_ptr<T>();
      const int64_t U = static_cast<int64_t>(groups.rows.size());
      torch::stable::parallel_for(0, U, 64, [&](int64_t s0, int64_t s1) {
        std::vector<A> g(W);
        for (int64_t s = s0; s < s1; ++s) {
          row_gradient(in, groups, s, g.data());
          const int64_t r = groups.rows[s];
          T* dst = gw + off[r];
          for (int64_t c = 0, n = off[r + 1] - off[r]; c < n; ++c) dst[c] = static_cast<T>(g[c]);
        }
      });
      if (psw_grad) {
        T* gp = grad_psw.mutable_data_ptr<T>();
        torch::stable::parallel_for(0, a.num_lookups, 1024, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t r = idx[j], b = groups.bag_of[j];
            if (b < 0 || r == padding_idx) {
              gp[j] = T(0);
              continue;
            }
            const int64_t size = off[r + 1] - off[r];
            const int64_t col = cos ? cos[size] : 0;
            const T* row = in.weight + off[r];
            const T* g = in.grad_out + b * W + col;
            A dot = 0;
            for (int64_t c = 0; c < size; ++c) dot += static_cast<A>(row[c]) * static_cast<A>(g[c]);
            gp[j] = static_cast<T>(dot);
          }
        });
      }
    });
  });
  return {grad_w, grad_psw};
}

using Ops = LookupOps<&lookup_forward, &lookup_backward>;

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) { PME_REGISTER_LOOKUPS(m, Ops); }

}  // namespace pme::cpu
