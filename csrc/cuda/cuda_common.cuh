// CUDA helpers shared by every pme CUDA kernel file: device guard + current stream, error
// checks, one-allocation workspaces, dtype conversion, 16-byte vector packs, warp reductions.
// Stable ABI only: tensors are torch::stable::Tensor, the stream comes from the AOTI shim, all
// scratch memory is a torch tensor (the caching allocator, stream-ordered), never cudaMalloc.
#pragma once

#include "pme.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace pme::cuda {
// Internal linkage: every .cu file gets its own copy of these helpers and kernels (no ODR
// questions between translation units).
namespace {

#define PME_CUDA_CHECK(expr)                                                                                          \
  do {                                                                                                                \
    const cudaError_t pme_err_ = (expr);                                                                              \
    PME_CHECK(pme_err_ == cudaSuccess, "CUDA error ", cudaGetErrorName(pme_err_), ": ", cudaGetErrorString(pme_err_), \
              " (", #expr, ")");                                                                                      \
  } while (0)

// After every launch: reports bad launch configurations at once (does not synchronise).
#define PME_CUDA_LAUNCH_CHECK() PME_CUDA_CHECK(cudaGetLastError())

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------
// Device + stream of one operator call
// ------------------------------------------------------------------------------------------
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    PME_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(n, 1);
  }
  return cache[device];
}

// Makes the tensor's device current for the call (restored on exit) and fetches torch's
// current stream on it: every kernel of the call is launched there, nothing synchronises
// the host except the explicit validation step (see validate_cuda.cuh).
struct Ctx {
  torch::stable::accelerator::DeviceGuard guard;
  int device;
  cudaStream_t stream;
  int sms;

  explicit Ctx(const Tensor& t) : guard(t.get_device_index()), device(t.get_device_index()) {
    PME_CHECK(t.is_cuda(), "expected a CUDA tensor");
    void* s = nullptr;
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &s));  // the 2.10 name
    stream = static_cast<cudaStream_t>(s);
    sms = sm_count(device);
  }

  // Whether the stream is being captured into a CUDA graph (no host synchronisation allowed).
  // An error from the query (e.g. the legacy stream while another thread captures globally)
  // also counts as capturing: the caller then skips its synchronisation.
  bool capturing() const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &st) != cudaSuccess) {
      (void)cudaGetLastError();
      return true;
    }
    return st != cudaStreamCaptureStatusNone;
  }

  // Blocks for a grid-stride kernel: enough to fill the GPU, no more than the work needs.
  unsigned grid(int64_t work_items, int threads_per_block, int blocks_per_sm = 8) const {
    const int64_t need = (work_items + threads_per_block - 1) / threads_per_block;
    const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
    return static_cast<unsigned>(std::max<int64_t>(1, std::min(need, cap)));
  }
};

// Copies n elements device -> host on the call's stream and waits (error paths and the few
// places where a shape depends on device data).
template <class V>
void read_device(const Ctx& ctx, V* host, const V* dev, int64_t n = 1) {
  PME_CUDA_CHECK(cudaMemcpyAsync(host, dev, sizeof(V) * n, cudaMemcpyDeviceToHost, ctx.stream));
  PME_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

// ------------------------------------------------------------------------------------------
// Workspace: several scratch arrays carved from one uint8 tensor (one allocator call).
// ------------------------------------------------------------------------------------------
class Workspace {
 public:
  // Reserves room for n elements of V; returns the slot number to pass to get().
  template <class V>
  int reserve(int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(V);
    offsets_.push_back(total_);
    total_ += (bytes + 255) / 256 * 256;
    return static_cast<int>(offsets_.size()) - 1;
  }
  int reserve_bytes(size_t bytes) { return reserve<unsigned char>(static_cast<int64_t>(bytes)); }

  // Allocates everything reserved so far on the device of `like`.
  void allocate(const Tensor& like) {
    buf_ = torch::stable::new_empty(like, {static_cast<int64_t>(std::max<size_t>(total_, 256))}, ScalarType::Byte);
    base_ = static_cast<char*>(buf_.mutable_data_ptr());
  }

  template <class V>
  V* get(int slot) const {
    return reinterpret_cast<V*>(base_ + offsets_[slot]);
  }

 private:
  std::vector<size_t> offsets_;
  size_t total_ = 0;
  Tensor buf_;
  char* base_ = nullptr;
};

// ------------------------------------------------------------------------------------------
// Numbers
// ------------------------------------------------------------------------------------------
template <class T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}
template <>
__device__ __forceinline__ float to_acc<c10::Half>(c10::Half x) {
  return __half2float(__ushort_as_half(x.x));
}
template <>
__device__ __forceinline__ float to_acc<c10::BFloat16>(c10::BFloat16 x) {
  return __bfloat162float(__ushort_as_bfloat16(x.x));
}

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half>(float x) {
  return c10::Half(__half_as_ushort(__float2half_rn(x)), c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16>(float x) {
  return c10::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(x)), c10::BFloat16::from_bits());
}

// 1 / x, correctly rounded (equal to the IEEE division 1 / x).
__device__ __forceinline__ float recip_rn(float x) {
  return __frcp_rn(x);
}
__device__ __forceinline__ double recip_rn(double x) {
  return __drcp_rn(x);
}

// 16 bytes of T: the unit of vectorised loads and stores.
template <class T>
struct alignas(16) Pack {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  T v[N];
};

// Zero of a storage type (for fp16 / bf16: the bit pattern, no conversion at run time).
template <class T>
__device__ __forceinline__ T zero_value() {
  return T(0);
}
template <>
__device__ __forceinline__ c10::Half zero_value<c10::Half>() {
  return c10::Half(0, c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 zero_value<c10::BFloat16>() {
  return c10::BFloat16(0, c10::BFloat16::from_bits());
}

template <class T>
__device__ __forceinline__ void zero_pack(Pack<T>& x) {
  *reinterpret_cast<uint4*>(&x) = make_uint4(0u, 0u, 0u, 0u);
}

template <class T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {  // p must be 16-byte aligned
  Pack<T> out;
  *reinterpret_cast<uint4*>(&out) = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {  // p must be 16-byte aligned
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&x);
}

// Sum over the 32 lanes of a warp, in a fixed butterfly order: deterministic, and every
// lane ends with the same value (each step adds two operands that commute exactly).
template <class V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Order-preserving map float -> uint32 (larger float, larger key); the CPU kernels use the same.
// Every NaN (either sign bit) maps to 0: below -inf, so a NaN score is never kept over a number.
__device__ __forceinline__ uint32_t float_key(float f) {
  if (f != f) return 0u;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return __uint_as_float(u);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace
}  // namespace pme::cuda
