// CUDA collection operators (normal form in csrc/collection.h), twins of
// csrc/cpu/collection_cpu.cpp.
// Forward: one warp per (output block, sample) pair, lanes over the block's columns, the bag's
// lookups in order: deterministic, one launch for all tables.
// Backward and fused update: the batch is rewritten as one lookup of the global table (every
// (block, lookup) pair a lookup of global row table_rows[t] + index, bag k * B + b, the block's
// output gradient copied into a [F * B, Wmax] buffer, mean bags pre-divided by their count),
// then grouped by row and reduced by the single-table machinery (row_groups_cuda.cuh) with the
// same row operations as bag_backward and sparse_update_ (row_ops_cuda.cuh).
// Validation (PME_CUDA_VALIDATE, as validate_cuda.cuh): one checking kernel, its verdict read
// back, the CPU's messages; every kernel also skips a lookup that would reach out of bounds.
#include "collection.h"
#include "cuda/row_groups_cuda.cuh"
#include "cuda/row_ops_cuda.cuh"

#include <climits>
#include <cmath>
#include <tuple>

namespace pme::cuda {
namespace {

// Raw device view of a call.
template <class I>
struct Coll {
  const int64_t* off;  // [V + 1]
  int64_t V, total;
  const int64_t* rows;  // [T + 1]
  int64_t T;
  const int64_t* feat;  // [F, 5]
  int64_t F, G, B, N;
  const I* idx;
  const I* bo;  // [G * B + 1]
  int64_t out_width;
};

// Lookups [s, e) of block k, sample b, clamped into [0, N].
template <class I>
__device__ __forceinline__ void coll_bag(const Coll<I>& c, const int64_t* f, int64_t b, int64_t& s, int64_t& e) {
  const int64_t g = f[kFKey];
  s = min(max(static_cast<int64_t>(c.bo[g * c.B + b]), int64_t{0}), c.N);
  e = min(max(static_cast<int64_t>(c.bo[g * c.B + b + 1]), s), c.N);
}

// Whether block row f is usable (the tests of check_collection_meta; a kernel never trusts it).
template <class I>
__device__ __forceinline__ bool block_ok(const Coll<I>& c, const int64_t* f) {
  return f[kFTable] >= 0 && f[kFTable] < c.T && f[kFKey] >= 0 && f[kFKey] < c.G && f[kFWidth] >= 0 && f[kFCol] >= 0 &&
         f[kFCol] <= c.out_width - f[kFWidth] && (f[kFPooling] == kSum || f[kFPooling] == kMean);
}

// Global row of lookup j in block f, or -1 if bad (as the CPU's View::row).
template <class I>
__device__ __forceinline__ int64_t coll_row(const Coll<I>& c, const int64_t* f, int64_t j, int64_t& lo, int64_t& size) {
  const int64_t t = f[kFTable];
  const int64_t base = c.rows[t], vt = c.rows[t + 1] - base;
  const int64_t i = static_cast<int64_t>(c.idx[j]);
  if (base < 0 || base > c.V || vt < 0 || vt > c.V - base) return -1;
  if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(vt)) return -1;
  const int64_t r = base + i;
  lo = c.off[r];
  const int64_t hi = c.off[r + 1];
  size = hi - lo;
  if (!(size >= 0 && lo >= 0 && hi <= c.total && size <= f[kFWidth])) return -1;
  return r;
}

// ------------------------------------------------------------------------------------------
// Validation
// ------------------------------------------------------------------------------------------
// Verdict slots (ULLONG_MAX: fine), reported in the CPU's order.
enum CollErr {
  kCTableRows0 = 0,  // table_rows[0] != 0
  kCTableRowsOrder,  // first t with table_rows[t + 1] < table_rows[t]
  kCTableRowsEnd,    // table_rows[T] != V
  kCFeature,         // first bad block row
  kCOffsets,         // 0: offsets[0] != 0, 1: offsets[V] != total
  kCRow,             // first row whose offsets decrease or whose size exceeds the widest block
  kCBag0,            // bag_offsets[0] != 0
  kCBagPast,         // first bag offset > N
  kCBagOrder,        // first decreasing bag offset
  kCLookup,          // first bad lookup position
  kCNumErr
};

template <class I>
__global__ void coll_validate_meta_kernel(Coll<I> c, int64_t wmax, unsigned long long* err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid == 0) {
    if (c.rows[0] != 0) atomicMin(&err[kCTableRows0], 0ull);
    if (c.rows[c.T] != c.V) atomicMin(&err[kCTableRowsEnd], 0ull);
    if (c.off[0] != 0)
      atomicMin(&err[kCOffsets], 0ull);
    else if (c.off[c.V] != c.total)
      atomicMin(&err[kCOffsets], 1ull);
    if (c.bo[0] != 0) atomicMin(&err[kCBag0], 0ull);
  }
  // The whole table, as the CPU's validate_table (wmax < 0: it passed before, table_checked).
  for (int64_t r = tid; wmax >= 0 && r < c.V; r += stride) {
    const int64_t lo = c.off[r], hi = c.off[r + 1];
    if (hi < lo || static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) > static_cast<uint64_t>(wmax)) {
      atomicMin(&err[kCRow], static_cast<unsigned long long>(r));
    }
  }
  for (int64_t t = tid; t < c.T; t += stride) {
    if (c.rows[t + 1] < c.rows[t]) atomicMin(&err[kCTableRowsOrder], static_cast<unsigned long long>(t));
  }
  for (int64_t k = tid; k < c.F; k += stride) {
    const int64_t* f = c.feat + k * kFFields;
    if (c.B > 0 && !block_ok(c, f)) atomicMin(&err[kCFeature], static_cast<unsigned long long>(k));
  }
  const int64_t nb = c.G * c.B;
  for (int64_t b = tid; b <= nb; b += stride) {
    if (static_cast<int64_t>(c.bo[b]) > c.N) atomicMin(&err[kCBagPast], static_cast<unsigned long long>(b));
    if (b < nb && c.bo[b + 1] < c.bo[b]) atomicMin(&err[kCBagOrder], static_cast<unsigned long long>(b));
  }
}

