// CUDA: group the lookups of a batch by table row, then run one "row operation" per touched
// row with the row's summed gradient: the machinery behind bag_backward, embedding_backward,
// sparse_update_ and accumulate_scores_. Deterministic: no float atomics anywhere; every sum
// has a fixed order that does not depend on scheduling.
//
// Grouping (group_by_row):
//   1. bag_kernel: bag_of[j] (int32, -1 after the last bag) and count[b] (the lookups of bag b
//      the forward counts in its mean: not padding and not skipped as bad), one warp per bag.
//      Skipped for implicit bags (bag j = lookup j).
//   2. key_kernel: key[j] = row of lookup j, or the sentinel V when the lookup contributes
//      nothing (padding, after the last bag, or a bad lookup that validation did not stop);
//      value[j] = j.
//   3. CUB radix sort of (key, value) pairs on the low ceil(log2(V+1)) bits. The sort is
//      stable, so the positions of one row stay increasing.
//   4. head_kernel + inclusive scan + scatter_kernel: the segments: seg[s] (first sorted slot
//      of segment s), rows[s], and U = the number of touched rows (left on the device).
//   5. Segments are cut into parts of at most kPartLen lookups (a hot row of a Zipf batch can
//      have tens of thousands): parts_count_kernel + exclusive scan + seg_of_part_kernel.
//
// Row operation (run_row_op), one warp per part:
//   - a segment of one part: the warp sums its lookups' contributions (position order) into
//     registers, lanes over columns, kChunk columns at a time, and applies the operation;
//   - a longer segment: every part writes its partial sum to a scratch slot; then
//     row_final_kernel (one warp per such segment) adds the parts in part order and applies.
//   The operation (Op) sees a column chunk of the summed gradient in registers: it may add
//   weight decay (prepare), needs a whole-row reduction or not (row_norm, row_update: the
//   row-wise Adagrad), and writes the result (apply).
#pragma once

#include "cuda/validate_cuda.cuh"

#include <cub/cub.cuh>

#include <climits>

namespace pme::cuda {
namespace {

constexpr int kPartLen = 32;          // lookups per part (one per lane for the metadata loads)
constexpr int kVPL = 4;               // gradient columns per lane per chunk
constexpr int kChunk = kWarp * kVPL;  // columns per chunk: rows up to 128 wide take one pass

// Device view of the grouping (plain pointers; passed to kernels by value).
struct RowGroupsDev {
  int64_t N;                    // lookups
  const int32_t* bag_of;        // [N] bag of every position (-1 after the last bag); nullptr: implicit bags
  const int32_t* count;         // [B] lookups each bag counts in its mean (mode mean), or nullptr
  const int32_t* pos;           // [N] positions sorted by row; the first seg[U] are the contributing ones
  const int32_t* seg;           // [U + 1] segment starts into pos
  const int64_t* rows;          // [U] row of each segment
  const int32_t* num_segments;  // device scalar U
  const uint64_t* part_scan;    // [U + 1] exclusive scan: low 32 bits first part, high 32 bits first slot
  const int32_t* seg_of_part;   // [P] segment of each part
  const int32_t* num_parts;     // device scalar P
};

// Host side: the device view plus its scratch memory and the host's upper bounds.
struct RowGroups {
  RowGroupsDev d{};
  int64_t max_segments = 0;  // >= U
  int64_t max_parts = 0;     // >= P
  int64_t max_slots = 0;     // >= partial-sum slots (parts of multi-part segments)
  Workspace ws;
};

// ------------------------------------------------------------------------------------------
// Grouping kernels
// ------------------------------------------------------------------------------------------
// count (mode mean only, else nullptr) must equal the forward's divisor: a lookup the forward
// skips (padding, or a bad lookup that validation did not stop: PME_CUDA_VALIDATE=0 or a CUDA
// graph capture) is not counted, else the gradient would not be the forward's derivative.
template <class I>
__global__ void __launch_bounds__(256)
    bag_kernel(const I* idx, int64_t N, const I* bo, int64_t B, int64_t pad, Table t, int32_t* bag_of, int32_t* count) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; b < B; b += nwarps) {
    int64_t s, e;
    bag_range(bo, b, N, s, e);
    int c = 0;
    for (int64_t j = s + lane; j < e; j += kWarp) {
      bag_of[j] = static_cast<int32_t>(b);
      if (count != nullptr) {
        const int64_t r = static_cast<int64_t>(idx[j]);
        int64_t lo, size, col;
        c += r != pad && lookup_row(t, r, lo, size, col);
      }
    }
    c = warp_sum(c);
    if (lane == 0 && count != nullptr) count[b] = c;
  }
}

