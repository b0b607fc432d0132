// CUDA lookup operators: pooled (bag_forward / bag_backward) and non-pooled
// (embedding_forward / embedding_backward) over a flat multi-size table. Same semantics as
// csrc/cpu/lookup_cpu.cpp.
//
// Forward: a group of G threads (4, 8, 16 or 32 lanes of a warp) per bag. Lane t owns the
// 16-byte output units t, t + G, ..., t + (NV - 1) G of the output row (a unit is VEC = 16 /
// sizeof(T) consecutive columns), accumulating in registers (fp32, fp64 for fp64). The bag's
// lookups are taken G at a time: lane t loads the index, the row's offsets, its output column
// and its per-sample weight (one batch of independent loads), then the group walks the batch
// UNR lookups at a time, broadcasting each lookup's metadata by shuffles and issuing all UNR
// row loads before using them. A row is loaded with 16-byte vector loads when its start, size
// and output column are multiples of VEC (checked per row, at run time) and element by element
// otherwise. Each output row is written once (vector stores when the width allows).
// Backward: row_groups_cuda.cuh (sort by row, one warp per row or part; deterministic).
#include "cuda/row_groups_cuda.cuh"
#include "cuda/row_ops_cuda.cuh"
#include "lookup_ops.h"

#include <tuple>
#include <type_traits>

