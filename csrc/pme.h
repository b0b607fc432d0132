// Shared by the CPU and CUDA kernels: enums, dtype dispatch, argument checks.
// Everything here is header-only and uses the LibTorch stable ABI only.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pme {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Pooling modes; the numbers match the `mode` argument of every pme operator.
enum Mode : int64_t { kSum = 0, kMean = 1, kMax = 2 };

// Fused sparse optimizers (sparse_update_).
enum Optimizer : int64_t { kSGD = 0, kRowwiseAdagrad = 1, kAdam = 2 };

// Score rules (accumulate_scores_).
enum ScoreRule : int64_t { kSnip = 0, kGradSquared = 1 };

// The message of a failed check: "pme: " and the arguments, streamed. Unlike STD_TORCH_CHECK's,
// it leaves out the C++ function, file and line, which tell a user of the library nothing.
template <class... Args>
std::string check_message(const Args&... args) {
  std::ostringstream s;
  s << "pme: ";
  ((s << args), ...);
  return s.str();
}

// "valid: 0 to V - 1", or that a table of no rows has none (for index messages).
inline std::string valid_rows(int64_t V) {
  return V > 0 ? "valid: 0 to " + std::to_string(V - 1) : "it has none to look up";
}

// Which of a row's span checks failed: the row spans [lo, hi) of a buffer of `total` entries and
// is read into `width` columns (`width_name`: "the output width" or "the table's width").
inline std::string span_fault(int64_t lo, int64_t hi, int64_t total, int64_t width, const char* width_name) {
  if (hi < lo) return "its size " + std::to_string(hi - lo) + " is negative (offsets must be non-decreasing)";
  if (lo < 0) return "it starts before the buffer (offsets must start at 0)";
  if (hi > total) return "it overruns the " + std::to_string(total) + " stored entries";
  return "its size " + std::to_string(hi - lo) + " does not fit in " + width_name + " " + std::to_string(width) +
         " (sizes must be in [0, D])";
}

#define PME_CHECK(cond, ...)                                       \
  do {                                                             \
    if (C10_UNLIKELY_OR_CONST(!(cond))) {                          \
      throw std::runtime_error(::pme::check_message(__VA_ARGS__)); \
    }                                                              \
  } while (0)

// Accumulation type: fp32 for fp16/bf16/fp32 weights, fp64 for fp64 weights (gradcheck).
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

inline const char* dtype_name(ScalarType t) {
  constexpr std::pair<ScalarType, const char*> kNames[] = {
      {ScalarType::Float, "float32"},     {ScalarType::Double, "float64"}, {ScalarType::Half, "float16"},
      {ScalarType::BFloat16, "bfloat16"}, {ScalarType::Int, "int32"},      {ScalarType::Long, "int64"}};
  for (const auto& [type, name] : kNames) {
    if (type == t) return name;
  }
  return "an unsupported dtype";
}

// Calls f(C{}) if t is `is`, the dtype of the C++ type C; whether it did.
template <class C, class F>
bool call_if(ScalarType t, ScalarType is, F& f) {
  if (t != is) return false;
  f(C{});
  return true;
}

// Calls f(T{}) with T the C++ type of a weight dtype.
template <class F>
void dispatch_weight(ScalarType t, const char* what, F&& f) {
  const bool done = call_if<float>(t, ScalarType::Float, f) || call_if<double>(t, ScalarType::Double, f) ||
                    call_if<c10::Half>(t, ScalarType::Half, f) || call_if<c10::BFloat16>(t, ScalarType::BFloat16, f);
  PME_CHECK(done, what, " must be float32, float64, float16 or bfloat16, got ", dtype_name(t));
}

// Calls f(I{}) with I the C++ type of an index dtype.
template <class F>
void dispatch_index(ScalarType t, const char* what, F&& f) {
  const bool done = call_if<int32_t>(t, ScalarType::Int, f) || call_if<int64_t>(t, ScalarType::Long, f);
  PME_CHECK(done, what, " must be int32 or int64, got ", dtype_name(t));
}