template <class I, class K>
__global__ void key_kernel(const I* idx, int64_t N, const int32_t* bag_of, int64_t pad, Table t, K* keys,
                           int32_t* vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N; j += stride) {
    const int64_t r = static_cast<int64_t>(idx[j]);
    int64_t lo, size, col;
    const bool use = (bag_of == nullptr || bag_of[j] >= 0) && r != pad && lookup_row(t, r, lo, size, col);
    keys[j] = static_cast<K>(use ? r : t.V);
    vals[j] = static_cast<int32_t>(j);
  }
}

template <class K>
__global__ void head_kernel(const K* keys, int64_t N, K sentinel, int32_t* flags) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < N; k += stride) {
    const K key = keys[k];
    flags[k] = key < sentinel && (k == 0 || keys[k - 1] != key);
  }
}

template <class K>
__global__ void scatter_kernel(const K* keys, int64_t N, K sentinel, const int32_t* flags, const int32_t* scan,
                               int32_t* seg, int64_t* rows, int32_t* num_segments) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < N; k += stride) {
    const K key = keys[k];
    if (flags[k]) {
      seg[scan[k] - 1] = static_cast<int32_t>(k);
      rows[scan[k] - 1] = static_cast<int64_t>(key);
    }
    if (key < sentinel && (k == N - 1 || keys[k + 1] >= sentinel)) {  // end of the last segment
      seg[scan[k]] = static_cast<int32_t>(k + 1);
      *num_segments = scan[k];
    }
    if (k == 0 && key >= sentinel) {  // no contributing lookup at all
      seg[0] = 0;
      *num_segments = 0;
    }
  }
}

// packed[s] = parts of segment s (low 32 bits) | partial slots it needs (high 32 bits: its part
// count when it has more than one part, else 0); 0 for s >= U. n = N + 1 entries.
__global__ void parts_count_kernel(const int32_t* seg, const int32_t* num_segments, int64_t n, uint64_t* packed) {
  const int64_t U = *num_segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n; s += stride) {
    uint64_t v = 0;
    if (s < U) {
      const uint64_t np =
          static_cast<uint64_t>((static_cast<int64_t>(seg[s + 1]) - seg[s] + kPartLen - 1) / kPartLen);  // 64-bit sum
      v = np | ((np > 1 ? np : 0) << 32);
    }
    packed[s] = v;
  }
}

__global__ void seg_of_part_kernel(const uint64_t* part_scan, const int32_t* num_segments, int32_t* seg_of_part,
                                   int32_t* num_parts) {
  const int64_t U = *num_segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid == 0) *num_parts = static_cast<int32_t>(static_cast<uint32_t>(part_scan[U]));
  for (int64_t s = tid; s < U; s += stride) {
    const uint32_t first = static_cast<uint32_t>(part_scan[s]);
    const uint32_t end = static_cast<uint32_t>(part_scan[s + 1]);
    for (uint32_t p = first; p < end; ++p) seg_of_part[p] = static_cast<int32_t>(s);
  }
}