// One thread per (block, sample) pair, after the meta checks passed.
template <class I>
__global__ void coll_validate_lookups_kernel(Coll<I> c, unsigned long long* err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < c.F * c.B; p += stride) {
    const int64_t* f = c.feat + (p / c.B) * kFFields;
    int64_t s, e, lo, size;
    coll_bag(c, f, p % c.B, s, e);
    for (int64_t j = s; j < e; ++j) {
      if (coll_row(c, f, j, lo, size) < 0) {
        atomicMin(&err[kCLookup], static_cast<unsigned long long>(j));
        break;
      }
    }
  }
}

// The block table [F, 5] on the host (a small read, one synchronisation).
inline std::vector<int64_t> read_blocks(const Ctx& ctx, const int64_t* feat, int64_t F) {
  std::vector<int64_t> f(static_cast<size_t>(F * kFFields));
  if (F) read_device(ctx, f.data(), feat, F * kFFields);
  return f;
}

// The widest block (at least 1), as the CPU's max_width.
inline int64_t max_width_of(const std::vector<int64_t>& f) {
  int64_t m = 1;
  for (size_t k = 0; k + kFFields <= f.size(); k += kFFields) m = std::max(m, f[k + kFWidth]);
  return m;
}

// Checks everything the CPU backend checks and throws its messages (host synchronisation);
// skipped when PME_CUDA_VALIDATE=0 or while capturing a CUDA graph.
template <class I>
void coll_validate(const Ctx& ctx, const Tensor& like, const Coll<I>& c, bool weighted, bool table_checked) {
  if (!validation_enabled() || ctx.capturing()) return;
  // The (small) block table is read once for its three uses: the widest block (it bounds every
  // row's size, as on the CPU, unless the whole-table scan is skipped), the pooling of weighted
  // blocks, and the blocks' disjoint columns.
  const std::vector<int64_t> blocks = read_blocks(ctx, c.feat, c.F);
  const int64_t wmax = table_checked ? -1 : max_width_of(blocks);
  Tensor err_t = torch::stable::new_empty(like, {kCNumErr}, ScalarType::Long);
  auto* err = static_cast<unsigned long long*>(err_t.mutable_data_ptr());
  PME_CUDA_CHECK(cudaMemsetAsync(err, 0xff, kCNumErr * sizeof(unsigned long long), ctx.stream));
  const int64_t work = std::max<int64_t>({c.T, c.F, c.G * c.B + 1, wmax >= 0 ? c.V : 0, int64_t{1}});
  coll_validate_meta_kernel<I><<<ctx.grid(work, 256), 256, 0, ctx.stream>>>(c, wmax, err);
  PME_CUDA_LAUNCH_CHECK();
  unsigned long long h[kCNumErr];
  read_device(ctx, h, err, kCNumErr);
  constexpr unsigned long long kFine = ULLONG_MAX;
  auto read1 = [&](const int64_t* p) {
    int64_t v = 0;
    read_device(ctx, &v, p);
    return v;
  };
  PME_CHECK(h[kCTableRows0] == kFine, "table_rows[0] must be 0, got ", read1(c.rows));
  if (h[kCTableRowsOrder] != kFine) {
    const int64_t t = static_cast<int64_t>(h[kCTableRowsOrder]);
    PME_CHECK(false, "table_rows must be non-decreasing, but table_rows[", t + 1, "] = ", read1(c.rows + t + 1),
              " < table_rows[", t, "] = ", read1(c.rows + t));
  }
  PME_CHECK(h[kCTableRowsEnd] == kFine, "table_rows[-1] = ", read1(c.rows + c.T),
            " must equal the number of rows V = ", c.V, " of offsets");
  if (h[kCFeature] != kFine) {  // the first block the kernel flagged, said as the CPU says it
    const int64_t k = static_cast<int64_t>(h[kCFeature]);
    check_block(blocks.data() + k * kFFields, k, c.T, c.G, true, c.out_width);
  }
  if (c.B == 0) {  // the kernel tests blocks only with bags (a key needs B > 0): the rest here
    for (int64_t k = 0; k < c.F; ++k) check_block(blocks.data() + k * kFFields, k, c.T, c.G, false, c.out_width);
  }
  check_blocks_disjoint(blocks.data(), c.F);  // columns in range now
  if (weighted && c.F > 0) {
    for (int64_t k = 0; k < c.F; ++k) {
      PME_CHECK(blocks[k * kFFields + kFPooling] == kSum, "features[", k,
                "]: per_sample_weights are only supported with sum pooling (as nn.EmbeddingBag)");
    }
  }
  if (h[kCOffsets] != kFine) {
    PME_CHECK(h[kCOffsets] != 0, "offsets[0] must be 0, got ", read1(c.off));
    PME_CHECK(false, "offsets[-1] = ", read1(c.off + c.V), " must equal the number of stored entries ", c.total);
  }
  if (h[kCRow] != kFine) {
    const int64_t r = static_cast<int64_t>(h[kCRow]);
    const int64_t lo = read1(c.off + r), hi = read1(c.off + r + 1);
    PME_CHECK(hi >= lo, "offsets must be non-decreasing: offsets[", r + 1, "] = ", hi, " < offsets[", r, "] = ", lo);
    PME_CHECK(false, "row ", r, " has size ", hi - lo, " (offsets[", r, "] = ", lo, " to offsets[", r + 1, "] = ", hi,
              "): it does not fit in the output width ", wmax);
  }
  auto read_bo = [&](int64_t b) {
    I v = 0;
    read_device(ctx, &v, c.bo + b);
    return static_cast<int64_t>(v);
  };
  PME_CHECK(h[kCBag0] == kFine, "bag offsets must start at 0, got offsets[0] = ", read_bo(0));
  if (h[kCBagPast] != kFine) {
    const int64_t b = static_cast<int64_t>(h[kCBagPast]);
    PME_CHECK(false, "bag offsets point past the input: offsets[", b, "] = ", read_bo(b), " but there are only ", c.N,
              " indices");
  }
  if (h[kCBagOrder] != kFine) {
    const int64_t b = static_cast<int64_t>(h[kCBagOrder]);
    PME_CHECK(false, "bag offsets must be non-decreasing, but offsets[", b + 1, "] = ", read_bo(b + 1), " < offsets[",
              b, "] = ", read_bo(b));
  }
  if (c.F * c.B == 0) return;
  coll_validate_lookups_kernel<I><<<ctx.grid(c.F * c.B, 256), 256, 0, ctx.stream>>>(c, err);
  PME_CUDA_LAUNCH_CHECK();
  read_device(ctx, h, err, kCNumErr);
  if (h[kCLookup] == kFine) return;
  const int64_t j = static_cast<int64_t>(h[kCLookup]);
  // The first block whose key holds j and whose table rejects it names the problem.
  const std::vector<int64_t> f = read_blocks(ctx, c.feat, c.F);
  std::vector<int64_t> rows(static_cast<size_t>(c.T + 1));
  read_device(ctx, rows.data(), c.rows, c.T + 1);
  I iv = 0;
  read_device(ctx, &iv, c.idx + j);
  const int64_t i = static_cast<int64_t>(iv);
  for (int64_t k = 0; k < c.F; ++k) {
    const int64_t* fk = f.data() + k * kFFields;
    const int64_t g = fk[kFKey];
    if (j < read_bo(g * c.B) || j >= read_bo(g * c.B + c.B)) continue;
    const int64_t t = fk[kFTable], vt = rows[t + 1] - rows[t];
    PME_CHECK(i >= 0 && i < vt, "index out of range: indices[", j, "] = ", i, " (key ", g, ", output block ", k,
              ") but table ", t, " has ", vt, " rows (", valid_rows(vt), ")");
    const int64_t r = rows[t] + i;
    int64_t o[2];
    read_device(ctx, o, c.off + r, 2);
    if (o[1] - o[0] >= 0 && o[0] >= 0 && o[1] <= c.total && o[1] - o[0] <= fk[kFWidth]) continue;
    PME_CHECK(false, "row ", i, " of table ", t, " (global row ", r, ", indices[", j, "]) spans offsets[", r,
              "] = ", o[0], " to offsets[", r + 1, "] = ", o[1], ": ",
              span_fault(o[0], o[1], c.total, fk[kFWidth], "the table's width"));
  }
  PME_CHECK(false, "bad lookup at indices[", j, "]");
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <class T, class I>
__global__ void __launch_bounds__(256) coll_forward_kernel(Coll<I> c, const T* w, const T* psw, T* out) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; p < c.F * c.B; p += nwarps) {
    const int64_t* f = c.feat + (p / c.B) * kFFields;
    const int64_t b = p % c.B;
    if (!block_ok(c, f)) continue;
    const int64_t W = f[kFWidth];
    int64_t s, e;
    coll_bag(c, f, b, s, e);
    T* o = out + b * c.out_width + f[kFCol];
    for (int64_t c0 = 0; c0 < W; c0 += kChunk) {
      A acc[kVPL];
#pragma unroll
      for (int i = 0; i < kVPL; ++i) acc[i] = 0;
      int64_t n = 0;
      for (int64_t j = s; j < e; ++j) {
        int64_t lo, size;
        if (coll_row(c, f, j, lo, size) < 0) continue;
        ++n;
        const A sc = psw ? to_acc(psw[j]) : A(1);
#pragma unroll
        for (int i = 0; i < kVPL; ++i) {
          const int64_t col = c0 + lane + kWarp * i;
          if (col < size) acc[i] += sc * to_acc(w[lo + col]);
        }
      }
      const bool mean = f[kFPooling] == kMean && n > 0;
#pragma unroll
      for (int i = 0; i < kVPL; ++i) {
        const int64_t col = c0 + lane + kWarp * i;
        if (col < W) o[col] = from_acc<T>(mean ? acc[i] / static_cast<A>(n) : acc[i]);
      }
    }
  }
}

