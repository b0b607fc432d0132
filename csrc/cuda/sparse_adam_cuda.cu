// CUDA twin of csrc/cpu/sparse_adam_cpu.cpp: torch.optim.SparseAdam's step on a coalesced
// sparse gradient, one thread per (row, column) entry of the gradient. Each operation is rounded
// on its own (no FMA contraction: mul_rn), as torch's step computes them. Rows are
// increasing (a coalesced gradient's, so no two threads write one entry); a row outside
// [0, R) is skipped rather than written (this device kernel does not read the rows back to
// the host to report it; pme.optim.SparseAdam only passes a coalesced gradient's rows).
#include "cuda/cuda_common.cuh"

namespace pme::cuda {
namespace {

// A product kept apart from the sum that follows it: nvcc would contract a * b + c into one FMA
// (one rounding where torch rounds twice). Division and square root are IEEE by default.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

template <class T>
__global__ void __launch_bounds__(256) sparse_adam_kernel(T* p, T* m, T* v, const int64_t* rows, const T* values,
                                                          int64_t n, int64_t C, int64_t R, T c1, T c2, T e, T ss) {
  const int64_t total = n * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    const int64_t k = j / C, r = rows[k];
    if (r < 0 || r >= R) continue;
    const int64_t i = r * C + (j - k * C);
    const T g = values[j];
    const T a = mul_rn(g - m[i], c1) + m[i];
    const T b = mul_rn(mul_rn(g, g) - v[i], c2) + v[i];
    m[i] = a;
    v[i] = b;
    p[i] = p[i] + mul_rn(a / (sqrt(b) + e), ss);
  }
}

void sparse_adam_(Tensor param, Tensor exp_avg, Tensor exp_avg_sq, Tensor rows, Tensor values, double beta1,
                  double beta2, double eps, double step_size) {
  const int64_t C = check_sparse_adam_args(param, exp_avg, exp_avg_sq, rows, values);
  const int64_t n = rows.numel(), R = param.sizes()[0];
  if (n == 0 || C == 0) return;
  const Ctx ctx(param);
  const unsigned grid = ctx.grid(n * C, 256);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    sparse_adam_kernel<T><<<grid, 256, 0, ctx.stream>>>(
        param.mutable_data_ptr<T>(), exp_avg.mutable_data_ptr<T>(), exp_avg_sq.mutable_data_ptr<T>(),
        rows.const_data_ptr<int64_t>(), values.const_data_ptr<T>(), n, C, R, static_cast<T>(1 - beta1),
        static_cast<T>(1 - beta2), static_cast<T>(eps), static_cast<T>(-step_size));
    PME_CUDA_LAUNCH_CHECK();
  };
  if (param.scalar_type() == ScalarType::Float)
    launch(float{});
  else
    launch(double{});
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  m.impl("sparse_adam_", TORCH_BOX(&sparse_adam_));
}

}  // namespace pme::cuda
