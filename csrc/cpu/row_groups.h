// CPU: group the lookups of a batch by table row, so that every backward-shaped operator
// (gradient, fused optimizer, score accumulation) can own one row per task and sum its
// contributions in a fixed order: deterministic whatever the thread count.
#pragma once

#include "cpu/validate_cpu.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>
#include <vector>

namespace pme::cpu {

// Lookups of one batch grouped by row. Segment s covers pos[seg[s] : seg[s+1]], all of row rows[s],
// in increasing lookup position.
struct RowGroups {
  std::vector<int64_t> rows;  // unique rows touched, increasing
  std::vector<int64_t> seg;  // rows.size() + 1 segment starts into pos
  std::vector<int64_t> pos;  // lookup positions j, grouped by row
  std::vector<int64_t> bag_of;  // bag of every lookup position (-1 after the last bag)
  std::vector<int64_t> count;  // non-padding lookups per bag (for the mean)
};

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
    if (packed) keys.push_back((static_cast<uint64_t>(r) << 32) | static_cast<uint64_t>(j));
    else pairs.emplace_back(r, j);
  }
  if (packed) {
    std::sort(keys.begin(), keys.end());
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
  const T* grad_out;  // [B, W]
  int64_t W;
  const T* weight;  // [total]
  const int64_t* offsets;  // [V + 1]
  const I* idx;  // [N]
  const T* psw;  // [N] or nullptr
  const int64_t* col_of_size;  // [D + 1] or nullptr
  const int64_t* argmax;  // [B, W] for max, else nullptr
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

}  // namespace pme::cpu