// ------------------------------------------------------------------------------------------
// Grouping, host side
// ------------------------------------------------------------------------------------------
template <class I, class K>
RowGroups group_by_row_k(const Ctx& ctx, const Tensor& like, const I* idx, int64_t N, const I* bo, int64_t B,
                         int64_t pad, const Table& t, bool need_count) {
  RowGroups g;
  g.d.N = N;
  g.max_segments = std::min(N, t.V);
  g.max_parts = N + N / kPartLen + 1;
  g.max_slots = 2 * (N / kPartLen) + 2;
  const int n = static_cast<int>(N);
  const K sentinel = static_cast<K>(t.V);
  int end_bit = 1;
  while (end_bit < static_cast<int>(sizeof(K) * 8) && (static_cast<uint64_t>(t.V) >> end_bit) != 0) ++end_bit;

  // Scratch sizes of the three CUB calls (queried without touching memory).
  cub::DoubleBuffer<K> dkeys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> dvals(nullptr, nullptr);
  size_t sort_bytes = 0, scan_bytes = 0, pscan_bytes = 0;
  PME_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, dkeys, dvals, n, 0, end_bit, ctx.stream));
  PME_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), n, ctx.stream));
  PME_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, pscan_bytes, static_cast<const uint64_t*>(nullptr),
                                               static_cast<uint64_t*>(nullptr), n + 1, ctx.stream));
  const size_t temp_bytes = std::max({sort_bytes, scan_bytes, pscan_bytes, size_t{1}});

  Workspace& ws = g.ws;
  const int s_bag = ws.reserve<int32_t>(bo ? N : 0);
  const int s_count = ws.reserve<int32_t>(bo && need_count ? B : 0);
  const int s_ka = ws.reserve<K>(N), s_kb = ws.reserve<K>(N);
  const int s_va = ws.reserve<int32_t>(N), s_vb = ws.reserve<int32_t>(N);
  const int s_flags = ws.reserve<int32_t>(N), s_scan = ws.reserve<int32_t>(N);
  const int s_seg = ws.reserve<int32_t>(N + 1);
  const int s_rows = ws.reserve<int64_t>(N);
  const int s_nseg = ws.reserve<int32_t>(1);
  const int s_packed = ws.reserve<uint64_t>(N + 1), s_pscan = ws.reserve<uint64_t>(N + 1);
  const int s_sop = ws.reserve<int32_t>(g.max_parts);
  const int s_nparts = ws.reserve<int32_t>(1);
  const int s_temp = ws.reserve_bytes(temp_bytes);
  ws.allocate(like);

  int32_t* bag_of = bo ? ws.get<int32_t>(s_bag) : nullptr;
  int32_t* count = bo && need_count ? ws.get<int32_t>(s_count) : nullptr;
  int32_t* seg = ws.get<int32_t>(s_seg);
  int32_t* nseg = ws.get<int32_t>(s_nseg);
  int32_t* nparts = ws.get<int32_t>(s_nparts);
  void* temp = ws.get<void>(s_temp);
  const cudaStream_t st = ctx.stream;

  // 1. Bags.
  if (bo != nullptr) {
    PME_CUDA_CHECK(cudaMemsetAsync(bag_of, 0xff, sizeof(int32_t) * N, st));  // -1: after the last bag
    if (B > 0) {
      bag_kernel<I><<<ctx.grid(B * kWarp, 256), 256, 0, st>>>(idx, N, bo, B, pad, t, bag_of, count);
      PME_CUDA_LAUNCH_CHECK();
    }
  }
  // 2. Keys.
  K* ka = ws.get<K>(s_ka);
  int32_t* va = ws.get<int32_t>(s_va);
  key_kernel<I, K><<<ctx.grid(N, 256), 256, 0, st>>>(idx, N, bag_of, pad, t, ka, va);
  PME_CUDA_LAUNCH_CHECK();
  // 3. Sort.
  dkeys = cub::DoubleBuffer<K>(ka, ws.get<K>(s_kb));
  dvals = cub::DoubleBuffer<int32_t>(va, ws.get<int32_t>(s_vb));
  size_t bytes = temp_bytes;
  PME_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes, dkeys, dvals, n, 0, end_bit, st));
  const K* keys = dkeys.Current();
  // 4. Segments.
  int32_t* flags = ws.get<int32_t>(s_flags);
  int32_t* scan = ws.get<int32_t>(s_scan);
  head_kernel<K><<<ctx.grid(N, 256), 256, 0, st>>>(keys, N, sentinel, flags);
  PME_CUDA_LAUNCH_CHECK();
  bytes = temp_bytes;
  PME_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp, bytes, static_cast<const int32_t*>(flags), scan, n, st));
  scatter_kernel<K>
      <<<ctx.grid(N, 256), 256, 0, st>>>(keys, N, sentinel, flags, scan, seg, ws.get<int64_t>(s_rows), nseg);
  PME_CUDA_LAUNCH_CHECK();
  // 5. Parts.
  uint64_t* packed = ws.get<uint64_t>(s_packed);
  uint64_t* pscan = ws.get<uint64_t>(s_pscan);
  parts_count_kernel<<<ctx.grid(N + 1, 256), 256, 0, st>>>(seg, nseg, N + 1, packed);
  PME_CUDA_LAUNCH_CHECK();
  bytes = temp_bytes;
  PME_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, bytes, static_cast<const uint64_t*>(packed), pscan, n + 1, st));
  int32_t* sop = ws.get<int32_t>(s_sop);
  seg_of_part_kernel<<<ctx.grid(g.max_segments + 1, 256), 256, 0, st>>>(pscan, nseg, sop, nparts);
  PME_CUDA_LAUNCH_CHECK();

  g.d.bag_of = bag_of;
  g.d.count = count;
  g.d.pos = dvals.Current();
  g.d.seg = seg;
  g.d.rows = ws.get<int64_t>(s_rows);
  g.d.num_segments = nseg;
  g.d.part_scan = pscan;
  g.d.seg_of_part = sop;
  g.d.num_parts = nparts;
  return g;
}