namespace pme::cuda {
namespace {

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <class T, class I>
struct FwdArgs {
  const T* w;    // [total]
  Table t;       // t.W is the output width
  const I* idx;  // [N]
  int64_t N;
  const I* bo;  // [B + 1] or nullptr (implicit bags)
  int64_t B;
  const T* psw;  // [N] or nullptr
  int64_t pad;   // -1: none
  bool mean;
  bool vec_ok;      // weight's data pointer is 16-byte aligned
  T* out;           // [B, W]
  int64_t* argmax;  // [B, W] (max) or nullptr
};

// Loads the lane's output unit starting at column c (VEC columns) from a row of `size`
// entries placed at output column `col`: zeros where the row has no entry. Returns the mask of
// the unit's columns the row has. aligned: row start, size and col are multiples of VEC, so the
// unit is wholly inside the row or wholly outside and one 16-byte load does.
template <class T>
__device__ __forceinline__ unsigned load_unit(const T* row, int size, int col, bool aligned, int c, Pack<T>& out) {
  constexpr int VEC = Pack<T>::N;
  const int rel = c - col;  // row entry of the unit's first column
  if (aligned) {
    const bool in = rel >= 0 && rel < size;
    if (in) {
      out = load_pack(row + rel);
    } else {
      zero_pack(out);
    }
    return in ? (1u << VEC) - 1u : 0u;
  }
  unsigned mk = 0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const bool in = rel + e >= 0 && rel + e < size;
    out.v[e] = in ? row[rel + e] : zero_value<T>();
    mk |= static_cast<unsigned>(in) << e;
  }
  return mk;
}

// The metadata of row r as lane t keeps it for its group: first entry lo, size, output column
// col; size stays -1 (a lookup to skip) when the lookup is bad (lookup_row).
__device__ __forceinline__ void lookup_meta(const Table& t, int64_t r, int64_t& lo, int32_t& size, int32_t& col) {
  int64_t lo_, size_, col_;
  if (lookup_row(t, r, lo_, size_, col_)) {
    lo = lo_;
    size = static_cast<int32_t>(size_);
    col = static_cast<int32_t>(col_);
  }
}

// Load phase of both forward kernels: the rows of the group's lookups i, ..., i + UNR - 1 (of
// m; lookup i + u's metadata is held by lane (i + u) mod G), every row load issued before any
// is used. raw[u][v] is the lane's output unit v (columns cbase + v * G * VEC, ...) of lookup
// i + u's row, 0 where the row has none; msk[u][v] says which of its columns the row has (none
// for a lookup to skip or past m).
template <class T, int G, int NV, int UNR>
__device__ __forceinline__ void load_rows(const T* w, bool vec_ok, unsigned gmask, int64_t lo, int32_t size,
                                          int32_t col, int i, int m, int cbase, Pack<T> (&raw)[UNR][NV],
                                          unsigned (&msk)[UNR][NV]) {
  constexpr int VEC = Pack<T>::N;
#pragma unroll
  for (int u = 0; u < UNR; ++u) {
    const int src = (i + u) & (G - 1);
    const int64_t ulo = __shfl_sync(gmask, lo, src, G);
    int32_t usz = __shfl_sync(gmask, size, src, G);
    const int32_t ucol = __shfl_sync(gmask, col, src, G);
    if (i + u >= m) usz = -1;  // past the group's lookups: load nothing
    const bool aligned = vec_ok && usz >= 0 && ((ulo | usz | ucol) & (VEC - 1)) == 0;
#pragma unroll
    for (int v = 0; v < NV; ++v) msk[u][v] = load_unit(w + ulo, usz, ucol, aligned, cbase + v * G * VEC, raw[u][v]);
  }
}

// G threads per bag, NV 16-byte units per thread, MAX: max pooling (else sum / mean).
// Column arithmetic is 32-bit (the host checks the width); buffer addressing is 64-bit.
// Occupancy floor for the common configurations (3 blocks of 256 threads per SM, <= 80
// registers: no spills on sm_90 for fp32/fp16/bf16 sum/mean up to NV = 2); the wide, max and
// fp64 variants are left free (they would spill).
template <class T, int NV, bool MAX>
constexpr int fwd_min_blocks() {
  return (MAX || NV >= 4 || sizeof(T) == 8) ? 1 : 3;
}

template <class T, class I, int G, int NV, bool MAX>
__global__ void __launch_bounds__(256, (fwd_min_blocks<T, NV, MAX>())) bag_forward_kernel(const FwdArgs<T, I> a) {
  using A = acc_t<T>;
  constexpr int VEC = Pack<T>::N;
  // Lookups whose row loads are in flight together (tuning knob: registers vs. parallelism):
  // 8 x 16 bytes per lane for 4- and 8-byte types, 4 for 2-byte types (their accumulators take
  // twice the registers), halved for max (argmax and counts in registers), divided by NV.
  constexpr int UNR_BASE = (sizeof(T) >= 4 ? 8 : 4) / (MAX ? 2 : 1) / NV;
  constexpr int UNR = UNR_BASE < 1 ? 1 : (UNR_BASE > G ? G : UNR_BASE);
  const int lane = threadIdx.x & 31;
  const int t = lane & (G - 1);
  const unsigned gmask = G == 32 ? kFullMask : (((1u << G) - 1u) << (lane & ~(G - 1)));
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (b >= a.B) return;  // the whole group leaves together
  const int W = static_cast<int>(a.t.W);
  // Output columns of this lane: unit v covers [cbase + v * G * VEC, + VEC).
  const int cbase = static_cast<int>(blockIdx.y) * (G * NV * VEC) + t * VEC;

  A acc[NV][VEC];
  int64_t am[MAX ? NV : 1][MAX ? VEC : 1];
#pragma unroll
  for (int v = 0; v < NV; ++v) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc[v][e] = A(0);
      if constexpr (MAX) am[v][e] = -1;
    }
  }

  int64_t start, end;
  bag_range(a.bo, b, a.N, start, end);
  int64_t n = 0;  // lookups that count (not padding, not skipped): int64, a bag may hold 2^31 or more
  int seen = 0;   // max: whether a counted lookup has set the columns yet
  for (int64_t base = start; base < end; base += G) {
    const int m = static_cast<int>(min(static_cast<int64_t>(G), end - base));
    // Metadata of lookup base + t, loaded by lane t; size -1 marks a lookup to skip.
    int64_t lo = 0;
    int32_t size = -1, col = 0;
    A scale = A(1);
    if (t < m) {
      const int64_t j = base + t;
      const int64_t r = static_cast<int64_t>(a.idx[j]);
      if (r != a.pad) lookup_meta(a.t, r, lo, size, col);
      if (a.psw != nullptr) scale = to_acc(a.psw[j]);
    }
    n += __popc(__ballot_sync(gmask, size >= 0) & gmask);

    for (int i = 0; i < m; i += UNR) {
      // Load phase: every row load of the UNR lookups is issued before any is used. raw holds
      // the lane's columns of the row (0 where the row has none), msk which of them it has.
      Pack<T> raw[UNR][NV];
      unsigned msk[UNR][NV];
      load_rows<T, G, NV, UNR>(a.w, a.vec_ok, gmask, lo, size, col, i, m, cbase, raw, msk);
      A usc[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u) usc[u] = __shfl_sync(gmask, scale, (i + u) & (G - 1), G);
      // Accumulate phase, in position order.
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        if constexpr (MAX) {
          // As nn.EmbeddingBag on the dense view (CPU): the bag's first counted lookup sets every
          // column (a column it does not store is an implicit zero that passes gradient to no
          // entry); a later lookup's column replaces the current one only when strictly greater.
          // So ties go to the earlier lookup, a NaN set first stays, a NaN later is never taken.
          const bool counted = i + u < m && __shfl_sync(gmask, size, (i + u) & (G - 1), G) >= 0;
          if (!counted) continue;  // uniform over the group
#pragma unroll
          for (int v = 0; v < NV; ++v) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const bool stored = (msk[u][v] >> e) & 1u;
              const A x = stored ? to_acc(raw[u][v].v[e]) : A(0);
              if (seen == 0 || x > acc[v][e]) {
                acc[v][e] = x;
                am[v][e] = stored ? base + i + u : -1;
              }
            }
          }
          seen = 1;
        } else {
#pragma unroll
          for (int v = 0; v < NV; ++v) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (!((msk[u][v] >> e) & 1u)) continue;
              const A x = to_acc(raw[u][v].v[e]);
              acc[v][e] = a.psw != nullptr ? acc[v][e] + usc[u] * x : acc[v][e] + x;
            }
          }
        }
      }
    }
  }

  // Finish and store the output row (and argmax).
  T* o = a.out + b * W;
  const bool vec_store = (W % VEC) == 0;
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int c0 = cbase + v * G * VEC;
    if (c0 >= W) continue;
    Pack<T> y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      A r = acc[v][e];
      if constexpr (!MAX) {  // (max: an empty bag keeps the zeros and argmax -1 it started with)
        if (a.mean && n > 0) r = r / static_cast<A>(n);
      }
      y.v[e] = from_acc<T>(r);
    }
    if (vec_store) {
      store_pack(o + c0, y);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (c0 + e < W) o[c0 + e] = y.v[e];
      }
    }
    if constexpr (MAX) {
      int64_t* amo = a.argmax + b * W;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (c0 + e < W) amo[c0 + e] = am[v][e];
      }
    }
  }
}