inline void check_1d(const Tensor& t, const char* what) {
  PME_CHECK(t.dim() == 1, what, " must be 1-D, got ", t.dim(), " dimensions");
  PME_CHECK(t.is_contiguous(), what, " must be contiguous");
}

inline void check_same_device(const Tensor& a, const Tensor& b, const char* what) {
  PME_CHECK(a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index(), what,
            " must be on the same device as weight");
}

// Byte span [first, last) of a tensor's elements (strides taken into account; negative
// strides do not occur in what pme receives, a zero stride spans one element).
inline std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t) {
  const auto a = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  uint64_t last = 0;  // offset in elements of the last element
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t st = t.stride(d);
    if (st > 0) last += static_cast<uint64_t>(t.sizes()[d] - 1) * static_cast<uint64_t>(st);
  }
  return {a, a + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// An in-place argument (`out`) must not share memory with another argument: a weight that
// aliases its own offsets would rewrite the table's shape while the kernel reads it.
inline void check_no_overlap(const Tensor& out, const char* out_name, const Tensor& other, const char* other_name) {
  if (out.numel() == 0 || other.numel() == 0) return;
  const auto a = byte_span(out), b = byte_span(other);
  PME_CHECK(a.second <= b.first || b.second <= a.first, out_name,
            " is updated in place and must not share memory with ", other_name);
}

// The arguments every lookup-shaped operator shares, checked once in one place.
struct LookupArgs {
  int64_t num_rows;     // V
  int64_t num_lookups;  // N
  int64_t num_bags;     // B
  bool implicit_bags;   // non-pooled lookup: bag b is lookup b
};

// A new [rows, cols] tensor like `like` (its dtype and device; zero-filled when `zero`), or a pme
// error that names the operator's output when it cannot be allocated (more memory than there is,
// or more elements than int64 holds), where the allocator's own message names nothing of ours.
inline Tensor new_output(const Tensor& like, int64_t rows, int64_t cols, const char* what, bool zero = false) {
  PME_CHECK(rows >= 0 && cols >= 0, what, " = [", rows, ", ", cols, "] is not a shape");
  PME_CHECK(rows == 0 || cols <= std::numeric_limits<int64_t>::max() / 16 / rows, what, " = [", rows, ", ", cols,
            "] has more elements than a tensor can hold");
  try {
    return zero ? torch::stable::new_zeros(like, {rows, cols}) : torch::stable::new_empty(like, {rows, cols});
  } catch (const std::exception& e) {
    const double gib = static_cast<double>(rows) * static_cast<double>(cols) *
                       static_cast<double>(like.element_size()) / (1024.0 * 1024.0 * 1024.0);
    // (not e.what(): through the stable ABI it is the dispatcher's call site, C++ paths included)
    PME_CHECK(false, "cannot allocate ", what, " = [", rows, ", ", cols, "] (", gib, " GiB): not enough memory");
  }
  return like;  // not reached
}

// A table's offsets argument (before anything reads it as int64): 1-D int64, V + 1 >= 1 entries.
inline void check_offsets_arg(const Tensor& offsets) {
  check_1d(offsets, "offsets");
  PME_CHECK(offsets.scalar_type() == ScalarType::Long, "offsets must be int64, got ",
            dtype_name(offsets.scalar_type()));
  PME_CHECK(offsets.numel() >= 1, "offsets must have V + 1 >= 1 entries");
}

inline LookupArgs check_lookup_args(const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                                    const std::optional<Tensor>& bag_offsets,
                                    const std::optional<Tensor>& per_sample_weights,
                                    const std::optional<Tensor>& col_of_size, int64_t mode, int64_t padding_idx) {
  check_1d(weight, "weight");
  check_offsets_arg(offsets);
  check_1d(indices, "indices");
  check_same_device(offsets, weight, "offsets");
  check_same_device(indices, weight, "indices");
  LookupArgs a{offsets.numel() - 1, indices.numel(), indices.numel(), true};
  if (bag_offsets.has_value()) {
    const Tensor& bo = *bag_offsets;
    check_1d(bo, "bag_offsets");
    PME_CHECK(bo.scalar_type() == indices.scalar_type(), "bag_offsets (", dtype_name(bo.scalar_type()),
              ") must have the dtype of indices (", dtype_name(indices.scalar_type()), ")");
    PME_CHECK(bo.numel() >= 1, "bag_offsets must have B + 1 >= 1 entries");
    check_same_device(bo, weight, "bag_offsets");
    a.num_bags = bo.numel() - 1;
    a.implicit_bags = false;
  }
  if (per_sample_weights.has_value()) {
    const Tensor& p = *per_sample_weights;
    check_1d(p, "per_sample_weights");
    PME_CHECK(mode == kSum, "per_sample_weights are only supported with mode 'sum'");
    PME_CHECK(p.numel() == indices.numel(), "per_sample_weights has ", p.numel(), " entries but indices has ",
              indices.numel());
    PME_CHECK(p.scalar_type() == weight.scalar_type(), "per_sample_weights (", dtype_name(p.scalar_type()),
              ") must have the dtype of weight (", dtype_name(weight.scalar_type()), ")");
    check_same_device(p, weight, "per_sample_weights");
  }
  if (col_of_size.has_value()) {
    check_1d(*col_of_size, "col_of_size");
    PME_CHECK(col_of_size->scalar_type() == ScalarType::Long, "col_of_size must be int64");
    // empty is not "no map" (None is): entry s is the column of rows of size s, so at least size 0's
    PME_CHECK(col_of_size->numel() >= 1,
              "col_of_size is empty: it needs an entry per row size from 0 (or None for the padded layout)");
    check_same_device(*col_of_size, weight, "col_of_size");
  }
  PME_CHECK(mode == kSum || mode == kMean || mode == kMax, "mode must be 0 (sum), 1 (mean) or 2 (max), got ", mode);
  PME_CHECK(padding_idx >= -1 && padding_idx < a.num_rows, "padding_idx ", padding_idx,
            " is out of range for a table of ", a.num_rows, " rows");
  return a;
}

// Checks grad_out [B, W] (dtype of weight) and, for max, the forward's argmax; returns W.
inline int64_t check_grad_args(const Tensor& grad_out, const Tensor& weight, const Tensor& argmax, const LookupArgs& a,
                               int64_t mode) {
  PME_CHECK(grad_out.dim() == 2 && grad_out.sizes()[0] == a.num_bags, "grad_out must be [", a.num_bags, ", width]");
  PME_CHECK(grad_out.scalar_type() == weight.scalar_type(), "grad_out must have the dtype of weight");
  check_same_device(grad_out, weight, "grad_out");
  const int64_t W = grad_out.sizes()[1];
  if (mode == kMax) {
    PME_CHECK(argmax.dim() == 2 && argmax.sizes()[0] == a.num_bags && argmax.sizes()[1] == W &&
                  argmax.scalar_type() == ScalarType::Long && argmax.is_contiguous(),
              "argmax must be the contiguous int64 [B, width] tensor returned by the forward");
    check_same_device(argmax, weight, "argmax");
  }
  return W;
}

// Dtype of optimizer state and scores: fp64 for fp64 weights, else fp32.
inline ScalarType acc_dtype(ScalarType weight) {
  return weight == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// A 1-D state tensor of `numel` entries of the accumulation dtype on weight's device.
inline void check_state(const Tensor& state, int64_t numel, const Tensor& weight, const char* what) {
  const ScalarType dtype = acc_dtype(weight.scalar_type());
  check_1d(state, what);
  PME_CHECK(state.numel() == numel, what, " must have ", numel, " entries, got ", state.numel());
  PME_CHECK(state.scalar_type() == dtype, what, " must be ", dtype_name(dtype), " for ",
            dtype_name(weight.scalar_type()), " weights, got ", dtype_name(state.scalar_type()));
  check_same_device(state, weight, what);
}

// The hyperparameters and state tensors of sparse_update_.
inline void check_update_args(const Tensor& weight, const Tensor& state1, const Tensor& state2, const Tensor& offsets,
                              int64_t optimizer, double lr, double weight_decay, double eps, double beta1, double beta2,
                              double grad_scale, int64_t step) {
  check_offsets_arg(offsets);  // the callers read it as int64 before the lookup's own checks
  PME_CHECK(optimizer == kSGD || optimizer == kRowwiseAdagrad || optimizer == kAdam,
            "optimizer must be 0 (SGD), 1 (row-wise Adagrad) or 2 (Adam), got ", optimizer);
  PME_CHECK(std::isfinite(lr) && lr >= 0 && std::isfinite(weight_decay) && weight_decay >= 0 && std::isfinite(eps) &&
                eps >= 0,
            "lr, weight_decay and eps must be finite and >= 0, got lr=", lr, ", weight_decay=", weight_decay,
            ", eps=", eps);
  PME_CHECK(std::isfinite(grad_scale) && grad_scale > 0, "grad_scale must be finite and > 0, got ", grad_scale);
  if (optimizer == kRowwiseAdagrad) check_state(state1, offsets.numel() - 1, weight, "state1 (row-wise sum)");
  if (optimizer == kAdam) {
    PME_CHECK(step >= 1, "Adam needs step >= 1, got ", step);
    PME_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "Adam betas must be in [0, 1), got (", beta1, ", ",
              beta2, ")");
    check_state(state1, weight.numel(), weight, "state1 (first moment)");
    check_state(state2, weight.numel(), weight, "state2 (second moment)");
  }
}

// Tensors with the names their messages use.
using NamedTensors = std::vector<std::pair<const Tensor*, const char*>>;

// The in-place tensors of sparse_update_ / accumulate_scores_ / collection_update_ (`outs`, 1 to
// 3) must not share memory with each other or with any read-only argument (`ins`; a nullptr
// entry is an absent optional argument).
inline void check_in_place(const NamedTensors& outs, const NamedTensors& ins) {
  for (auto o = outs.begin(); o != outs.end(); ++o) {
    for (auto p = o + 1; p != outs.end(); ++p) check_no_overlap(*o->first, o->second, *p->first, p->second);
    for (const auto& i : ins) {
      if (i.first != nullptr) check_no_overlap(*o->first, o->second, *i.first, i.second);
    }
  }
}

// A fused update writes weight, state1 and state2 in place (check_in_place).
inline void check_update_in_place(const Tensor& weight, const Tensor& state1, const Tensor& state2,
                                  const NamedTensors& ins) {
  check_in_place({{&weight, "weight"}, {&state1, "state1"}, {&state2, "state2"}}, ins);
}

// What a backward-shaped operator of one table reads (check_in_place's `ins`); weight only when
// the operator reads it without writing it (else nullptr).
inline NamedTensors lookup_inputs(const Tensor& grad_out, const Tensor* weight, const Tensor& offsets,
                                  const Tensor& indices, const Tensor& bag_offsets,
                                  const std::optional<Tensor>& per_sample_weights,
                                  const std::optional<Tensor>& col_of_size, const Tensor& argmax) {
  return {{&grad_out, "grad_out"},
          {weight, "weight"},
          {&offsets, "offsets"},
          {&indices, "indices"},
          {&bag_offsets, "bag_offsets"},
          {per_sample_weights ? &*per_sample_weights : nullptr, "per_sample_weights"},
          {col_of_size ? &*col_of_size : nullptr, "col_of_size"},
          {&argmax, "argmax"}};
}

// Registers the pruning operators (topk_threshold, prune_counts, prune_pack: the backend's
// functions of those names) in library block m.
#define PME_REGISTER_PRUNE(m)                           \
  m.impl("topk_threshold", TORCH_BOX(&topk_threshold)); \
  m.impl("prune_counts", TORCH_BOX(&prune_counts));     \
  m.impl("prune_pack", TORCH_BOX(&prune_pack))

// Arguments of the pruning operators (shapes, dtypes, devices; no data is read).
inline void check_topk_args(const Tensor& scores, int64_t k) {
  PME_CHECK(scores.scalar_type() == ScalarType::Float, "scores must be float32, got ",
            dtype_name(scores.scalar_type()));
  PME_CHECK(k >= 1 && k <= scores.numel(), "k must be in [1, ", scores.numel(), "] (the number of scores), got ", k);
}

inline void check_counts_args(const Tensor& scores, const Tensor& threshold) {
  PME_CHECK(scores.dim() == 2, "scores must be 2-D [V, D], got ", scores.dim(), " dimensions");
  PME_CHECK(scores.scalar_type() == ScalarType::Float, "scores must be float32");
  PME_CHECK(threshold.numel() == 1 && threshold.scalar_type() == ScalarType::Float,
            "threshold must be a float32 tensor with one element");
  check_same_device(threshold, scores, "threshold");
}

inline void check_pack_args(const Tensor& dense, const Tensor& scores, const Tensor& offsets) {
  PME_CHECK(dense.dim() == 2, "dense must be 2-D [V, D], got ", dense.dim(), " dimensions");
  PME_CHECK(scores.dim() == 2 && scores.sizes()[0] == dense.sizes()[0] && scores.sizes()[1] == dense.sizes()[1],
            "scores must have the shape of dense");
  PME_CHECK(scores.scalar_type() == ScalarType::Float, "scores must be float32");
  check_1d(offsets, "offsets");
  PME_CHECK(offsets.scalar_type() == ScalarType::Long, "offsets must be int64");
  check_same_device(scores, dense, "scores");
  check_same_device(offsets, dense, "offsets");
  PME_CHECK(offsets.numel() == dense.sizes()[0] + 1, "offsets must have V + 1 = ", dense.sizes()[0] + 1,
            " entries, got ", offsets.numel());
}

// Arguments of sparse_adam_ (torch.optim.SparseAdam's step on a coalesced sparse gradient):
// param, exp_avg, exp_avg_sq alike (contiguous, float32 or float64, one device), seen as
// [R, C] rows (R = size(0), C the rest); rows int64 [n]; values [n, C] of param's dtype. The
// row numbers themselves (increasing, in [0, R)) are checked by the CPU kernel as it reads them.
inline int64_t check_sparse_adam_args(const Tensor& param, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                                      const Tensor& rows, const Tensor& values) {
  PME_CHECK(param.scalar_type() == ScalarType::Float || param.scalar_type() == ScalarType::Double,
            "sparse_adam_: param must be float32 or float64, got ", dtype_name(param.scalar_type()));
  PME_CHECK(param.dim() >= 1 && param.is_contiguous(), "sparse_adam_: param must be contiguous with >= 1 dimension");
  const Tensor* same[] = {&exp_avg, &exp_avg_sq, &values};
  const char* names[] = {"exp_avg", "exp_avg_sq", "values"};
  for (int k = 0; k < 3; ++k) {
    PME_CHECK(same[k]->scalar_type() == param.scalar_type() && same[k]->is_contiguous(), "sparse_adam_: ", names[k],
              " must be contiguous ", dtype_name(param.scalar_type()), " like param");
    check_same_device(*same[k], param, names[k]);
  }
  PME_CHECK(exp_avg.numel() == param.numel() && exp_avg_sq.numel() == param.numel(),
            "sparse_adam_: exp_avg and exp_avg_sq must have param's ", param.numel(), " entries");
  check_1d(rows, "sparse_adam_: rows");
  PME_CHECK(rows.scalar_type() == ScalarType::Long, "sparse_adam_: rows must be int64");
  check_same_device(rows, param, "rows");
  const int64_t R = param.sizes()[0], C = R == 0 ? 0 : param.numel() / R;
  PME_CHECK(values.numel() == rows.numel() * C, "sparse_adam_: values must hold ", C, " entries per row (",
            rows.numel(), " rows), got ", values.numel());
  check_no_overlap(param, "param", exp_avg, "exp_avg");
  check_no_overlap(param, "param", exp_avg_sq, "exp_avg_sq");
  check_no_overlap(exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  return C;
}

inline void check_score_args(const Tensor& scores, const Tensor& weight, const Tensor& offsets, int64_t rule) {
  check_offsets_arg(offsets);  // the callers read it as int64 before the lookup's own checks
  PME_CHECK(rule == kSnip || rule == kGradSquared, "rule must be 0 (snip |w*g|) or 1 (g^2), got ", rule);
  check_state(scores, weight.numel(), weight, "scores");
}

}  // namespace pme