// Groups the lookups of a batch by row (bo == nullptr: implicit bags, bag j = lookup j).
// need_count: also count the lookups of each bag that its mean divides by (mode mean).
template <class I>
RowGroups group_by_row(const Ctx& ctx, const Tensor& like, const I* idx, int64_t N, const I* bo, int64_t B, int64_t pad,
                       const Table& t, bool need_count) {
  PME_CHECK(N < INT32_MAX, "the CUDA backward handles at most 2^31 - 2 lookups per call, got ", N,
            " (split the batch)");
  PME_CHECK(B < INT32_MAX, "the CUDA backward handles at most 2^31 - 2 bags per call, got ", B);
  if (N == 0) {
    RowGroups g;
    g.d.N = 0;
    return g;
  }
  if (t.V < static_cast<int64_t>(UINT32_MAX)) {
    return group_by_row_k<I, uint32_t>(ctx, like, idx, N, bo, B, pad, t, need_count);
  }
  return group_by_row_k<I, uint64_t>(ctx, like, idx, N, bo, B, pad, t, need_count);
}

// ------------------------------------------------------------------------------------------
// Row operation
// ------------------------------------------------------------------------------------------
// Default hooks of a row operation that needs no per-row norm and no preparation (the
// gradient write and the score accumulation); an operation derives from it and adds apply().
template <class A>
struct PlainRowOp {
  __device__ __forceinline__ bool row_norm() const { return false; }
  __device__ __forceinline__ void prepare(int64_t, int64_t, int64_t, A (&)[kVPL], int) const {}
  __device__ __forceinline__ A row_update(int64_t, A, int64_t, int) const { return A(0); }
};

// Where a row's gradient comes from: the lookup's output gradient.
template <class T>
struct GradSrc {
  using value_type = T;
  const T* grad_out;  // [B, W]
  int64_t W;
  const T* psw;           // [N] or nullptr
  const int64_t* argmax;  // [B, W] (mode max) or nullptr
  Table table;
  int64_t mode;
  const acc_t<T>* bag_scale = nullptr;  // [B] factor per bag (a collection's mean: 1 / count), or nullptr
};

// Calls f(i, c) for each of the lane's columns c = c0 + lane + 32 * i (i < kVPL) of a column
// chunk that lies inside the row (c < size).
template <class F>
__device__ __forceinline__ void for_chunk(int64_t c0, int64_t size, int lane, const F& f) {
#pragma unroll
  for (int i = 0; i < kVPL; ++i) {
    const int64_t c = c0 + lane + kWarp * i;
    if (c < size) f(i, c);
  }
}

template <class A>
__device__ __forceinline__ void zero_chunk(A (&gv)[kVPL]) {
#pragma unroll
  for (int i = 0; i < kVPL; ++i) gv[i] = 0;
}

// Gradient of one part's row, column chunk c0, from the part's lookups: lane u holds lookup
// u's position j, bag b and scale sc (loaded in parallel); the warp walks them in position
// order, lanes over columns c0 + lane + 32 * i.
template <class T>
struct PartGrad {
  using A = acc_t<T>;
  const T* grad_out;
  const int64_t* argmax;
  int64_t W, col, size;
  int32_t j, b;
  A sc;
  int len, lane;
  bool max_mode;

  __device__ __forceinline__ void operator()(int64_t c0, A (&gv)[kVPL]) const {
    zero_chunk(gv);
#pragma unroll 4
    for (int u = 0; u < len; ++u) {
      const int32_t ju = __shfl_sync(kFullMask, j, u);
      const int64_t bu = __shfl_sync(kFullMask, b, u);
      const A su = __shfl_sync(kFullMask, sc, u);
      const T* go = grad_out + bu * W + col;
      if (max_mode) {
        const int64_t* am = argmax + bu * W + col;
        for_chunk(c0, size, lane, [&](int i, int64_t c) {
          const A x = to_acc(go[c]);
          if (am[c] == ju) gv[i] += x;
        });
      } else {
        for_chunk(c0, size, lane, [&](int i, int64_t c) { gv[i] += su * to_acc(go[c]); });
      }
    }
  }
};

