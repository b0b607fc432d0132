// CPU fused sparse update (backward + optimizer step straight into the flat buffer) and the
// search's score accumulation. Both visit each row of the batch once, with the summed
// gradient of its duplicates (row_groups.h): exact and deterministic.
#include "cpu/row_groups.h"
#include "cpu/row_step.h"

#include <cmath>
#include <type_traits>

namespace pme::cpu {
namespace {

// Runs f(in, r, g) for every row r the batch touches, g its summed gradient (in: the batch's
// GradInputs, for the weight's type).
template <class F>
void for_each_row(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                  const Tensor& bag_offsets, const std::optional<Tensor>& per_sample_weights,
                  const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode, int64_t padding_idx,
                  bool table_checked, F&& f) {
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked, [&](const auto& in, const RowGroups& groups) {
                       for_each_row_gradient(in, groups, [&](int64_t, int64_t r, auto* g) { f(in, r, g); });
                     });
}

void sparse_update_(Tensor weight, Tensor state1, Tensor state2, Tensor grad_out, Tensor offsets, Tensor indices,
                    Tensor bag_offsets, std::optional<Tensor> per_sample_weights, std::optional<Tensor> col_of_size,
                    Tensor argmax, int64_t mode, int64_t padding_idx, int64_t optimizer, double lr, double weight_decay,
                    double eps, double beta1, double beta2, double grad_scale, int64_t step, bool table_checked) {
  check_update_args(weight, state1, state2, offsets, optimizer, lr, weight_decay, eps, beta1, beta2, grad_scale, step);
  check_update_in_place(
      weight, state1, state2,
      lookup_inputs(grad_out, nullptr, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax));
  const Hyper h{optimizer, lr, weight_decay, eps, beta1, beta2, 1.0 / grad_scale, step};
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  void* s1 = state1.numel() ? state1.mutable_data_ptr() : nullptr;
  void* s2 = state2.numel() ? state2.mutable_data_ptr() : nullptr;
  void* w = weight.mutable_data_ptr();
  for_each_row(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
               padding_idx, table_checked, [&](const auto& in, int64_t r, auto* g) {
                 using T = typename std::decay_t<decltype(in)>::value_type;
                 using A = acc_t<T>;
                 A* rs = optimizer == kRowwiseAdagrad ? static_cast<A*>(s1) + r : nullptr;
                 A* m = optimizer == kAdam ? static_cast<A*>(s1) + off[r] : nullptr;
                 A* v = optimizer == kAdam ? static_cast<A*>(s2) + off[r] : nullptr;
                 apply_step<T, A>(h, static_cast<T*>(w) + off[r], g, off[r + 1] - off[r], rs, m, v);
               });
}

void accumulate_scores_(Tensor scores, Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                        Tensor bag_offsets, std::optional<Tensor> per_sample_weights, std::optional<Tensor> col_of_size,
                        Tensor argmax, int64_t mode, int64_t padding_idx, int64_t rule, bool table_checked) {
  check_score_args(scores, weight, offsets, rule);
  check_in_place({{&scores, "scores"}}, lookup_inputs(grad_out, &weight, offsets, indices, bag_offsets,
                                                      per_sample_weights, col_of_size, argmax));
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  void* sc = scores.mutable_data_ptr();
  for_each_row(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
               padding_idx, table_checked, [&](const auto& in, int64_t r, auto* g) {
                 using T = typename std::decay_t<decltype(in)>::value_type;
                 using A = acc_t<T>;
                 A* s = static_cast<A*>(sc) + off[r];
                 const T* wr = in.weight + off[r];
                 const int64_t size = off[r + 1] - off[r];
                 if (rule == kSnip) {
                   for (int64_t c = 0; c < size; ++c) s[c] += std::abs(static_cast<A>(wr[c]) * g[c]);
                 } else {
                   for (int64_t c = 0; c < size; ++c) s[c] += g[c] * g[c];
                 }
               });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  m.impl("sparse_update_", TORCH_BOX(&sparse_update_));
  m.impl("accumulate_scores_", TORCH_BOX(&accumulate_scores_));
}

}  // namespace pme::cpu
