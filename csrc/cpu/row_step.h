// CPU: one fused optimizer step on one row given its summed gradient (SGD, row-wise Adagrad,
// lazy Adam): shared by sparse_update_ (update_cpu.cpp) and collection_update_
// (collection_cpu.cpp), so that a table and a collection follow the same trajectory.
#pragma once

#include "pme.h"

#include <cmath>

namespace pme::cpu {

struct Hyper {
  int64_t optimizer;
  double lr, weight_decay, eps, beta1, beta2;
  double inv_scale;  // 1 / grad_scale: the summed gradient is unscaled in the accumulation type first
  int64_t step;
};

// Applies one optimizer step to row r (entries w[0:size]) given its summed gradient g.
template <class T, class A>
void apply_step(const Hyper& h, T* w, A* g, int64_t size, A* row_state, A* m, A* v) {
  const A wd = static_cast<A>(h.weight_decay), lr = static_cast<A>(h.lr), eps = static_cast<A>(h.eps);
  if (h.inv_scale != 1.0) {  // (a GradScaler's scale, divided out here, not in the table's 16-bit dtype)
    const A s = static_cast<A>(h.inv_scale);
    for (int64_t c = 0; c < size; ++c) g[c] *= s;
  }
  if (wd != A(0)) {
    for (int64_t c = 0; c < size; ++c) g[c] += wd * static_cast<A>(w[c]);
  }
  switch (h.optimizer) {
    case kSGD:
      for (int64_t c = 0; c < size; ++c) w[c] = static_cast<T>(static_cast<A>(w[c]) - lr * g[c]);
      break;
    case kRowwiseAdagrad: {
      if (size == 0) break;
      A sq = 0;
      for (int64_t c = 0; c < size; ++c) sq += g[c] * g[c];
      *row_state += sq / static_cast<A>(size);
      const A denom = std::sqrt(*row_state) + eps;
      for (int64_t c = 0; c < size; ++c) w[c] = static_cast<T>(static_cast<A>(w[c]) - lr * g[c] / denom);
      break;
    }
    case kAdam: {
      // 1 - beta and the bias corrections in double, as torch forms them: with a beta near 1,
      // 1 - beta formed in float32 would cancel (beta2 = 0.9999999: 7% off the step).
      const A b1 = static_cast<A>(h.beta1), b2 = static_cast<A>(h.beta2);
      const A c1 = static_cast<A>(1.0 - h.beta1), c2 = static_cast<A>(1.0 - h.beta2);
      const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
      const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
      // torch.optim.SparseAdam's form: eps is added to sqrt(v) before the bias correction.
      const A step_size = static_cast<A>(h.lr * std::sqrt(bc2) / bc1);
      for (int64_t c = 0; c < size; ++c) {
        m[c] = b1 * m[c] + c1 * g[c];
        v[c] = b2 * v[c] + c2 * g[c] * g[c];
        const A denom = std::sqrt(v[c]) + eps;
        w[c] = static_cast<T>(static_cast<A>(w[c]) - step_size * m[c] / denom);
      }
      break;
    }
  }
}

}  // namespace pme::cpu
