// CPU: group the lookups of a batch by table row, so that every backward-shaped operator
// (gradient, fused optimizer, score accumulation) can own one row per task and sum its
// contributions in a fixed order: deterministic whatever the thread count.
#pragma once

#include "pme.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>
#include <vector>

namespace pme::cpu {

// Shape of the table as the kernels see it.
struct TableView {
  const int64_t* offsets;  // [V + 1]
  int64_t num_rows;  // V
  int64_t total;  // stored entries
  const int64_t* col_of_size;  // [num_cols] or nullptr (padded layout)
  int64_t num_cols;
  int64_t width;  // output width W
  bool checked = false;  // the caller vouches the whole-table check passed (table_checked)
};

// Whole-table check, O(V + D), run by every lookup-shaped operator before any row is read:
// offsets[0] == 0, non-decreasing, offsets[V] == total; col_of_size (grouped layout) maps
// every size s to -1 (no slot) or a slot [col, col + s) inside the output width; every row's
// size fits: <= W (padded) or has a slot (grouped). Checking the whole table (not only the
// rows a batch touches) is what rules out rows that overlap: with offsets that decrease
// somewhere, two rows could share entries and both look fine. Every comparison is written so
// that no sum can wrap (size <= W && col <= W - size, never col + size <= W).
inline void validate_table(const TableView& t) {
  const int64_t* off = t.offsets;
  const int64_t V = t.num_rows, W = t.width;
  PME_CHECK(W >= 0, "the output width must be >= 0, got ", W);
  PME_CHECK(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  PME_CHECK(off[V] == t.total, "offsets[-1] = ", off[V], " must equal the number of stored entries ", t.total);
  const int64_t* cos = t.col_of_size;
  for (int64_t s = 0; cos != nullptr && s < t.num_cols; ++s) {
    const int64_t c = cos[s];
    PME_CHECK(c == -1 || (c >= 0 && s <= W && c <= W - s), "col_of_size[", s, "] = ", c,
              " is not a slot of the output width ", W, " for rows of size ", s,
              " (a column in [0, width - size], or -1 for a size that has no slot)");
  }
  if (t.checked) return;  // this table passed the scan below before (table_checked)
  // Row r is fine if offsets[r] <= offsets[r + 1] and its size fits. Sizes are taken as
  // unsigned differences: no signed overflow whatever the values; the first bad row of an
  // increasing scan has offsets[r] >= 0, so its difference is exact.
  auto row_ok = [&](int64_t r) {
    const int64_t lo = off[r], hi = off[r + 1];
    const uint64_t size = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    if (hi < lo) return false;
    if (cos == nullptr) return size <= static_cast<uint64_t>(W);
    return size < static_cast<uint64_t>(t.num_cols) && cos[size] >= 0;
  };
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  torch::stable::parallel_for(0, V, 1 << 16, [&](int64_t r0, int64_t r1) {
    bool ok = true;
    if (cos == nullptr) {  // branch-free, vectorisable: the common case
      const uint64_t w = static_cast<uint64_t>(W);
      for (int64_t r = r0; r < r1; ++r) {
        ok &= (off[r + 1] >= off[r]) & (static_cast<uint64_t>(off[r + 1]) - static_cast<uint64_t>(off[r]) <= w);
      }
      if (ok) return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (!row_ok(r)) {
        int64_t cur = first_bad.load();
        while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
        }
        return;
      }
    }
  });
  const int64_t r = first_bad.load();
  if (r == std::numeric_limits<int64_t>::max()) return;
  PME_CHECK(off[r + 1] >= off[r], "offsets must be non-decreasing: offsets[", r + 1, "] = ", off[r + 1],
            " < offsets[", r, "] = ", off[r]);
  const int64_t size = off[r + 1] - off[r];
  if (cos == nullptr) {
    PME_CHECK(false, "row ", r, " has size ", size, " (offsets[", r, "] = ", off[r], " to offsets[", r + 1, "] = ",
              off[r + 1], "): it does not fit in the output width ", W);
  }
  PME_CHECK(false, "row ", r, " has size ", size, " (offsets[", r, "] = ", off[r], " to offsets[", r + 1, "] = ",
            off[r + 1], "), which has no slot in col_of_size (", t.num_cols,
            " entries): it does not fit in the output width ", W);
}

// Checks the bag offsets (O(B), in order): start at 0, inside the input, non-decreasing.
template <class I>
void validate_bag_offsets(const I* bo, int64_t B, int64_t N) {
  if (bo == nullptr) return;
  PME_CHECK(bo[0] == 0, "bag offsets must start at 0, got offsets[0] = ", static_cast<int64_t>(bo[0]));
  for (int64_t b = 0; b <= B; ++b) {
    PME_CHECK(bo[b] <= N, "bag offsets point past the input: offsets[", b, "] = ", static_cast<int64_t>(bo[b]),
              " but there are only ", N, " indices");
  }
  for (int64_t b = 0; b < B; ++b) {
    PME_CHECK(bo[b + 1] >= bo[b], "bag offsets must be non-decreasing, but offsets[", b + 1, "] = ",
              static_cast<int64_t>(bo[b + 1]), " < offsets[", b, "] = ", static_cast<int64_t>(bo[b]));
  }
}

// Whether lookup of row r is valid: index in range, row inside the buffer, fits the width.
// Overflow-safe (no sum that can wrap); after validate_table only the index test can fail, the
// rest is a second line of defence that costs two compares.
inline bool lookup_ok(int64_t r, const TableView& t) {
  if (r < 0 || r >= t.num_rows) return false;
  const int64_t lo = t.offsets[r], hi = t.offsets[r + 1];
  if (!(lo >= 0 && hi >= lo && hi <= t.total)) return false;
  const int64_t size = hi - lo;
  if (size > t.width) return false;
  if (!t.col_of_size) return true;
  if (size >= t.num_cols) return false;
  const int64_t col = t.col_of_size[size];
  return col >= 0 && col <= t.width - size;
}

// Throws the message for bad lookup position j.
template <class I>
[[noreturn]] void report_bad_lookup(const I* idx, int64_t j, const TableView& t) {
  const int64_t r = static_cast<int64_t>(idx[j]), V = t.num_rows;
  PME_CHECK(r >= 0 && r < V, "index out of range: indices[", j, "] = ", r, " but the table has ", V,
            " rows (valid: 0 to ", V - 1, ")");
  const int64_t size = static_cast<int64_t>(static_cast<uint64_t>(t.offsets[r + 1]) - static_cast<uint64_t>(t.offsets[r]));
  PME_CHECK(false, "row ", r, " (indices[", j, "]) spans offsets[", r, "] = ", t.offsets[r], " to offsets[", r + 1,
            "] = ", t.offsets[r + 1], ": its size ", size, " is negative, overruns the ", t.total,
            " stored entries, or does not fit in the output width ", t.width,
            " (offsets must be non-decreasing, sizes in [0, D])");
  throw std::runtime_error("unreachable");
}

// Validates bag offsets, indices and the rows they touch in one parallel pass; throws naming
// the first bad position. Untouched rows are not read.
template <class I>
void validate_lookups(const I* idx, int64_t N, const I* bo, int64_t B, const TableView& t) {
  validate_table(t);
  validate_bag_offsets(bo, B, N);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  torch::stable::parallel_for(0, N, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (!lookup_ok(static_cast<int64_t>(idx[j]), t)) {
        int64_t cur = first_bad.load();
        while (j < cur && !first_bad.compare_exchange_weak(cur, j)) {
        }
        return;
      }
    }
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) report_bad_lookup(idx, first_bad.load(), t);
}

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