// Gradient of a multi-part row, column chunk c0: its parts' partial sums added in part order.
template <class A>
struct PartialSum {
  const A* base;  // first partial of the row; part q at base + q * W
  int64_t W, np, size;
  int lane;

  __device__ __forceinline__ void operator()(int64_t c0, A (&gv)[kVPL]) const {
    zero_chunk(gv);
#pragma unroll 4
    for (int64_t q = 0; q < np; ++q) {
      for_chunk(c0, size, lane, [&](int i, int64_t c) { gv[i] += base[q * W + c]; });
    }
  }
};

// Runs op on row r (entries [lo, lo + size)) given grad_chunk(c0, g), which fills g[i] with the
// summed gradient of column c0 + lane + 32 * i (0 past the row's end). One warp.
template <class A, class Op, class F>
__device__ __forceinline__ void apply_row(const Op& op, const F& grad_chunk, int64_t r, int64_t lo, int64_t size,
                                          int lane) {
  A g[kVPL];
  if (!op.row_norm()) {
    for (int64_t c0 = 0; c0 < size; c0 += kChunk) {
      grad_chunk(c0, g);
      op.prepare(lo, c0, size, g, lane);
      op.apply(r, lo, c0, size, g, A(0), lane);
    }
    return;
  }
  // Row-wise normalisation (Adagrad): the sum of squares of the whole row first. Rows wider
  // than one chunk recompute their gradient in a second pass (cheap, and in the same order).
  A sq = 0;
  for (int64_t c0 = 0; c0 < size; c0 += kChunk) {
    grad_chunk(c0, g);
    op.prepare(lo, c0, size, g, lane);
#pragma unroll
    for (int i = 0; i < kVPL; ++i) sq += g[i] * g[i];  // g is 0 past the row's end
  }
  sq = __shfl_sync(kFullMask, warp_sum(sq), 0);
  const A denom = op.row_update(r, sq, size, lane);
  if (size <= kChunk) {
    op.apply(r, lo, 0, size, g, denom, lane);
    return;
  }
  for (int64_t c0 = 0; c0 < size; c0 += kChunk) {
    grad_chunk(c0, g);
    op.prepare(lo, c0, size, g, lane);
    op.apply(r, lo, c0, size, g, denom, lane);
  }
}

// Grid-stride loop over warps: f(i, lane) for every i in [0, n), one warp each.
template <class F>
__device__ __forceinline__ void for_each_warp(int64_t n, const F& f) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; i < n; i += nwarps) f(i, lane);
}

// One warp per part (see the file comment).
template <class T, class Op>
__global__ void __launch_bounds__(256) row_parts_kernel(GradSrc<T> src, RowGroupsDev g, acc_t<T>* partial, Op op) {
  using A = acc_t<T>;
  const int64_t W = src.W;
  for_each_warp(*g.num_parts, [&](int64_t p, int lane) {
    const int s = g.seg_of_part[p];
    const uint64_t sc0 = g.part_scan[s], sc1 = g.part_scan[s + 1];
    const int64_t first = static_cast<uint32_t>(sc0);
    const int64_t np = static_cast<int64_t>(static_cast<uint32_t>(sc1)) - first;
    const int64_t q = p - first;
    const int64_t r = g.rows[s];
    const int64_t lo = src.table.off[r];
    const int64_t size = src.table.off[r + 1] - lo;
    if (size <= 0) return;
    const int64_t col = src.table.cos ? src.table.cos[size] : 0;
    const int64_t k0 = g.seg[s] + q * kPartLen;
    const int len = static_cast<int>(min(static_cast<int64_t>(g.seg[s + 1]), k0 + kPartLen) - k0);

    // Lane u holds lookup u of the part: its position, bag and scale (loaded in parallel).
    int32_t j = 0, b = 0;
    A sc = 0;
    if (lane < len) {
      j = g.pos[k0 + lane];
      b = g.bag_of ? g.bag_of[j] : j;
      if (src.mode != kMax) {
        sc = src.psw ? to_acc(src.psw[j]) : A(1);
        // Mean (never with per-sample weights): 1 / count, correctly rounded like the CPU's
        // 1 / count division (a reciprocal instead of the division's slow-path call).
        if (src.mode == kMean) sc = recip_rn(static_cast<A>(g.count[b]));
        if (src.bag_scale != nullptr) sc *= src.bag_scale[b];  // exact for 1 (sum), 1 / count for mean
      }
    }
    const PartGrad<T> grad_chunk{src.grad_out, src.argmax, W, col, size, j, b, sc, len, lane, src.mode == kMax};
    if (np == 1) {
      apply_row<A>(op, grad_chunk, r, lo, size, lane);
    } else {
      A* dst = partial + (static_cast<int64_t>(sc0 >> 32) + q) * W;
      A gv[kVPL];
      for (int64_t c0 = 0; c0 < size; c0 += kChunk) {
        grad_chunk(c0, gv);
        for_chunk(c0, size, lane, [&](int i, int64_t c) { dst[c] = gv[i]; });
      }
    }
  });
}

