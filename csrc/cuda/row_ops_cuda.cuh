// CUDA row operations shared by the lookup, the fused update and the collection operators
// (run_row_op of row_groups_cuda.cuh calls them with a row's summed gradient in registers):
// GradWriteOp writes it into a gradient buffer, UpdateOp takes one optimizer step with it.
#pragma once

#include <cmath>

#include "cuda/row_groups_cuda.cuh"

namespace pme::cuda {
// Internal linkage, as the other CUDA headers.
namespace {

// Row operation of the backward: writes the row's summed gradient into grad_weight.
template <class T>
struct GradWriteOp : PlainRowOp<acc_t<T>> {
  using A = acc_t<T>;
  T* gw;
  __device__ __forceinline__ void apply(int64_t, int64_t lo, int64_t c0, int64_t size, const A (&g)[kVPL], A,
                                        int lane) const {
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int64_t c = c0 + lane + kWarp * i;
      if (c < size) gw[lo + c] = from_acc<T>(g[i]);
    }
  }
};

// The optimizer step on one row (SGD, row-wise Adagrad, lazy Adam), as the CPU's apply_step.
template <class T>
struct UpdateOp {
  using A = acc_t<T>;
  T* w;   // [total]
  A* s1;  // Adagrad: [V] row sums; Adam: [total] first moments
  A* s2;  // Adam: [total] second moments
  int64_t optimizer;
  A lr, wd, eps, b1, b2, one_minus_b1, one_minus_b2, step_size;
  A inv_scale;  // 1 / grad_scale: the summed gradient is unscaled in the accumulation type first

  __device__ __forceinline__ bool row_norm() const { return optimizer == kRowwiseAdagrad; }

  // The gradient unscaled (grad_scale), then weight decay joins it, before anything else.
  __device__ __forceinline__ void prepare(int64_t lo, int64_t c0, int64_t size, A (&g)[kVPL], int lane) const {
    if (inv_scale != A(1)) {
#pragma unroll
      for (int i = 0; i < kVPL; ++i) g[i] *= inv_scale;
    }
    if (wd == A(0)) return;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int64_t c = c0 + lane + kWarp * i;
      if (c < size) g[i] += wd * to_acc(w[lo + c]);
    }
  }

  // Row-wise Adagrad: state += mean of g^2 over the row; returns sqrt(state) + eps. All lanes
  // read the old state before lane 0 writes the new one.
  __device__ __forceinline__ A row_update(int64_t r, A sq_sum, int64_t size, int lane) const {
    const A st = s1[r] + sq_sum / static_cast<A>(size);
    __syncwarp();
    if (lane == 0) s1[r] = st;
    return sqrt(st) + eps;
  }

  __device__ __forceinline__ void apply(int64_t, int64_t lo, int64_t c0, int64_t size, const A (&g)[kVPL], A denom,
                                        int lane) const {
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int64_t c = c0 + lane + kWarp * i;
      if (c >= size) continue;
      const int64_t e = lo + c;
      const A x = to_acc(w[e]);
      if (optimizer == kSGD) {
        w[e] = from_acc<T>(x - lr * g[i]);
      } else if (optimizer == kRowwiseAdagrad) {
        w[e] = from_acc<T>(x - lr * g[i] / denom);
      } else {
        const A m = b1 * s1[e] + one_minus_b1 * g[i];
        const A v = b2 * s2[e] + one_minus_b2 * g[i] * g[i];
        s1[e] = m;
        s2[e] = v;
        // torch.optim.SparseAdam's form: eps joins sqrt(v) before the bias correction, which
        // is folded into step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step).
        const A d = sqrt(v) + eps;
        w[e] = from_acc<T>(x - step_size * m / d);
      }
    }
  }
};

// An UpdateOp with its host-side constants (bias correction included), computed exactly as the
// CPU kernel computes them; w, s1, s2 point to the weight and the optimizer state (or null).
template <class T>
UpdateOp<T> make_update_op(void* w, void* s1, void* s2, int64_t optimizer, double lr, double weight_decay, double eps,
                           double beta1, double beta2, double grad_scale, int64_t step) {
  using A = acc_t<T>;
  UpdateOp<T> op{};
  op.w = static_cast<T*>(w);
  op.s1 = static_cast<A*>(s1);
  op.s2 = static_cast<A*>(s2);
  op.optimizer = optimizer;
  op.lr = static_cast<A>(lr);
  op.wd = static_cast<A>(weight_decay);
  op.eps = static_cast<A>(eps);
  op.b1 = static_cast<A>(beta1);
  op.b2 = static_cast<A>(beta2);
  // 1 - beta and the bias corrections in double, as the CPU kernel (row_step.h) forms them.
  op.one_minus_b1 = static_cast<A>(1.0 - beta1);
  op.one_minus_b2 = static_cast<A>(1.0 - beta2);
  op.inv_scale = static_cast<A>(1.0 / grad_scale);
  op.step_size = A(1);
  if (optimizer == kAdam) {
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    op.step_size = static_cast<A>(lr * std::sqrt(bc2) / bc1);
  }
  return op;
}

}  // namespace
}  // namespace pme::cuda