template <class I>
Coll<I> make_coll(const CollectionArgs& a, const Tensor& weight, const Tensor& offsets, const Tensor& table_rows,
                  const Tensor& features, const Tensor& indices, const Tensor& bag_offsets, int64_t out_width) {
  return {offsets.const_data_ptr<int64_t>(),
          a.num_rows,
          weight.numel(),
          table_rows.const_data_ptr<int64_t>(),
          a.num_tables,
          features.const_data_ptr<int64_t>(),
          a.num_blocks,
          a.num_keys,
          a.batch,
          a.num_lookups,
          indices.const_data_ptr<I>(),
          bag_offsets.const_data_ptr<I>(),
          out_width};
}

Tensor collection_forward(Tensor weight, Tensor offsets, Tensor table_rows, Tensor features, Tensor indices,
                          Tensor bag_offsets, std::optional<Tensor> per_sample_weights, int64_t batch_size,
                          int64_t out_width, bool table_checked) {
  const CollectionArgs a = check_collection_args(weight, offsets, table_rows, features, indices, bag_offsets,
                                                 per_sample_weights, batch_size);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  const Ctx ctx(weight);
  Tensor out = new_output(weight, a.batch, out_width, "the output [batch_size, out_width]", /*zero=*/true);
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const Coll<I> c = make_coll<I>(a, weight, offsets, table_rows, features, indices, bag_offsets, out_width);
    coll_validate(ctx, offsets, c, per_sample_weights.has_value(), table_checked);
    if (a.num_blocks * a.batch == 0) return;
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      coll_forward_kernel<T, I><<<ctx.grid(a.num_blocks * a.batch * kWarp, 256), 256, 0, ctx.stream>>>(
          c, weight.const_data_ptr<T>(), per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
          out.mutable_data_ptr<T>());
      PME_CUDA_LAUNCH_CHECK();
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// The batch as one lookup of the global table
// ------------------------------------------------------------------------------------------
// One thread: per block, its lookups [j0, j1) and its first virtual position; last: M.
template <class I>
__global__ void block_ranges_kernel(Coll<I> c, int64_t* ranges /* [F, 3] */, int64_t* total) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t m = 0;
  for (int64_t k = 0; k < c.F; ++k) {
    const int64_t* f = c.feat + k * kFFields;
    int64_t j0 = 0, j1 = 0;
    if (block_ok(c, f) && c.B > 0) {
      int64_t s, e;
      coll_bag(c, f, 0, j0, e);
      coll_bag(c, f, c.B - 1, s, j1);
      j1 = max(j1, j0);
    }
    ranges[k * 3] = j0;
    ranges[k * 3 + 1] = j1;
    ranges[k * 3 + 2] = m;
    m += j1 - j0;
  }
  *total = m;
}