// One warp per segment of more than one part: adds the parts' partial sums in part order.
template <class T, class Op>
__global__ void __launch_bounds__(256)
    row_final_kernel(GradSrc<T> src, RowGroupsDev g, const acc_t<T>* partial, Op op) {
  using A = acc_t<T>;
  for_each_warp(*g.num_segments, [&](int64_t s, int lane) {
    const uint64_t sc0 = g.part_scan[s], sc1 = g.part_scan[s + 1];
    const int64_t np = static_cast<int64_t>(static_cast<uint32_t>(sc1)) - static_cast<uint32_t>(sc0);
    if (np <= 1) return;
    const int64_t r = g.rows[s];
    const int64_t lo = src.table.off[r];
    const int64_t size = src.table.off[r + 1] - lo;
    if (size <= 0) return;
    const A* base = partial + static_cast<int64_t>(sc0 >> 32) * src.W;
    const PartialSum<A> grad_chunk{base, src.W, np, size, lane};
    apply_row<A>(op, grad_chunk, r, lo, size, lane);
  });
}

// Runs op once on every row the batch touches, with the row's summed gradient.
template <class T, class Op>
void run_row_op(const Ctx& ctx, const Tensor& like, const RowGroups& g, const GradSrc<T>& src, const Op& op) {
  using A = acc_t<T>;
  if (g.d.N == 0 || g.max_segments == 0) return;
  Tensor partial =
      torch::stable::new_empty(like, {static_cast<int64_t>(g.max_slots * src.W * sizeof(A))}, ScalarType::Byte);
  A* part = static_cast<A*>(partial.mutable_data_ptr());
  row_parts_kernel<T, Op><<<ctx.grid(g.max_parts * kWarp, 256), 256, 0, ctx.stream>>>(src, g.d, part, op);
  PME_CUDA_LAUNCH_CHECK();
  row_final_kernel<T, Op><<<ctx.grid(g.max_segments * kWarp, 256), 256, 0, ctx.stream>>>(src, g.d, part, op);
  PME_CUDA_LAUNCH_CHECK();
}

// The set-up every backward-shaped operator of one table shares: checks the arguments
// (lookup arguments, grad_out, argmax), validates the batch (validate_cuda.cuh), groups it by
// row, then calls f(ctx, groups, src, idx) with src a GradSrc<T> in the weight's type and idx
// the indices (I*). bag_offsets absent: the non-pooled lookup (bag b is lookup b).
template <class F>
void with_grouped_batch(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                        const std::optional<Tensor>& bag_offsets, const std::optional<Tensor>& per_sample_weights,
                        const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode,
                        int64_t padding_idx, bool table_checked, F&& f) {
  const LookupArgs la =
      check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, mode, padding_idx);
  const int64_t W = check_grad_args(grad_out, weight, argmax, la, mode);
  const Tensor go = torch::stable::contiguous(grad_out);
  const Tensor am = mode == kMax ? torch::stable::contiguous(argmax) : argmax;
  const Ctx ctx(weight);
  const Table tab = make_table(weight, offsets, col_of_size, W);
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_lookups(ctx, offsets, idx, la.num_lookups, bo, la.num_bags, tab, table_checked);
    const RowGroups groups =
        group_by_row(ctx, offsets, idx, la.num_lookups, bo, la.num_bags, padding_idx, tab, mode == kMean);
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const GradSrc<T> src{go.const_data_ptr<T>(),
                           W,
                           per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
                           mode == kMax ? am.const_data_ptr<int64_t>() : nullptr,
                           tab,
                           mode};
      f(ctx, groups, src, idx);
    });
  });
}

}  // namespace
}  // namespace pme::cuda