// Non-pooled lookup: group g copies lookups [g * G, g * G + G) to their output rows. Lane t
// loads lookup t's metadata (one batch of independent loads), then the group copies UNR rows
// at a time: all loads first, then the stores (zeros where a row has no entry).
template <class T, class I, int G, int NV>
__global__ void __launch_bounds__(256) embedding_forward_kernel(const FwdArgs<T, I> a) {
  constexpr int VEC = Pack<T>::N;
  constexpr int UNR_BASE = NV >= 4 ? 1 : 4 / NV;  // rows in flight per lane (tuning knob)
  constexpr int UNR = UNR_BASE > G ? G : UNR_BASE;
  const int lane = threadIdx.x & 31;
  const int t = lane & (G - 1);
  const unsigned gmask = G == 32 ? kFullMask : (((1u << G) - 1u) << (lane & ~(G - 1)));
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G * G;
  if (base >= a.N) return;  // the whole group leaves together
  const int W = static_cast<int>(a.t.W);
  const int cbase = static_cast<int>(blockIdx.y) * (G * NV * VEC) + t * VEC;
  const bool vec_store = (W % VEC) == 0;
  const int m = static_cast<int>(min(static_cast<int64_t>(G), a.N - base));

  int64_t lo = 0;
  int32_t size = -1, col = 0;
  if (t < m) lookup_meta(a.t, static_cast<int64_t>(a.idx[base + t]), lo, size, col);
  for (int i = 0; i < m; i += UNR) {
    Pack<T> raw[UNR][NV];
    unsigned msk[UNR][NV];  // unused: a missing column loads as 0, which is what is stored
    load_rows<T, G, NV, UNR>(a.w, a.vec_ok, gmask, lo, size, col, i, m, cbase, raw, msk);
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      if (i + u >= m) continue;
      T* o = a.out + (base + i + u) * W;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int c0 = cbase + v * G * VEC;
        if (c0 >= W) continue;
        if (vec_store) {
          store_pack(o + c0, raw[u][v]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if (c0 + e < W) o[c0 + e] = raw[u][v].v[e];
          }
        }
      }
    }
  }
}