// One thread per (block, sample) pair: its virtual bag offset, its lookups' global rows (-1
// for a lookup the forward skips) and positions, and the scale of its gradient (1, or
// 1 / count for a mean bag: count = the lookups the forward pooled).
template <class I, class A>
__global__ void virtual_kernel(Coll<I> c, const int64_t* ranges, int64_t M, int64_t* vbo, int64_t* vrow, int64_t* vpos,
                               A* scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t P = c.F * c.B;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p <= P; p += stride) {
    if (p == P) {
      vbo[P] = M;
      continue;
    }
    const int64_t k = p / c.B, b = p % c.B;
    const int64_t* f = c.feat + k * kFFields;
    const int64_t j0 = ranges[k * 3], j1 = ranges[k * 3 + 1], m0 = ranges[k * 3 + 2];
    int64_t s = j0, e = j0;
    if (block_ok(c, f)) coll_bag(c, f, b, s, e);
    // Inside the block's range [j0, j1), which M counted: bag offsets that decrease (unchecked,
    // PME_CUDA_VALIDATE=0) must not write past this block's slots (rows not covered stay -1).
    s = min(max(s, j0), j1);
    e = min(max(e, s), j1);
    vbo[p] = m0 + s - j0;
    int64_t n = 0;
    for (int64_t j = s; j < e; ++j) {
      int64_t lo, size;
      const int64_t r = block_ok(c, f) ? coll_row(c, f, j, lo, size) : -1;
      vrow[m0 + j - j0] = r;
      vpos[m0 + j - j0] = j;
      n += r >= 0;
    }
    scale[p] = (block_ok(c, f) && f[kFPooling] == kMean && n > 0) ? A(1) / static_cast<A>(n) : A(1);
  }
}

