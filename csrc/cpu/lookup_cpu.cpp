// CPU lookup operators: pooled (bag_forward / bag_backward) and non-pooled
// (embedding_forward / embedding_backward) over a flat multi-size table.
// Forward: one task per range of bags, fp32 (fp64 for fp64 weights) accumulation; the common
// case (sum/mean, padded layout, fp32/fp16/bf16, width <= 256) runs a kernel that keeps the bag's
// sums in registers, AVX-512 or AVX2 (+FMA, F16C) as the CPU has them, everything else (and a CPU
// with neither) a portable kernel: one file each (lookup_kernels.h), chosen here once per call.
// Backward: lookups grouped by row (row_groups.h), one task per row: deterministic.
#include "cpu/lookup_kernels.h"
#include "cpu/pool_bags.h"
#include "cpu/row_groups.h"
#include "cpu/validate_cpu.h"
#include "lookup_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pme::cpu {
namespace {

#if PME_HAVE_SIMD_KERNELS
// __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi") &&
                         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

}  // namespace

// The forward kernel for this call: the best the CPU has (AVX-512, else AVX2, else portable).
// PME_CPU_KERNEL=avx512 / avx2 / generic forces one (read once per call, before the parallel
// loop; the tests use it), but never
// beyond what the CPU has: a forced kernel the CPU lacks falls back to the best one it has
// (avx512 on an AVX2-only CPU runs AVX2; avx2 or avx512 without AVX2 run the portable kernel),
// so no setting can execute an unsupported instruction. Any other value means the default.
CpuKernel cpu_kernel() {
#if PME_HAVE_SIMD_KERNELS
  const CpuKernel best = cpu_has_avx512() ? CpuKernel::kAvx512
                         : cpu_has_avx2() ? CpuKernel::kAvx2
                                          : CpuKernel::kGeneric;
  const char* force = std::getenv("PME_CPU_KERNEL");
  if (force == nullptr) return best;
  CpuKernel want = best;
  if (std::strcmp(force, "generic") == 0)
    want = CpuKernel::kGeneric;
  else if (std::strcmp(force, "avx2") == 0)
    want = CpuKernel::kAvx2;
  else if (std::strcmp(force, "avx512") == 0)
    want = CpuKernel::kAvx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
#else
  return CpuKernel::kGeneric;
#endif
}

namespace {

// Whether the weights psw[j0, j1) are all finite: the register kernels multiply whole 64-byte
// steps, so a non-finite weight would turn the zero lanes past a row into NaN; a run with one goes
// to the portable kernel, which scales the row's stored entries only (as the CUDA kernels and the
// collection's one-hot copy do). Raw bits, an OR over a branch-free test: vectorised, no call.
template <class T>
bool weights_finite(const T* psw, int64_t j0, int64_t j1) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, std::conditional_t<sizeof(T) == 8, uint64_t, uint16_t>>;
  constexpr Bits kExp = sizeof(T) == 4                     ? Bits(0x7F800000u)
                        : sizeof(T) == 8                   ? Bits(0x7FF0000000000000ull)
                        : std::is_same_v<T, c10::BFloat16> ? Bits(0x7F80u)
                                                           : Bits(0x7C00u);
  const auto* bits = reinterpret_cast<const Bits*>(psw);
  bool bad = false;
  for (int64_t j = j0; j < j1; ++j) bad |= (bits[j] & kExp) == kExp;
  return !bad;
}

// The one dispatch point of the forward kernels: bags [b0, b1) with the kernel chosen for the
// call (cpu_kernel(), read once per call): a register kernel where one serves (sum / mean,
// padded layout, width 1..256, not fp64), else the portable one. Each lookup is checked before
// its row is read (index in range, row inside the buffer and the width); the first bad position
// goes to `bad` and the lookup is skipped, so a bad input never reads out of bounds; the caller
// then throws.
template <class T, class I>
void bag_forward_range(CpuKernel kernel, const T* w, const TableView& t, const I* idx, const I* bo, int64_t b0,
                       int64_t b1, const T* psw, int64_t mode, int64_t pad, T* out, int64_t* argmax,
                       std::atomic<int64_t>& bad) {
#if PME_HAVE_SIMD_KERNELS
  if constexpr (!std::is_same_v<T, double>) {
    if (kernel != CpuKernel::kGeneric && mode != kMax && t.col_of_size == nullptr && t.width >= 1 && t.width <= 256) {
      // Runs of bags of at least kCheckRun lookups (the indices stay in cache between the two
      // passes): their indices checked in one vectorised pass, then the register kernel, which
      // tests only the spans; a run with a bad index goes to the portable kernel, which finds it,
      // and so does a run with a non-finite weight (weights_finite).
      constexpr int64_t kCheckRun = 4096;
      for (int64_t c0 = b0; c0 < b1;) {
        const int64_t j0 = bag_begin(bo, c0);
        const int64_t c1 = bo ? std::upper_bound(bo + c0 + 1, bo + b1, static_cast<I>(j0 + kCheckRun)) - bo
                              : std::min(b1, c0 + kCheckRun);
        if (!indices_in_range(idx, j0, bag_begin(bo, c1), t.num_rows) ||
            (psw != nullptr && !weights_finite(psw, j0, bag_begin(bo, c1))))
          bag_forward_generic(w, t, idx, bo, c0, c1, psw, mode, pad, out, argmax, bad);
        else if (kernel == CpuKernel::kAvx512)
          bag_sum_avx512(w, t, idx, bo, c0, c1, psw, mode == kMean, pad, out, bad);
        else
          bag_sum_avx2(w, t, idx, bo, c0, c1, psw, mode == kMean, pad, out, bad);
        c0 = c1;
      }
      return;
    }
  }
#endif
  bag_forward_generic(w, t, idx, bo, b0, b1, psw, mode, pad, out, argmax, bad);
}