enum FwdKind { kFwdSumMean, kFwdMax, kFwdEmbedding };

template <class T, class I, int G, int NV, int KIND>
void launch_forward(const Ctx& ctx, const FwdArgs<T, I>& a, int64_t units) {
  constexpr int kThreads = 256;
  const int64_t per_tile = static_cast<int64_t>(G) * NV;
  const int64_t tiles = std::max<int64_t>(1, ceil_div(units, per_tile));
  PME_CHECK(tiles <= 65535 && a.t.W < (int64_t{1} << 30), "output width ", a.t.W, " is too large for the CUDA forward");
  // Bags: one group of G threads each; embedding: one group per G lookups.
  const int64_t groups = KIND == kFwdEmbedding ? ceil_div(a.N, G) : a.B;
  const int64_t blocks = ceil_div(groups * G, kThreads);
  PME_CHECK(blocks < INT32_MAX, "too many bags for one CUDA launch: ", groups);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles));
  if constexpr (KIND == kFwdEmbedding) {
    embedding_forward_kernel<T, I, G, NV><<<grid, kThreads, 0, ctx.stream>>>(a);
  } else {
    bag_forward_kernel<T, I, G, NV, KIND == kFwdMax><<<grid, kThreads, 0, ctx.stream>>>(a);
  }
  PME_CUDA_LAUNCH_CHECK();
}

// Picks the group size and units per thread from the output width, in 16-byte units.
template <class T, class I, int KIND>
void forward_dispatch(const Ctx& ctx, const FwdArgs<T, I>& a) {
  const int64_t units = ceil_div(a.t.W, Pack<T>::N);
  if (units <= 4) {
    launch_forward<T, I, 4, 1, KIND>(ctx, a, units);
  } else if (units <= 8) {
    launch_forward<T, I, 8, 1, KIND>(ctx, a, units);
  } else if (units <= 16) {
    launch_forward<T, I, 16, 1, KIND>(ctx, a, units);
  } else if (units <= 32) {
    launch_forward<T, I, 32, 1, KIND>(ctx, a, units);
  } else if (units <= 64) {
    launch_forward<T, I, 32, 2, KIND>(ctx, a, units);
  } else {
    launch_forward<T, I, 32, 4, KIND>(ctx, a, units);  // wider outputs: column tiles (grid.y)
  }
}