// vgrad[(k * B + b), c] = grad_out[b, col_k + c] (c < width_k), 0 past the block's width; a mean
// block's 1 / count joins in the accumulation type (GradSrc::bag_scale), as the CPU's does.
template <class T, class I>
__global__ void vgrad_kernel(Coll<I> c, const T* grad_out, int64_t Wg, int64_t Wmax, T* vgrad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n = c.F * c.B * Wmax;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t p = i / Wmax, col = i % Wmax;
    const int64_t* f = c.feat + (p / c.B) * kFFields;
    const int64_t b = p % c.B;
    T v = zero_value<T>();
    if (block_ok(c, f) && col < f[kFWidth] && f[kFCol] + col < Wg) {
      v = grad_out[b * Wg + f[kFCol] + col];
    }
    vgrad[i] = v;
  }
}

template <class T>
__global__ void gather_kernel(const T* src, const int64_t* pos, int64_t M, T* dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < M; m += stride) {
    dst[m] = src[pos[m]];
  }
}

// dot[m] = <row of virtual lookup m, its bag's gradient>, one warp per m, fixed-order reduction.
template <class T>
__global__ void __launch_bounds__(256) vdot_kernel(const T* w, Table t, const int64_t* vrow, int64_t M,
                                                   const int32_t* bag_of, const T* vgrad, acc_t<T>* dot) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t m = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; m < M; m += nwarps) {
    A d = 0;
    int64_t lo, size, col;
    const int64_t vb = bag_of ? bag_of[m] : -1;
    if (vb >= 0 && lookup_row(t, vrow[m], lo, size, col)) {
      for (int64_t c = lane; c < size; c += kWarp) d += to_acc(w[lo + c]) * to_acc(vgrad[vb * t.W + c]);
    }
    d = warp_sum(d);
    if (lane == 0) dot[m] = d;
  }
}