std::tuple<Tensor, Tensor> lookup_forward(const Tensor& weight, const Tensor& offsets, const Tensor& indices,
                                          const std::optional<Tensor>& bag_offsets,
                                          const std::optional<Tensor>& per_sample_weights,
                                          const std::optional<Tensor>& col_of_size, int64_t out_width, int64_t mode,
                                          int64_t padding_idx, bool table_checked) {
  const LookupArgs a =
      check_lookup_args(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, mode, padding_idx);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  const TableView tv = make_table(weight, offsets, col_of_size, out_width, table_checked);

  Tensor out = new_output(weight, a.num_bags, out_width, "the output [bags, out_width]");
  Tensor argmax =
      new_output(offsets, mode == kMax ? a.num_bags : 0, mode == kMax ? out_width : 0, "argmax [bags, out_width]");
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const I* idx = indices.const_data_ptr<I>();
    const I* bo = bag_offsets ? bag_offsets->const_data_ptr<I>() : nullptr;
    validate_table(tv);
    validate_bag_offsets(bo, a.num_bags, a.num_lookups);
    // Indices past the last bag are never read, but are checked as the backward (and the CUDA
    // validation) check them: one rule for what a valid call is.
    for (int64_t j = bo ? static_cast<int64_t>(bo[a.num_bags]) : a.num_lookups; j < a.num_lookups; ++j) {
      if (static_cast<uint64_t>(static_cast<int64_t>(idx[j])) >= static_cast<uint64_t>(a.num_rows)) {
        report_bad_lookup(idx, j, tv);
      }
    }
    std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const T* w = weight.const_data_ptr<T>();
      const T* psw = per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr;
      T* o = out.mutable_data_ptr<T>();
      int64_t* am = mode == kMax ? argmax.mutable_data_ptr<int64_t>() : nullptr;
      const CpuKernel kernel = cpu_kernel();  // getenv once per call, not per chunk
      torch::stable::parallel_for(0, a.num_bags, 64, [&](int64_t b0, int64_t b1) {
        bag_forward_range<T, I>(kernel, w, tv, idx, bo, b0, b1, psw, mode, padding_idx, o, am, bad);
      });
    });
    if (bad.load() != std::numeric_limits<int64_t>::max()) report_bad_lookup(idx, bad.load(), tv);
  });
  return {out, argmax};
}

std::tuple<Tensor, Tensor> lookup_backward(const Tensor& grad_out, const Tensor& weight, const Tensor& offsets,
                                           const Tensor& indices, const std::optional<Tensor>& bag_offsets,
                                           const std::optional<Tensor>& per_sample_weights,
                                           const std::optional<Tensor>& col_of_size, const Tensor& argmax, int64_t mode,
                                           int64_t padding_idx, bool psw_grad, bool table_checked) {
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  const int64_t N = indices.numel();
  Tensor grad_w = torch::stable::new_zeros(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_empty(weight, {psw_grad ? N : 0});
  with_grouped_batch(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
                     padding_idx, table_checked, [&](const auto& in, const RowGroups& groups) {
                       using T = typename std::decay_t<decltype(in)>::value_type;
                       using A = acc_t<T>;
                       const int64_t* off = in.offsets;
                       T* gw = grad_w.mutable_data_ptr<T>();
                       for_each_row_gradient(in, groups, [&](int64_t, int64_t r, const A* g) {
                         T* dst = gw + off[r];
                         for (int64_t c = 0, n = off[r + 1] - off[r]; c < n; ++c) dst[c] = static_cast<T>(g[c]);
                       });
                       if (psw_grad) {
                         T* gp = grad_psw.mutable_data_ptr<T>();
                         torch::stable::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
                           for (int64_t j = j0; j < j1; ++j) {
                             const int64_t r = in.idx[j], b = groups.bag_of[j];
                             if (b < 0 || r == padding_idx) {
                               gp[j] = T(0);
                               continue;
                             }
                             const int64_t size = off[r + 1] - off[r];
                             const int64_t col = in.col_of_size ? in.col_of_size[size] : 0;
                             const T* row = in.weight + off[r];
                             const T* g = in.grad_out + b * in.W + col;
                             A dot = 0;
                             for (int64_t c = 0; c < size; ++c) dot += static_cast<A>(row[c]) * static_cast<A>(g[c]);
                             gp[j] = static_cast<T>(dot);
                           }
                         });
                       }
                     });
  return {grad_w, grad_psw};
}

using Ops = LookupOps<&lookup_forward, &lookup_backward>;

}  // namespace

// The pooling kernel for other operators (pool_bags.h).
template <class T, class I>
void pool_bags(CpuKernel kernel, const T* w, const TableView& t, const I* idx, const I* bo, int64_t n, const T* psw,
               int64_t mode, T* out, std::atomic<int64_t>& bad) {
  bag_forward_range<T, I>(kernel, w, t, idx, bo, 0, n, psw, mode, -1, out, nullptr, bad);
}

#define PME_POOL_BAGS(T, I)                                                                                            \
  template void pool_bags<T, I>(CpuKernel, const T*, const TableView&, const I*, const I*, int64_t, const T*, int64_t, \
                                T*, std::atomic<int64_t>&)
PME_ALL_TYPES(PME_POOL_BAGS);
#undef PME_POOL_BAGS

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  PME_REGISTER_LOOKUPS(m, Ops);
}

}  // namespace pme::cpu