std::tuple<Tensor, Tensor> lookup_forward(const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                                          const std::optional<Tensor>& bag_offsets,
                                          const std::optional<Tensor>& per_sample_weights,
                                          const std::optional<Tensor>& col_of_size, int64_t out_width, int64_t mode,
                                          int64_t padding_idx, bool table_checked) {
  const LookupArgs la =
      check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, mode, padding_idx);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  const Ctx ctx(weight);
  const Table tab = make_table(weight, offsets, col_of_size, out_width);
  Tensor out = new_output(weight, la.num_bags, out_width, "the output [bags, out_width]");
  Tensor argmax =
      new_output(offsets, mode == kMax ? la.num_bags : 0, mode == kMax ? out_width : 0, "argmax [bags, out_width]");
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_lookups(ctx, offsets, idx, la.num_lookups, bo, la.num_bags, tab, table_checked);
    if (la.num_bags == 0 || out_width == 0) return;
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const T* w = weight.const_data_ptr<T>();
      FwdArgs<T, I> a{w,
                      tab,
                      idx,
                      la.num_lookups,
                      bo,
                      la.num_bags,
                      per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
                      padding_idx,
                      mode == kMean,
                      reinterpret_cast<uintptr_t>(w) % 16 == 0,
                      out.mutable_data_ptr<T>(),
                      mode == kMax ? argmax.mutable_data_ptr<int64_t>() : nullptr};
      if (mode == kMax) {
        forward_dispatch<T, I, kFwdMax>(ctx, a);
      } else if (bo == nullptr && padding_idx < 0 && per_sample_weights == std::nullopt) {
        forward_dispatch<T, I, kFwdEmbedding>(ctx, a);  // non-pooled: a copy per lookup
      } else {
        forward_dispatch<T, I, kFwdSumMean>(ctx, a);
      }
    });
  });
  return {out, argmax};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
// grad_psw[j] = <row of lookup j, grad_out[bag of j] slice>, one warp per lookup, lanes over
// columns, fixed-order reduction. 0 for padding, lookups after the last bag and skipped ones.
template <class T, class I>
__global__ void __launch_bounds__(256)
    psw_grad_kernel(const T* w, Table t, const I* idx, int64_t N, const int32_t* bag_of, int64_t pad, const T* grad_out,
                    T* grad_psw) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; j < N; j += nwarps) {
    const int64_t r = static_cast<int64_t>(idx[j]);
    const int64_t b = bag_of ? bag_of[j] : j;
    int64_t lo = 0, size = 0, col = 0;
    A dot = 0;
    if (b >= 0 && r != pad && lookup_row(t, r, lo, size, col)) {
      const T* row = w + lo;
      const T* g = grad_out + b * t.W + col;
      for (int64_t c = lane; c < size; c += kWarp) dot += to_acc(row[c]) * to_acc(g[c]);
      dot = warp_sum(dot);
    }
    if (lane == 0) grad_psw[j] = from_acc<T>(dot);
  }
}

std::tuple<Tensor, Tensor> lookup_backward(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets,
                                           const Tensor& indices, const std::optional<Tensor>& bag_offsets,
                                           const std::optional<Tensor>& per_sample_weights,
                                           const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode,
                                           int64_t padding_idx, bool psw_grad, bool table_checked) {
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  const int64_t N = indices.numel();
  Tensor grad_w = torch::stable::new_empty(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_empty(weight, {psw_grad ? N : 0});
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked,
                     [&](const Ctx& ctx, const RowGroups& groups, const auto& src, const auto* idx) {
                       using T = typename std::decay_t<decltype(src)>::value_type;
                       using I = std::decay_t<decltype(*idx)>;
                       // Untouched rows get zeros: one plain memset (bit pattern 0 is +0 in every float type).
                       if (weight.numel() > 0) {
                         PME_CUDA_CHECK(cudaMemsetAsync(grad_w.mutable_data_ptr(), 0,
                                                        weight.numel() * weight.element_size(), ctx.stream));
                       }
                       run_row_op<T>(ctx, offsets, groups, src, GradWriteOp<T>{{}, grad_w.mutable_data_ptr<T>()});
                       if (psw_grad && N > 0) {
                         psw_grad_kernel<T, I><<<ctx.grid(N * kWarp, 256), 256, 0, ctx.stream>>>(
                             weight.const_data_ptr<T>(), src.table, idx, N, groups.d.bag_of, padding_idx, src.grad_out,
                             grad_psw.mutable_data_ptr<T>());
                         PME_CUDA_LAUNCH_CHECK();
                       }
                     });
  return {grad_w, grad_psw};
}

using Ops = LookupOps<&lookup_forward, &lookup_backward>;

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  PME_REGISTER_LOOKUPS(m, Ops);
}

}  // namespace pme::cuda