// grad_psw[j] = the sum, in block order, of dot over the blocks that read lookup j.
template <class T>
__global__ void psw_sum_kernel(const acc_t<T>* dot, const int64_t* ranges, int64_t F, int64_t N, T* gp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N; j += stride) {
    acc_t<T> s = 0;
    for (int64_t k = 0; k < F; ++k) {
      const int64_t j0 = ranges[k * 3], j1 = ranges[k * 3 + 1];
      if (j >= j0 && j < j1) s += dot[ranges[k * 3 + 2] + j - j0];
    }
    gp[j] = from_acc<T>(s);
  }
}

int64_t max_width_host(const Ctx& ctx, const Tensor& features, int64_t F) {
  return max_width_of(read_blocks(ctx, features.const_data_ptr<int64_t>(), F));
}

// for_each_collection_row's default after-step: nothing.
struct NoAfter {
  template <class... Args>
  void operator()(Args&&...) const {}
};

// Builds the virtual single-table form of the batch and runs make_op(T{}) on every touched row;
// after(...) may use the grouping and the virtual gradient (psw gradient).
template <class MakeOp, class After = NoAfter>
void for_each_collection_row(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets,
                             const Tensor& table_rows, const Tensor& features, const Tensor& indices,
                             const Tensor& bag_offsets, const std::optional<Tensor>& psw, int64_t batch_size,
                             bool table_checked, MakeOp&& make_op, After&& after = After{}) {
  const CollectionArgs a =
      check_collection_args(weight, offsets, table_rows, features, indices, bag_offsets, psw, batch_size);
  PME_CHECK(grad_out.dim() == 2 && grad_out.sizes()[0] == a.batch, "grad_out must be [", a.batch, ", out_width]");
  PME_CHECK(grad_out.scalar_type() == weight.scalar_type(), "grad_out must have the dtype of weight");
  check_same_device(grad_out, weight, "grad_out");
  const int64_t Wg = grad_out.sizes()[1];
  const Tensor go = torch::stable::contiguous(grad_out);
  const Ctx ctx(weight);
  // The widest block and the batch's lookup count are read back to size the work below, which a
  // CUDA graph cannot capture: a clear error rather than the capture's own.
  PME_CHECK(!ctx.capturing(), "the collection's backward and fused update read sizes back to the host and cannot be ",
            "captured in a CUDA graph (capture the forward, or use per-table modules, whose fused step captures)");
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const Coll<I> c = make_coll<I>(a, weight, offsets, table_rows, features, indices, bag_offsets, Wg);
    coll_validate(ctx, offsets, c, psw.has_value(), table_checked);
    const int64_t F = a.num_blocks, B = a.batch;
    if (F * B == 0) return;
    const int64_t Wmax = max_width_host(ctx, features, F);
    Tensor ranges = torch::stable::new_empty(offsets, {F * 3 + 1});
    int64_t* rg = ranges.mutable_data_ptr<int64_t>();
    block_ranges_kernel<I><<<1, 1, 0, ctx.stream>>>(c, rg, rg + F * 3);
    PME_CUDA_LAUNCH_CHECK();
    int64_t M = 0;
    read_device(ctx, &M, rg + F * 3);
    Tensor vbo = torch::stable::new_empty(offsets, {F * B + 1});
    Tensor vrow = torch::stable::new_empty(offsets, {std::max<int64_t>(M, 1)});
    Tensor vpos = torch::stable::new_empty(offsets, {std::max<int64_t>(M, 1)});
    // -1 (a lookup to skip) where no bag writes: only bad, unchecked bag offsets leave gaps
    PME_CUDA_CHECK(cudaMemsetAsync(vrow.mutable_data_ptr(), 0xff, vrow.numel() * sizeof(int64_t), ctx.stream));
    PME_CUDA_CHECK(cudaMemsetAsync(vpos.mutable_data_ptr(), 0, vpos.numel() * sizeof(int64_t), ctx.stream));
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      using A = acc_t<T>;
      Tensor scale = torch::stable::new_empty(
          offsets, {F * B}, weight.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float);
      virtual_kernel<I, A><<<ctx.grid(F * B + 1, 256), 256, 0, ctx.stream>>>(
          c, rg, M, vbo.mutable_data_ptr<int64_t>(), vrow.mutable_data_ptr<int64_t>(), vpos.mutable_data_ptr<int64_t>(),
          static_cast<A*>(scale.mutable_data_ptr()));
      PME_CUDA_LAUNCH_CHECK();
      Tensor vgrad = torch::stable::new_empty(weight, {F * B, Wmax});
      vgrad_kernel<T, I><<<ctx.grid(F * B * Wmax, 256), 256, 0, ctx.stream>>>(c, go.const_data_ptr<T>(), Wg, Wmax,
                                                                              vgrad.mutable_data_ptr<T>());
      PME_CUDA_LAUNCH_CHECK();
      Tensor vpsw;
      const T* vp = nullptr;
      if (psw.has_value() && M > 0) {
        vpsw = torch::stable::new_empty(weight, {M});
        gather_kernel<T><<<ctx.grid(M, 256), 256, 0, ctx.stream>>>(
            psw->const_data_ptr<T>(), vpos.const_data_ptr<int64_t>(), M, vpsw.mutable_data_ptr<T>());
        PME_CUDA_LAUNCH_CHECK();
        vp = vpsw.const_data_ptr<T>();
      }
      const Table tab{offsets.const_data_ptr<int64_t>(), a.num_rows, weight.numel(), nullptr, 0, Wmax};
      const RowGroups groups = group_by_row<int64_t>(ctx, offsets, vrow.const_data_ptr<int64_t>(), M,
                                                     vbo.const_data_ptr<int64_t>(), F * B, -1, tab, false);
      const GradSrc<T> src{
          vgrad.const_data_ptr<T>(), Wmax, vp, nullptr, tab, kSum, static_cast<const A*>(scale.const_data_ptr())};
      run_row_op<T>(ctx, offsets, groups, src, make_op(T{}));
      after(T{}, ctx, groups, vgrad, vrow, tab, rg, M);
    });
  });
}

