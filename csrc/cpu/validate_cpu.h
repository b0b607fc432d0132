// CPU: the table view every lookup-shaped kernel reads, the per-lookup bounds test they all
// share, and the validation the lookup-shaped operators run before any row is read. The CUDA
// twin is csrc/cuda/validate_cuda.cuh, with the same names where the concepts match
// (make_table, lookup_row, row_fits, validate_lookups) and the same messages.
#pragma once

#include "pme.h"

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>

namespace pme::cpu {

// Shape of the table as the kernels see it.
struct TableView {
  const int64_t* offsets;      // [V + 1]
  int64_t num_rows;            // V
  int64_t total;               // stored entries
  const int64_t* col_of_size;  // [num_cols] or nullptr (padded layout)
  int64_t num_cols;
  int64_t width;         // output width W
  bool checked = false;  // the caller vouches the whole-table scan passed before (table_checked)
  // Entries from one bag's output row to the next; 0: width (a [bags, W] output). The forward
  // kernels write bag b's outputs at out_row(t, b); max mode's argmax stays [bags, W].
  int64_t out_stride = 0;
};

// Where bag b's output row starts, in entries from the output's start.
inline int64_t out_row(const TableView& t, int64_t b) {
  return b * (t.out_stride > 0 ? t.out_stride : t.width);
}

inline TableView make_table(const Tensor& weight, const Tensor& offsets, const std::optional<Tensor>& col_of_size,
                            int64_t width, bool checked = false) {
  return {offsets.const_data_ptr<int64_t>(),
          offsets.numel() - 1,
          weight.numel(),
          col_of_size ? col_of_size->const_data_ptr<int64_t>() : nullptr,
          col_of_size ? col_of_size->numel() : 0,
          width,
          checked};
}

// Whether row r of a table whose offsets are known to be non-decreasing up to r has a size
// that fits (padded: <= W; grouped: a slot in col_of_size). Sizes are taken as unsigned
// differences: no signed overflow whatever the values; the first bad row of an increasing scan
// has offsets[r] >= 0, so its difference is exact.
inline bool row_fits(const TableView& t, int64_t r) {
  const int64_t lo = t.offsets[r], hi = t.offsets[r + 1];
  if (hi < lo) return false;
  const uint64_t size = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (t.col_of_size == nullptr) return size <= static_cast<uint64_t>(t.width);
  return size < static_cast<uint64_t>(t.num_cols) && t.col_of_size[size] >= 0;
}

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
      if (!row_fits(t, r)) {
        int64_t cur = first_bad.load();
        while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
        }
        return;
      }
    }
  });
  const int64_t r = first_bad.load();
  if (r == std::numeric_limits<int64_t>::max()) return;
  PME_CHECK(off[r + 1] >= off[r], "offsets must be non-decreasing: offsets[", r + 1, "] = ", off[r + 1], " < offsets[",
            r, "] = ", off[r]);
  const int64_t size = off[r + 1] - off[r];
  if (cos == nullptr) {
    PME_CHECK(false, "row ", r, " has size ", size, " (offsets[", r, "] = ", off[r], " to offsets[", r + 1,
              "] = ", off[r + 1], "): it does not fit in the output width ", W);
  }
  PME_CHECK(false, "row ", r, " has size ", size, " (offsets[", r, "] = ", off[r], " to offsets[", r + 1,
            "] = ", off[r + 1], "), which has no slot in col_of_size (", t.num_cols,
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
    PME_CHECK(bo[b + 1] >= bo[b], "bag offsets must be non-decreasing, but offsets[", b + 1,
              "] = ", static_cast<int64_t>(bo[b + 1]), " < offsets[", b, "] = ", static_cast<int64_t>(bo[b]));
  }
}

// Row r as a lookup sees it: first stored entry `lo`, `size` entries, first output column
// `col`. False if the lookup is bad: r out of range, or the row's span is not inside the
// buffer, or it does not fit in the output width. Overflow-safe (no sum that can wrap); after
// validate_table only the index test can fail, the rest is a second line of defence that costs
// two compares.
inline bool lookup_row(const TableView& t, int64_t r, int64_t& lo, int64_t& size, int64_t& col) {
  if (r < 0 || r >= t.num_rows) return false;
  lo = t.offsets[r];
  const int64_t hi = t.offsets[r + 1];
  if (!(lo >= 0 && hi >= lo && hi <= t.total)) return false;
  size = hi - lo;
  if (size > t.width) return false;
  col = 0;
  if (t.col_of_size != nullptr) {
    if (size >= t.num_cols) return false;
    col = t.col_of_size[size];
  }
  return col >= 0 && col <= t.width - size;
}

// Throws the message for bad lookup position j.
template <class I>
[[noreturn]] void report_bad_lookup(const I* idx, int64_t j, const TableView& t) {
  const int64_t r = static_cast<int64_t>(idx[j]), V = t.num_rows;
  PME_CHECK(r >= 0 && r < V, "index out of range: indices[", j, "] = ", r, " but the table has ", V, " rows (",
            valid_rows(V), ")");
  PME_CHECK(false, "row ", r, " (indices[", j, "]) spans offsets[", r, "] = ", t.offsets[r], " to offsets[", r + 1,
            "] = ", t.offsets[r + 1], ": ",
            span_fault(t.offsets[r], t.offsets[r + 1], t.total, t.width, "the output width"));
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
      int64_t lo, size, col;
      if (!lookup_row(t, static_cast<int64_t>(idx[j]), lo, size, col)) {
        int64_t cur = first_bad.load();
        while (j < cur && !first_bad.compare_exchange_weak(cur, j)) {
        }
        return;
      }
    }
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) report_bad_lookup(idx, first_bad.load(), t);
}

}  // namespace pme::cpu
