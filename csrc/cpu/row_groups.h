// CPU: group the lookups of a batch by table row, so that every backward-shaped operator
// (gradient, fused optimizer, score accumulation) can own one row per task and sum its
// contributions in a fixed order: deterministic whatever the thread count.
#pragma once

#include "cpu/validate_cpu.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

namespace pme::cpu {

// Lookups of one batch grouped by row. Segment s covers pos[seg[s] : seg[s+1]], all of row rows[s],
// in increasing lookup position.
struct RowGroups {
  std::vector<int64_t> rows;    // unique rows touched, increasing
  std::vector<int64_t> seg;     // rows.size() + 1 segment starts into pos
  std::vector<int64_t> pos;     // lookup positions j, grouped by row
  std::vector<int64_t> bag_of;  // bag of every lookup position (-1 after the last bag)
  std::vector<int64_t> count;   // non-padding lookups per bag (for the mean)
};

// Sorts keys (row << 32 | position), pushed in increasing position, by row: a stable LSD radix
// sort over the row's bits only (11 bits a pass; the positions are in order already), about 5x
// faster than std::sort on a 65k-lookup batch; std::sort for small batches.
inline void sort_row_keys(std::vector<uint64_t>& keys) {
  constexpr int kBits = 11;
  constexpr size_t kBuckets = size_t{1} << kBits;
  if (keys.size() < 4096) {
    std::sort(keys.begin(), keys.end());
    return;
  }
  uint64_t max_row = 0;
  for (const uint64_t k : keys) max_row = std::max(max_row, k >> 32);
  std::vector<uint64_t> tmp(keys.size());
  std::vector<size_t> count(kBuckets);
  for (int shift = 32; shift < 64 && (max_row >> (shift - 32)) != 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (const uint64_t k : keys) ++count[(k >> shift) & (kBuckets - 1)];
    size_t sum = 0;
    for (size_t& c : count) sum += std::exchange(c, sum);  // exclusive prefix sums
    for (const uint64_t k : keys) tmp[count[(k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(tmp);
  }
}

template <class I>
RowGroups group_by_row(const I* idx, int64_t N, const I* bo, int64_t B, int64_t padding_idx) {
  RowGroups g;
  g.bag_of.assign(N, -1);
  g.count.assign(B, 0);
  torch::stable::parallel_for(0, B, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = bo ? static_cast<int64_t>(bo[b]) : b, e = bo ? static_cast<int64_t>(bo[b + 1]) : b + 1;
      int64_t c = 0;
      for (int64_t j = s; j < e; ++j) {
        g.bag_of[j] = b;
        c += static_cast<int64_t>(idx[j]) != padding_idx;
      }
      g.count[b] = c;
    }
  });
  // Sort (row, position) keys; a packed 64-bit key sorts fastest when both fit in 32 bits
  // (rows past 2^32 take the pair path; they would overflow the packed key).
  std::vector<uint64_t> keys;
  keys.reserve(N);
  bool packed = N < (int64_t{1} << 32);
  for (int64_t j = 0; packed && j < N; ++j) packed = static_cast<uint64_t>(idx[j]) < (uint64_t{1} << 32);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t j = 0; j < N; ++j) {
    const int64_t r = idx[j];
    if (g.bag_of[j] < 0 || r == padding_idx) continue;
    if (packed)
      keys.push_back((static_cast<uint64_t>(r) << 32) | static_cast<uint64_t>(j));
    else
      pairs.emplace_back(r, j);
  }
  if (packed) {
    sort_row_keys(keys);
    g.pos.resize(keys.size());
    for (size_t k = 0; k < keys.size(); ++k) {
      const int64_t r = static_cast<int64_t>(keys[k] >> 32);
      g.pos[k] = static_cast<int64_t>(keys[k] & 0xffffffffu);
      if (g.rows.empty() || g.rows.back() != r) {
        g.rows.push_back(r);
        g.seg.push_back(static_cast<int64_t>(k));
      }
    }
  } else {
    std::sort(pairs.begin(), pairs.end());
    g.pos.resize(pairs.size());
    for (size_t k = 0; k < pairs.size(); ++k) {
      g.pos[k] = pairs[k].second;
      if (g.rows.empty() || g.rows.back() != pairs[k].first) {
        g.rows.push_back(pairs[k].first);
        g.seg.push_back(static_cast<int64_t>(k));
      }
    }
  }
  g.seg.push_back(static_cast<int64_t>(g.pos.size()));
  return g;
}

// Everything a backward-shaped kernel reads, with raw pointers.
template <class T, class I>
struct GradInputs {
  using value_type = T;
  const T* grad_out;  // [B, W]
  int64_t W;
  const T* weight;             // [total]
  const int64_t* offsets;      // [V + 1]
  const I* idx;                // [N]
  const T* psw;                // [N] or nullptr
  const int64_t* col_of_size;  // [D + 1] or nullptr
  const int64_t* argmax;       // [B, W] for max, else nullptr
  int64_t mode;
};

// Summed gradient of one row (segment s) into g[0 : size): the dense optimizer step's gradient.
template <class T, class I>
void row_gradient(const GradInputs<T, I>& in, const RowGroups& groups, int64_t s, acc_t<T>* g) {
  using A = acc_t<T>;
  const int64_t r = groups.rows[s];
  const int64_t size = in.offsets[r + 1] - in.offsets[r];
  const int64_t col = in.col_of_size ? in.col_of_size[size] : 0;
  std::fill(g, g + size, A(0));
  for (int64_t k = groups.seg[s]; k < groups.seg[s + 1]; ++k) {
    const int64_t j = groups.pos[k];
    const int64_t b = groups.bag_of[j];
    const T* go = in.grad_out + b * in.W + col;
    if (in.mode == kMax) {
      const int64_t* am = in.argmax + b * in.W + col;
      for (int64_t c = 0; c < size; ++c) {
        if (am[c] == j) g[c] += static_cast<A>(go[c]);
      }
    } else {
      A scale = in.psw ? static_cast<A>(in.psw[j]) : A(1);
      if (in.mode == kMean) scale /= static_cast<A>(groups.count[b]);
      for (int64_t c = 0; c < size; ++c) g[c] += scale * static_cast<A>(go[c]);
    }
  }
}

// The set-up every backward-shaped operator of one table shares: checks the arguments
// (lookup arguments, grad_out, argmax), validates the batch, groups it by row, then calls
// f(in, groups) with in a GradInputs<T, I> in the weight's and the indices' types.
// bag_offsets absent: the non-pooled lookup (bag b is lookup b).
template <class F>
void with_grouped_batch(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                        const std::optional<Tensor>& bag_offsets, const std::optional<Tensor>& per_sample_weights,
                        const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode,
                        int64_t padding_idx, bool table_checked, F&& f) {
  const LookupArgs a =
      check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, mode, padding_idx);
  const int64_t W = check_grad_args(grad_out, weight, argmax, a, mode);
  const Tensor go = torch::stable::contiguous(grad_out);
  const TableView tv = make_table(weight, offsets, col_of_size, W, table_checked);
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_lookups(idx, a.num_lookups, bo, a.num_bags, tv);
    const RowGroups groups = group_by_row(idx, a.num_lookups, bo, a.num_bags, padding_idx);
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const GradInputs<T, I> in{go.const_data_ptr<T>(),
                                W,
                                weight.const_data_ptr<T>(),
                                tv.offsets,
                                idx,
                                per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
                                tv.col_of_size,
                                mode == kMax ? argmax.const_data_ptr<int64_t>() : nullptr,
                                mode};
      f(in, groups);
    });
  });
}

// Runs f(s, r, g) for every row r = groups.rows[s] of a batch, g its summed gradient (width
// entries of A, filled by row_grad(s, g) first). Rows split across threads (one scratch row per
// task); each row is visited once, by one task: deterministic.
template <class A, class Grad, class F>
void for_each_row_gradient(const RowGroups& groups, int64_t width, const Grad& row_grad, const F& f) {
  const int64_t U = static_cast<int64_t>(groups.rows.size());
  torch::stable::parallel_for(0, U, 64, [&](int64_t s0, int64_t s1) {
    std::vector<A> g(width);
    for (int64_t s = s0; s < s1; ++s) {
      row_grad(s, g.data());
      f(s, groups.rows[s], g.data());
    }
  });
}

// The same for a table's lookups: g is row_gradient's sum.
template <class T, class I, class F>
void for_each_row_gradient(const GradInputs<T, I>& in, const RowGroups& groups, const F& f) {
  for_each_row_gradient<acc_t<T>>(groups, in.W, [&](int64_t s, acc_t<T>* g) { row_gradient(in, groups, s, g); }, f);
}

}  // namespace pme::cpu