std::tuple<Tensor, Tensor> collection_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor table_rows,
                                               Tensor features, Tensor indices, Tensor bag_offsets,
                                               std::optional<Tensor> per_sample_weights, int64_t batch_size,
                                               bool psw_grad, bool table_checked) {
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  Tensor grad_w = torch::stable::new_zeros(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_zeros(weight, {psw_grad ? indices.numel() : 0});
  void* gw = grad_w.mutable_data_ptr();
  for_each_collection_row(
      grad_out, weight, offsets, table_rows, features, indices, bag_offsets, per_sample_weights, batch_size,
      table_checked, [&](auto tag) { return GradWriteOp<decltype(tag)>{{}, static_cast<decltype(tag)*>(gw)}; },
      [&](auto tag, const Ctx& ctx, const RowGroups& groups, const Tensor& vgrad, const Tensor& vrow, const Table& tab,
          const int64_t* ranges, int64_t M) {
        using T = decltype(tag);
        using A = acc_t<T>;
        if (!psw_grad || indices.numel() == 0) return;
        Tensor dot = torch::stable::new_zeros(
            offsets, {std::max<int64_t>(M, 1)},
            weight.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float);
        if (M > 0) {
          vdot_kernel<T><<<ctx.grid(M * kWarp, 256), 256, 0, ctx.stream>>>(
              weight.const_data_ptr<T>(), tab, vrow.const_data_ptr<int64_t>(), M, groups.d.bag_of,
              vgrad.const_data_ptr<T>(), static_cast<A*>(dot.mutable_data_ptr()));
          PME_CUDA_LAUNCH_CHECK();
        }
        psw_sum_kernel<T><<<ctx.grid(indices.numel(), 256), 256, 0, ctx.stream>>>(
            static_cast<const A*>(dot.const_data_ptr()), ranges, features.sizes()[0], indices.numel(),
            grad_psw.mutable_data_ptr<T>());
        PME_CUDA_LAUNCH_CHECK();
      });
  return {grad_w, grad_psw};
}

void collection_update_(Tensor weight, Tensor state1, Tensor state2, Tensor grad_out, Tensor offsets, Tensor table_rows,
                        Tensor features, Tensor indices, Tensor bag_offsets, std::optional<Tensor> per_sample_weights,
                        int64_t batch_size, int64_t optimizer, double lr, double weight_decay, double eps, double beta1,
                        double beta2, double grad_scale, int64_t step, bool table_checked) {
  check_update_args(weight, state1, state2, offsets, optimizer, lr, weight_decay, eps, beta1, beta2, grad_scale, step);
  check_update_in_place(weight, state1, state2,
                        {{&grad_out, "grad_out"},
                         {&offsets, "offsets"},
                         {&table_rows, "table_rows"},
                         {&features, "features"},
                         {&indices, "indices"},
                         {&bag_offsets, "bag_offsets"},
                         {per_sample_weights ? &*per_sample_weights : nullptr, "per_sample_weights"}});
  void* s1 = optimizer != kSGD && state1.numel() ? state1.mutable_data_ptr() : nullptr;
  void* s2 = optimizer == kAdam && state2.numel() ? state2.mutable_data_ptr() : nullptr;
  void* w = weight.mutable_data_ptr();
  for_each_collection_row(grad_out, weight, offsets, table_rows, features, indices, bag_offsets, per_sample_weights,
                          batch_size, table_checked, [&](auto tag) {
                            return make_update_op<decltype(tag)>(w, s1, s2, optimizer, lr, weight_decay, eps, beta1,
                                                                 beta2, grad_scale, step);
                          });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  PME_REGISTER_COLLECTION(m);
}

}  // namespace pme::cuda
