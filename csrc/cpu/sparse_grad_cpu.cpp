// CPU backward of a lookup as a sparse gradient of the flat buffer (nn.EmbeddingBag's
// sparse=True): only the entries of the rows a batch touches, each once, in increasing order
// (a coalesced COO gradient), duplicates summed. With scale_grad_by_freq every row's sum is
// divided by the number of lookups of that row in the batch, as torch does. Rows are grouped
// (row_groups.h) and each is summed in lookup order: exact and deterministic.
#include "cpu/row_groups.h"

#include <tuple>
#include <type_traits>
#include <vector>

namespace pme::cpu {
namespace {

std::tuple<Tensor, Tensor> bag_backward_sparse(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                                               Tensor bag_offsets, std::optional<Tensor> per_sample_weights,
                                               std::optional<Tensor> col_of_size, Tensor argmax, int64_t mode,
                                               int64_t padding_idx, bool scale_grad_by_freq, bool table_checked) {
  Tensor entries, values;
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked, [&](const auto& in, const RowGroups& groups) {
                       using T = typename std::decay_t<decltype(in)>::value_type;
                       using A = acc_t<T>;
                       const int64_t* off = in.offsets;
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
                       T* val = values.mutable_data_ptr<T>();
                       for_each_row_gradient(in, groups, [&](int64_t s, int64_t r, A* g) {
                         const int64_t lo = off[r], size = off[r + 1] - lo;
                         if (scale_grad_by_freq) {
                           // times the reciprocal of the count, as the CUDA kernel does (same rounding)
                           const A inv = A(1) / static_cast<A>(groups.seg[s + 1] - groups.seg[s]);
                           for (int64_t c = 0; c < size; ++c) g[c] *= inv;
                         }
                         for (int64_t c = 0; c < size; ++c) {
                           ent[first[s] + c] = lo + c;
                           val[first[s] + c] = static_cast<T>(g[c]);
                         }
                       });
                     });
  return {entries, values};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  m.impl("bag_backward_sparse", TORCH_BOX(&bag_backward_sparse));
}

}  // namespace pme::cpu
