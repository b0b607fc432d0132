// CUDA twin of csrc/cpu/sparse_grad_cpu.cpp: the lookup's backward as a sparse gradient of the
// flat buffer (sparse=True). The batch is grouped by row (row_groups_cuda.cuh: rows increasing),
// an exclusive scan of the touched rows' sizes gives where each row's entries go, and one warp
// per row writes its summed gradient there (no atomics: deterministic). The number of entries
// depends on the data, so it is read back to the host once (one synchronisation per call, as
// torch's own sparse backward does).
#include "cuda/row_groups_cuda.cuh"

#include <tuple>
#include <type_traits>

namespace pme::cuda {
namespace {

// sizes[s] = stored entries of the row of segment s (0 for s >= U), s in [0, n).
__global__ void segment_sizes_kernel(const int64_t* rows, const int32_t* num_segments, const int64_t* off, int64_t n,
                                     int64_t* sizes) {
  const int64_t U = *num_segments;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n; s += stride) {
    sizes[s] = s < U ? off[rows[s] + 1] - off[rows[s]] : 0;
  }
}

// Row operation: writes row r's summed gradient (divided by its lookup count with
// scale_grad_by_freq) and the entry numbers at the row's place in the output.
template <class T>
struct SparseWriteOp : PlainRowOp<acc_t<T>> {
  using A = acc_t<T>;
  const int64_t* rows;  // [U] increasing
  const int32_t* num_segments;
  const int32_t* seg;    // [U + 1] segment starts (lookup counts are the differences)
  const int64_t* first;  // [U + 1] first output slot of each segment
  int64_t* entries;
  T* values;
  bool scale_by_freq;

  __device__ __forceinline__ void apply(int64_t r, int64_t lo, int64_t c0, int64_t size, const A (&g)[kVPL], A,
                                        int lane) const {
    // Segment of row r: binary search in the increasing rows (all lanes find the same s).
    int64_t a = 0, b = *num_segments;
    while (a < b) {
      const int64_t m = (a + b) >> 1;
      if (rows[m] < r)
        a = m + 1;
      else
        b = m;
    }
    const int64_t s = a;
    const A scale = scale_by_freq ? recip_rn(static_cast<A>(seg[s + 1] - seg[s])) : A(1);
    const int64_t base = first[s];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int64_t c = c0 + lane + kWarp * i;
      if (c < size) {
        entries[base + c] = lo + c;
        values[base + c] = from_acc<T>(scale_by_freq ? g[i] * scale : g[i]);
      }
    }
  }
};

std::tuple<Tensor, Tensor> bag_backward_sparse(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                                               Tensor bag_offsets, std::optional<Tensor> per_sample_weights,
                                               std::optional<Tensor> col_of_size, Tensor argmax, int64_t mode,
                                               int64_t padding_idx, bool scale_grad_by_freq, bool table_checked) {
  // The gradient's number of entries is read back to size it: a clear error rather than the capture's own.
  PME_CHECK(
      !Ctx(weight).capturing(), "a sparse gradient (sparse=True) reads its number of entries back to the host ",
      "and cannot be captured in a CUDA graph (use the dense gradient or a fused optimizer, whose steps capture)");
  const int64_t N = indices.numel();
  Tensor entries, values;
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked,
                     [&](const Ctx& ctx, const RowGroups& groups, const auto& src, const auto*) {
                       using T = typename std::decay_t<decltype(src)>::value_type;
                       const int64_t S = groups.max_segments;  // >= U
                       int64_t nnz = 0;
                       Workspace ws;
                       int64_t* first = nullptr;
                       if (N > 0 && S > 0) {
                         size_t scan_bytes = 0;
                         PME_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(
                             nullptr, scan_bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                             static_cast<int>(S + 1), ctx.stream));
                         const int s_sizes = ws.reserve<int64_t>(S + 1), s_first = ws.reserve<int64_t>(S + 1);
                         const int s_temp = ws.reserve_bytes(std::max<size_t>(scan_bytes, 1));
                         ws.allocate(offsets);
                         int64_t* sizes = ws.get<int64_t>(s_sizes);
                         first = ws.get<int64_t>(s_first);
                         segment_sizes_kernel<<<ctx.grid(S + 1, 256), 256, 0, ctx.stream>>>(
                             groups.d.rows, groups.d.num_segments, src.table.off, S + 1, sizes);
                         PME_CUDA_LAUNCH_CHECK();
                         PME_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(ws.get<void>(s_temp), scan_bytes,
                                                                      static_cast<const int64_t*>(sizes), first,
                                                                      static_cast<int>(S + 1), ctx.stream));
                         read_device(ctx, &nnz, first + S);  // sizes[s] = 0 past U, so first[S] is the total
                       }
                       entries = torch::stable::new_empty(offsets, {nnz});
                       values = torch::stable::new_empty(weight, {nnz});
                       if (nnz == 0) return;
                       const SparseWriteOp<T> op{{},
                                                 groups.d.rows,
                                                 groups.d.num_segments,
                                                 groups.d.seg,
                                                 first,
                                                 entries.mutable_data_ptr<int64_t>(),
                                                 values.mutable_data_ptr<T>(),
                                                 scale_grad_by_freq};
                       run_row_op<T>(ctx, offsets, groups, src, op);
                     });
  return {entries, values};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  m.impl("bag_backward_sparse", TORCH_BOX(&bag_backward_sparse));
}

}  // namespace pme::cuda
