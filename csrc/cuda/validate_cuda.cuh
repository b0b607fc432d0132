// CUDA: the table view every lookup-shaped kernel reads, the per-lookup bounds test they all
// share, and the one validation step of the lookup-shaped operators (bag_forward,
// bag_backward, embedding_forward/backward, sparse_update_, accumulate_scores_).
//
// Two layers of safety:
// 1. Every kernel tests every lookup with `lookup_row` and skips one that would read or write
//    out of bounds (index out of range, row overrunning the buffer or the output width), and
//    clamps bag offsets into [0, N]. Bad input can therefore never fault the device.
// 2. `validate_lookups` (environment variable PME_CUDA_VALIDATE, default "1") runs one
//    checking kernel over the whole table (offsets start at 0, non-decreasing, end at
//    weight.numel(); col_of_size's slots inside the width; every row's size fits), the bag
//    offsets and the lookups, reads its verdict back (a host synchronisation) and throws the
//    same messages as the CPU kernels. PME_CUDA_VALIDATE=0 skips it: no synchronisation, bad
//    lookups are silently skipped, and a table whose offsets decrease somewhere (rows that
//    overlap, each one inside the buffer) is not detected: wrong values, never a bad access. It is also skipped while
//    the stream is being captured into a CUDA graph (a capture cannot synchronise); layer 1 still holds there.
#pragma once

#include "cuda/cuda_common.cuh"

#include <climits>

