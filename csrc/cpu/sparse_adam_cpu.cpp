// CPU step of torch.optim.SparseAdam on a coalesced sparse gradient (pme.optim.SparseAdam):
// for each gradient row r (increasing) and column c, with g its value and m, v the moments,
//   m' = (g - m) * (1 - beta1) + m,  v' = (g * g - v) * (1 - beta2) + v,
//   p += (m' / (sqrt(v') + eps)) * -step_size,
// each operation rounded on its own in the parameter's dtype, as torch's step computes them
// (this file is compiled without FMA contraction: x86-64's baseline has no FMA). The moments
// equal torch's bit for bit; the parameter can differ by an ulp where torch's CPU sqrt is not
// correctly rounded (std::sqrt is). Rows are disjoint: the parallel chunks never write one entry.
#include "pme.h"

#include <algorithm>

namespace pme::cpu {
namespace {

template <class T>
void adam_rows(T* p, T* m, T* v, const int64_t* rows, const T* values, int64_t n, int64_t C, double beta1, double beta2,
               double eps, double step_size) {
  const T c1 = static_cast<T>(1 - beta1), c2 = static_cast<T>(1 - beta2), e = static_cast<T>(eps),
          ss = static_cast<T>(-step_size);
  torch::stable::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t base = rows[k] * C;
      const T* g = values + k * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = base + c;
        T a = g[c] - m[i];
        a = a * c1;
        a = a + m[i];
        T b = g[c] * g[c];
        b = b - v[i];
        b = b * c2;
        b = b + v[i];
        m[i] = a;
        v[i] = b;
        T d = std::sqrt(b);
        d = d + e;
        T u = a / d;
        u = u * ss;
        p[i] = p[i] + u;
      }
    }
  });
}

void sparse_adam_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor rows, Tensor values, double beta1,
                  double beta2, double eps, double step_size) {
  const int64_t C = check_sparse_adam_args(param, exp_avg, exp_avg_sq, rows, values);
  const int64_t n = rows.numel(), R = param.sizes()[0];
  const int64_t* r = rows.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {  // before any write: a bad call changes nothing
    PME_CHECK(r[k] >= 0 && r[k] < R, "sparse_adam_: rows[", k, "] = ", r[k], " is out of range for ", R, " rows");
    PME_CHECK(k == 0 || r[k] > r[k - 1], "sparse_adam_: rows must be increasing (a coalesced gradient's), but rows[", k,
              "] = ", r[k], " follows ", r[k - 1]);
  }
  if (n == 0 || C == 0) return;
  if (param.scalar_type() == ScalarType::Float) {
    adam_rows<float>(param.mutable_data_ptr<float>(), exp_avg.mutable_data_ptr<float>(),
                     exp_avg_sq.mutable_data_ptr<float>(), r, values.const_data_ptr<float>(), n, C, beta1, beta2, eps,
                     step_size);
  } else {
    adam_rows<double>(param.mutable_data_ptr<double>(), exp_avg.mutable_data_ptr<double>(),
                      exp_avg_sq.mutable_data_ptr<double>(), r, values.const_data_ptr<double>(), n, C, beta1, beta2,
                      eps, step_size);
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  m.impl("sparse_adam_", TORCH_BOX(&sparse_adam_));
}

}  // namespace pme::cpu
