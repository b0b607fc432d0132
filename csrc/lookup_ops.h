// The four lookup operators' schemas mapped onto a backend's two generic functions, so the
// CPU and the CUDA backends register the same thin wrappers:
//   forward(weight, offsets, indices, bag_offsets?, psw?, col_of_size?, width, mode, pad)
// (the non-pooled forward takes padding_idx for its backward and passes pad = -1: nn.Embedding
// returns the padding row as stored)
//   backward(grad_out, weight, offsets, indices, bag_offsets?, psw?, col_of_size?, argmax, mode, pad, psw_grad)
// A missing bag_offsets means the non-pooled lookup (bag b is lookup b).
#pragma once

#include "pme.h"

#include <tuple>

namespace pme {

using OptTensor = std::optional<Tensor>;
using ForwardFn = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, bool);
using BackwardFn = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                                  int64_t, int64_t, bool, bool);

template <ForwardFn Fwd, BackwardFn Bwd>
struct LookupOps {
  // Pooled lookup: output [B, out_width] (+ argmax [B, out_width] for max).
  static std::tuple<Tensor, Tensor> bag_forward(Tensor weight, Tensor offsets, Tensor indices, Tensor bag_offsets,
                                                OptTensor per_sample_weights, OptTensor col_of_size, int64_t out_width,
                                                int64_t mode, int64_t padding_idx, bool table_checked) {
    return Fwd(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, out_width, mode, padding_idx,
               table_checked);
  }

  static std::tuple<Tensor, Tensor> bag_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                                                 Tensor bag_offsets, OptTensor per_sample_weights,
                                                 OptTensor col_of_size, Tensor argmax, int64_t mode,
                                                 int64_t padding_idx, bool psw_grad, bool table_checked) {
    return Bwd(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
               padding_idx, psw_grad, table_checked);
  }

  // Non-pooled lookup: output [N, out_width]; the padding row is returned as stored and gets
  // no gradient, as F.embedding does: padding_idx is checked here and used by the backward only
  // (it is in the schema so that autograd passes it on without a side channel).
  static Tensor embedding_forward(Tensor weight, Tensor offsets, Tensor indices, OptTensor col_of_size,
                                  int64_t out_width, int64_t padding_idx, bool table_checked) {
    const int64_t rows = offsets.numel() - 1;
    PME_CHECK(padding_idx >= -1 && padding_idx < rows, "padding_idx ", padding_idx, " is out of range for ", rows,
              " rows (-1 for none)");
    return std::get<0>(
        Fwd(weight, offsets, indices, std::nullopt, std::nullopt, col_of_size, out_width, kSum, -1, table_checked));
  }

  static Tensor embedding_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices,
                                   OptTensor col_of_size, int64_t padding_idx, bool table_checked) {
    const Tensor none = torch::stable::new_empty(offsets, {0});
    return std::get<0>(Bwd(grad_out, weight, offsets, indices, std::nullopt, std::nullopt, col_of_size, none, kSum,
                           padding_idx, false, table_checked));
  }
};

}  // namespace pme

// Registers the four lookup operators of `Ops` (a LookupOps instantiation) in library block m.
#define PME_REGISTER_LOOKUPS(m, Ops)                               \
  m.impl("bag_forward", TORCH_BOX(&Ops::bag_forward));             \
  m.impl("bag_backward", TORCH_BOX(&Ops::bag_backward));           \
  m.impl("embedding_forward", TORCH_BOX(&Ops::embedding_forward)); \
  m.impl("embedding_backward", TORCH_BOX(&Ops::embedding_backward))