namespace pme::cuda {
// Internal linkage: every .cu file gets its own copy of these helpers and kernels (no ODR
// questions between translation units).
namespace {

// Shape of the table as the kernels see it (raw device pointers).
struct Table {
  const int64_t* off;  // [V + 1]
  int64_t V;
  int64_t total;       // stored entries (weight.numel())
  const int64_t* cos;  // col_of_size [ncos] or nullptr (padded layout)
  int64_t ncos;
  int64_t W;  // output width
};

inline Table make_table(const Tensor& weight, const Tensor& offsets, const std::optional<Tensor>& col_of_size,
                        int64_t width) {
  return {offsets.const_data_ptr<int64_t>(),
          offsets.numel() - 1,
          weight.numel(),
          col_of_size ? col_of_size->const_data_ptr<int64_t>() : nullptr,
          col_of_size ? col_of_size->numel() : 0,
          width};
}

// Row r as a lookup sees it: first stored entry `lo`, `size` entries, first output column
// `col`. False if the lookup must be skipped: r out of range, or the row's span is not inside
// the buffer, or it does not fit in the output width (the same test as the CPU validation).
// Overflow-safe: no sum that can wrap (size <= W && col <= W - size, never col + size <= W).
__device__ __forceinline__ bool lookup_row(const Table& t, int64_t r, int64_t& lo, int64_t& size, int64_t& col) {
  if (r < 0 || r >= t.V) return false;
  lo = t.off[r];
  const int64_t hi = t.off[r + 1];
  if (!(lo >= 0 && hi >= lo && hi <= t.total)) return false;
  size = hi - lo;
  if (size > t.W) return false;
  col = 0;
  if (t.cos != nullptr) {
    if (size >= t.ncos) return false;
    col = t.cos[size];
  }
  return col >= 0 && col <= t.W - size;
}

// Whether row r of a table whose offsets are known to be non-decreasing up to r has a size
// that fits (padded: <= W; grouped: a slot in col_of_size). Used by the whole-table check.
__device__ __forceinline__ bool row_fits(const Table& t, int64_t r) {
  const int64_t lo = t.off[r], hi = t.off[r + 1];
  if (hi < lo) return false;
  const uint64_t size = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (t.cos == nullptr) return size <= static_cast<uint64_t>(t.W);
  return size < static_cast<uint64_t>(t.ncos) && t.cos[size] >= 0;
}

// Bag b's lookups [s, e), clamped into [0, N] so that bad bag offsets cannot reach out of bounds.
template <class I>
__device__ __forceinline__ void bag_range(const I* bo, int64_t b, int64_t N, int64_t& s, int64_t& e) {
  if (bo == nullptr) {  // implicit bags: bag b is lookup b
    s = b;
    e = b + 1;
    return;
  }
  s = min(max(static_cast<int64_t>(bo[b]), int64_t{0}), N);
  e = min(max(static_cast<int64_t>(bo[b + 1]), s), N);
}

// Verdict slots, each starting at ULLONG_MAX ("fine"); the host reports them in the CPU's order:
// kErrTable: 0 if offsets[0] != 0, 1 if offsets[V] != total;
// kErrCos: first s with col_of_size[s] neither -1 nor a slot [col, col + s) inside the width;
// kErrRow: first row r with offsets[r + 1] < offsets[r] or a size that does not fit (the whole
//          table, O(V): rows that a batch does not touch are checked too, so no two rows overlap);
// kErrBag0: 0 if bag_offsets[0] != 0;
// kErrBagPast: first b in [0, B] with bag_offsets[b] > N;
// kErrBagOrder: first b in [0, B) with bag_offsets[b + 1] < bag_offsets[b];
// kErrLookup: first lookup position that is out of range or whose row does not fit.
enum ErrSlot { kErrTable = 0, kErrCos, kErrRow, kErrBag0, kErrBagPast, kErrBagOrder, kErrLookup, kNumErrSlots };

template <class I>
__global__ void validate_kernel(const I* idx, int64_t N, const I* bo, int64_t B, Table t, bool scan_rows,
                                unsigned long long* err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid == 0) {
    if (t.off[0] != 0) {
      atomicMin(&err[kErrTable], 0ull);
    } else if (t.off[t.V] != t.total) {
      atomicMin(&err[kErrTable], 1ull);
    }
    if (bo != nullptr && bo[0] != 0) atomicMin(&err[kErrBag0], 0ull);
  }
  for (int64_t s = tid; t.cos != nullptr && s < t.ncos; s += stride) {
    const int64_t c = t.cos[s];
    if (!(c == -1 || (c >= 0 && s <= t.W && c <= t.W - s))) {
      atomicMin(&err[kErrCos], static_cast<unsigned long long>(s));
    }
  }
  for (int64_t r = tid; scan_rows && r < t.V; r += stride) {
    if (!row_fits(t, r)) atomicMin(&err[kErrRow], static_cast<unsigned long long>(r));
  }
  if (bo != nullptr) {
    for (int64_t b = tid; b <= B; b += stride) {
      if (static_cast<int64_t>(bo[b]) > N) atomicMin(&err[kErrBagPast], static_cast<unsigned long long>(b));
      if (b < B && bo[b + 1] < bo[b]) atomicMin(&err[kErrBagOrder], static_cast<unsigned long long>(b));
    }
  }
  for (int64_t j = tid; j < N; j += stride) {
    int64_t lo, size, col;
    if (!lookup_row(t, static_cast<int64_t>(idx[j]), lo, size, col)) {
      atomicMin(&err[kErrLookup], static_cast<unsigned long long>(j));
    }
  }
}

// PME_CUDA_VALIDATE: "0" turns the synchronising validation off; anything else (or unset) on.
inline bool validation_enabled() {
  const char* v = std::getenv("PME_CUDA_VALIDATE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Checks indices, bag offsets (bo may be nullptr: implicit bags) and the rows the batch
// touches, and throws naming the first bad one, with the CPU kernels' messages. Synchronises
// the stream; does nothing when disabled or while capturing a CUDA graph. table_checked (the
// operators' argument of that name): the whole-table row scan passed before, skip it.
template <class I>
void validate_lookups(const Ctx& ctx, const Tensor& like, const I* idx, int64_t N, const I* bo, int64_t B,
                      const Table& t, bool table_checked) {
  if (!validation_enabled() || ctx.capturing()) return;
  Tensor err_t = torch::stable::new_empty(like, {kNumErrSlots}, ScalarType::Long);
  auto* err = static_cast<unsigned long long*>(err_t.mutable_data_ptr());
  PME_CUDA_CHECK(cudaMemsetAsync(err, 0xff, kNumErrSlots * sizeof(unsigned long long), ctx.stream));
  const int64_t work =
      std::max<int64_t>(std::max<int64_t>(N, bo ? B + 1 : 1), std::max(table_checked ? int64_t{0} : t.V, t.ncos));
  validate_kernel<I><<<ctx.grid(work, 256), 256, 0, ctx.stream>>>(idx, N, bo, B, t, !table_checked, err);
  PME_CUDA_LAUNCH_CHECK();
  unsigned long long h[kNumErrSlots];
  read_device(ctx, h, err, kNumErrSlots);
  constexpr unsigned long long kFine = ULLONG_MAX;
  if (h[kErrTable] != kFine) {
    int64_t o[2] = {0, 0};
    read_device(ctx, &o[0], t.off);
    read_device(ctx, &o[1], t.off + t.V);
    PME_CHECK(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
    PME_CHECK(false, "offsets[-1] = ", o[1], " must equal the number of stored entries ", t.total);
  }
  if (h[kErrCos] != kFine) {
    const int64_t sz = static_cast<int64_t>(h[kErrCos]);
    int64_t c = 0;
    read_device(ctx, &c, t.cos + sz);
    PME_CHECK(false, "col_of_size[", sz, "] = ", c, " is not a slot of the output width ", t.W, " for rows of size ",
              sz, " (a column in [0, width - size], or -1 for a size that has no slot)");
  }
  if (h[kErrRow] != kFine) {
    const int64_t r = static_cast<int64_t>(h[kErrRow]);
    int64_t o[2];
    read_device(ctx, o, t.off + r, 2);
    PME_CHECK(o[1] >= o[0], "offsets must be non-decreasing: offsets[", r + 1, "] = ", o[1], " < offsets[", r,
              "] = ", o[0]);
    PME_CHECK(false, "row ", r, " has size ", o[1] - o[0], " (offsets[", r, "] = ", o[0], " to offsets[", r + 1,
              "] = ", o[1], "): it does not fit in the output width ", t.W,
              t.cos != nullptr ? " (its size has no slot in col_of_size)" : "");
  }
  if (h[kErrBag0] != kFine) {
    I v0 = 0;
    read_device(ctx, &v0, bo);
    PME_CHECK(false, "bag offsets must start at 0, got offsets[0] = ", static_cast<int64_t>(v0));
  }
  if (h[kErrBagPast] != kFine) {
    const int64_t b = static_cast<int64_t>(h[kErrBagPast]);
    I v = 0;
    read_device(ctx, &v, bo + b);
    PME_CHECK(false, "bag offsets point past the input: offsets[", b, "] = ", static_cast<int64_t>(v),
              " but there are only ", N, " indices");
  }
  if (h[kErrBagOrder] != kFine) {
    const int64_t b = static_cast<int64_t>(h[kErrBagOrder]);
    I v[2];
    read_device(ctx, v, bo + b, 2);
    PME_CHECK(false, "bag offsets must be non-decreasing, but offsets[", b + 1, "] = ", static_cast<int64_t>(v[1]),
              " < offsets[", b, "] = ", static_cast<int64_t>(v[0]));
  }
  if (h[kErrLookup] != kFine) {
    const int64_t j = static_cast<int64_t>(h[kErrLookup]);
    I rv = 0;
    read_device(ctx, &rv, idx + j);
    const int64_t r = static_cast<int64_t>(rv);
    PME_CHECK(r >= 0 && r < t.V, "index out of range: indices[", j, "] = ", r, " but the table has ", t.V, " rows (",
              valid_rows(t.V), ")");
    int64_t o[2];
    read_device(ctx, o, t.off + r, 2);
    PME_CHECK(false, "row ", r, " (indices[", j, "]) spans offsets[", r, "] = ", o[0], " to offsets[", r + 1,
              "] = ", o[1], ": ", span_fault(o[0], o[1], t.total, t.W, "the output width"));
  }
}

}  // namespace
}  // namespace pme::cuda
