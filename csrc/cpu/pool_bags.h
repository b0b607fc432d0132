// CPU: the lookup's pooling kernel (sum / mean over bags of one table, padded layout) as a
// function other operators call: the collection forward pools each output block with it, so a
// collection runs the same register kernels (AVX-512 / AVX2, else portable) as bag_forward.
// Defined in lookup_cpu.cpp for T in {float, double, Half, BFloat16} and I in {int32, int64}.
#pragma once

#include "cpu/validate_cpu.h"

#include <atomic>

namespace pme::cpu {

// The forward kernels (lookup_kernels.h): portable, AVX2 (+FMA, F16C), AVX-512.
enum class CpuKernel { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The forward kernel for a call: the best the CPU has, or the one PME_CPU_KERNEL names (never
// beyond what the CPU has). Reads the environment: call it once per operator call, outside the
// parallel loop, and hand the result to every task.
CpuKernel cpu_kernel();

// Pools bags [0, n) into out (bag b's t.width outputs at out + out_row(t, b): rows of t.out_stride
// entries, or a dense [n, t.width]): bag b is lookups [bo[b], bo[b + 1]) of idx (positions
// into idx, rows of table t), mode kSum or kMean, psw weights (or nullptr). A bad lookup (index
// out of range, row outside the buffer or wider than t.width) is skipped and its position noted
// in `bad` (the smallest wins); its row is never read.
// kernel: cpu_kernel() of the calling operator.
template <class T, class I>
void pool_bags(CpuKernel kernel, const T* w, const TableView& t, const I* idx, const I* bo, int64_t n, const T* psw,
               int64_t mode, T* out, std::atomic<int64_t>& bad);

}  // namespace pme::cpu
