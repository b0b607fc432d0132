// CUDA fused sparse update (backward + optimizer step straight into the flat buffer) and the
// search's score accumulation. Same formulas as csrc/cpu/update_cpu.cpp. Both group the batch
// by row (row_groups_cuda.cuh) and run one warp per touched row with the row's summed gradient
// in registers: each row is read and written once, no dense gradient, no atomics,
// deterministic (the row-wise Adagrad's sum of squares is a fixed-order warp reduction).
#include "cuda/row_groups_cuda.cuh"
#include "cuda/row_ops_cuda.cuh"

#include <cmath>
#include <type_traits>

namespace pme::cuda {
namespace {

// scores += |w * g| (rule 0, SNIP) or g^2 (rule 1).
template <class T>
struct ScoreOp : PlainRowOp<acc_t<T>> {
  using A = acc_t<T>;
  A* scores;   // [total]
  const T* w;  // [total]
  int64_t rule;

  __device__ __forceinline__ void apply(int64_t, int64_t lo, int64_t c0, int64_t size, const A (&g)[kVPL], A,
                                        int lane) const {
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int64_t c = c0 + lane + kWarp * i;
      if (c >= size) continue;
      const A add = rule == kSnip ? abs(to_acc(w[lo + c]) * g[i]) : g[i] * g[i];
      scores[lo + c] += add;
    }
  }
};

// Runs make_op(T{})'s operation on every row the batch touches (with_grouped_batch does the
// checks, the validation and the grouping).
template <class MakeOp>
void for_each_row(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                  const Tensor& bag_offsets, const std::optional<Tensor>& per_sample_weights,
                  const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode, int64_t padding_idx,
                  bool table_checked, MakeOp&& make_op) {
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked,
                     [&](const Ctx& ctx, const RowGroups& groups, const auto& src, const auto*) {
                       using T = typename std::decay_t<decltype(src)>::value_type;
                       run_row_op<T>(ctx, offsets, groups, src, make_op(T{}));
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
  void* s1 = optimizer != kSGD && state1.numel() ? state1.mutable_data_ptr() : nullptr;
  void* s2 = optimizer == kAdam && state2.numel() ? state2.mutable_data_ptr() : nullptr;
  void* w = weight.mutable_data_ptr();
  for_each_row(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
               padding_idx, table_checked, [&](auto tag) {
                 using T = decltype(tag);
                 return make_update_op<T>(w, s1, s2, optimizer, lr, weight_decay, eps, beta1, beta2, grad_scale, step);
               });
}

void accumulate_scores_(Tensor scores, Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                        Tensor bag_offsets, std::optional<Tensor> per_sample_weights, std::optional<Tensor> col_of_size,
                        Tensor argmax, int64_t mode, int64_t padding_idx, int64_t rule, bool table_checked) {
  check_score_args(scores, weight, offsets, rule);
  check_in_place({{&scores, "scores"}}, lookup_inputs(grad_out, &weight, offsets, indices, bag_offsets,
                                                      per_sample_weights, col_of_size, argmax));
  void* sc = scores.mutable_data_ptr();
  const void* w = weight.const_data_ptr();
  for_each_row(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
               padding_idx, table_checked, [&](auto tag) {
                 using T = decltype(tag);
                 return ScoreOp<T>{{}, static_cast<acc_t<T>*>(sc), static_cast<const T*>(w), rule};
               });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  m.impl("sparse_update_", TORCH_BOX(&sparse_update_));
  m.impl("accumulate_scores_", TORCH_BOX(&accumulate_scores_));
}

}  // namespace pme::cuda
