// CPU backward of a lookup as a sparse gradient of the flat buffer (nn.EmbeddingBag's
// sparse=True): only the entries of the rows a batch touches, each once, in increasing order
// (a coalesced COO gradient), duplicates summed. With scale_grad_by_freq every row's sum is
// divided by the number of lookups of that row in the batch, as torch does. Rows are grouped
// (row_groups.h) and each is summed in lookup order: exact and deterministic.
#include "cpu/row_groups.h"

#include <tuple>
#include <vector>

namespace pme::cpu {
namespace {

std::tuple<Tensor, Tensor> bag_backward_sparse(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                                               Tensor bag_offsets, std::optional<Tensor> per_sample_weights,
                                               std::optional<Tensor> col_of_size, Tensor argmax, int64_t mode,
                                               int64_t padding_idx, bool scale_grad_by_freq) {
  const LookupArgs a = check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size,
                                         mode, padding_idx);
  const int64_t W = check_grad_args(grad_out, weight, argmax, a, mode);
  const Tensor go = torch::stable::contiguous(grad_out);
  const TableView tv = make_table(weight, offsets, col_of_size, W);
  const int64_t* off = tv.offsets;
  Tensor entries, values;
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets.const_data_ptr<I>();
    validate_lookups(idx, a.num_lookups, bo, a.num_bags, tv);
    const RowGroups groups = group_by_row(idx, a.num_lookups, bo, a.num_bags, padding_idx);
    const int64_t U = static_cast<int64_t>(groups.rows.size());
    // first[s]: where row s's entries start in the output (rows increasing, so entries are too).
    std::vector<int64_t> first(U + 1, 0);
    for (int64_t s = 0; s < U; ++s) {
      const int64_t r = groups.rows[s];
      first[s + 1] = first[s] + (off[r + 1] - off[r]);
    }
    const int64_t nnz = first[U];
    entries = torch::stable::new_empty(offsets, {nnz});
    values = torch::stable::new_empty(weight, {nnz});
    int64_t* ent = entries.mutable_data_ptr<int64_t>();
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      using A = acc_t<T>;
      const GradInputs<T, I> in{go.const_data_ptr<T>(),
                                W,
                                weight.const_data_ptr<T>(),
                                off,
                                idx,
                                per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr,
                                tv.col_of_size,
                                mode == kMax ? argmax.const_data_ptr<int64_t>() : nullptr,
                                mode};
      T* val = values.mutable_data_ptr<T>();
      torch::stable::parallel_for(0, U, 64, [&](int64_t s0, int64_t s1) {
        std::vector<A> g(W);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t r = groups.rows[s];
          const int64_t lo = off[r], size = off[r + 1] - lo;
          if (size == 0) continue;
          row_gradient(in, groups, s, g.data());
          if (scale_grad_by_freq) {
            // times the reciprocal of the count, as the CUDA kernel does (same rounding)
            const A inv = A(1) / static_cast<A>(groups.seg[s + 1] - groups.seg[s]);
            for (int64_t c = 0; c < size; ++c) g[c] *= inv;
          }
          for (int64_t c = 0; c < size; ++c) {
            ent[first[s] + c] = lo + c;
            val[first[s] + c] = static_cast<T>(g[c]);
          }
        }
      });
    });
  });
  return {entries, values};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) { m.impl("bag_backward_sparse", TORCH_BOX(&bag_backward_sparse)); }

}  // namespace pme::cpu
