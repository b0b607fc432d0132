// CUDA pruning operators (semantics of csrc/cpu/prune_cpu.cpp):
// - topk_threshold: the k-th largest float32 score by radix select on order-preserving uint32
//   keys: three histogram passes over the scores (bits 31..21, 20..10, 9..0), each followed by
//   a one-block kernel that picks the bucket holding the k-th largest and narrows the prefix.
//   All state stays on the device; the result is a 0-d device tensor; no host synchronisation.
// - prune_counts: per row, the number of scores >= threshold (a 0-d device tensor read by the
//   kernel); a group of up to 32 lanes per row.
// - prune_pack: one warp per row: bit-by-bit radix select of the row's size-th best score in
//   shared memory, then the kept entries are written in column order (warp ballots) or in score
//   order (rank of each kept entry among the kept ones). Ties: lower column first. The output
//   length is offsets[V], read back to the host (the output's shape depends on it).
#include "cuda/cuda_common.cuh"

#include <cub/block/block_scan.cuh>

#include <climits>

namespace pme::cuda {
namespace {

// ------------------------------------------------------------------------------------------
// topk_threshold
// ------------------------------------------------------------------------------------------
struct TopkState {
  uint32_t prefix;               // key bits fixed so far
  uint32_t mask;                 // which bits are fixed
  unsigned long long remaining;  // rank still wanted (from the top) inside the prefix
};

constexpr int kTopkThreads = 512;

// Histogram of key bits [shift, shift + BITS) over the scores whose fixed bits match the
// state's prefix (all scores in the first pass). Shared-memory histogram per block, then
// one global atomic per non-empty bin and block (integer adds: order does not matter).
template <int BITS>
__global__ void __launch_bounds__(kTopkThreads)
    topk_hist_kernel(const float* x, int64_t n, int shift, bool filter, const TopkState* st, unsigned long long* hist) {
  constexpr int NB = 1 << BITS;
  __shared__ unsigned int h[NB];
  for (int i = threadIdx.x; i < NB; i += blockDim.x) h[i] = 0;
  __syncthreads();
  const uint32_t mask = filter ? st->mask : 0u;
  const uint32_t prefix = filter ? st->prefix : 0u;
  auto add = [&](float f) {
    const uint32_t k = float_key(f);
    if ((k & mask) == prefix) atomicAdd(&h[(k >> shift) & (NB - 1)], 1u);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int64_t i = tid; i < n4; i += stride) {
      const float4 v = __ldg(x4 + i);
      add(v.x);
      add(v.y);
      add(v.z);
      add(v.w);
    }
    for (int64_t i = n4 * 4 + tid; i < n; i += stride) add(x[i]);
  } else {
    for (int64_t i = tid; i < n; i += stride) add(x[i]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < NB; i += blockDim.x) {
    if (h[i] != 0) atomicAdd(&hist[i], static_cast<unsigned long long>(h[i]));
  }
}

// One block of kSelectThreads threads: scans the histogram from the top bucket down and finds the
// bucket holding the remaining-th largest; fixes those bits. The last pass writes the result.
constexpr int kSelectThreads = 512;

template <int BITS>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(const unsigned long long* hist, int shift, bool first, int64_t k, TopkState* st, float* out,
                       bool last) {
  constexpr int NB = 1 << BITS;
  constexpr int IPT = NB >= kSelectThreads ? NB / kSelectThreads : 1;
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const unsigned long long remaining = first ? static_cast<unsigned long long>(k) : st->remaining;
  const uint32_t prefix = first ? 0u : st->prefix;
  const uint32_t mask = first ? 0u : st->mask;
  unsigned long long c[IPT], incl[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int d = threadIdx.x * IPT + i;  // d-th bucket from the top
    c[i] = d < NB ? hist[NB - 1 - d] : 0ull;
  }
  Scan(tmp).InclusiveSum(c, incl);
  __syncthreads();  // every thread has read the old state before it is rewritten
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int d = threadIdx.x * IPT + i;
    const unsigned long long excl = incl[i] - c[i];
    if (d < NB && excl < remaining && remaining <= incl[i]) {  // exactly one bucket qualifies
      const uint32_t p = prefix | (static_cast<uint32_t>(NB - 1 - d) << shift);
      st->prefix = p;
      st->mask = mask | (static_cast<uint32_t>(NB - 1) << shift);
      st->remaining = remaining - excl;
      if (last) *out = key_float(p);
    }
  }
}

Tensor topk_threshold(Tensor scores, int64_t k) {
  check_topk_args(scores, k);
  const Tensor s = torch::stable::contiguous(scores);
  const int64_t n = s.numel();
  const Ctx ctx(s);
  Workspace ws;
  const int s_h0 = ws.reserve<unsigned long long>(2048), s_h1 = ws.reserve<unsigned long long>(2048),
            s_h2 = ws.reserve<unsigned long long>(1024), s_st = ws.reserve<TopkState>(1);
  ws.allocate(s);
  unsigned long long* h0 = ws.get<unsigned long long>(s_h0);
  PME_CUDA_CHECK(cudaMemsetAsync(h0, 0, ws.get<char>(s_st) - reinterpret_cast<char*>(h0), ctx.stream));
  TopkState* st = ws.get<TopkState>(s_st);
  Tensor out = torch::stable::new_empty(s, {});
  float* o = out.mutable_data_ptr<float>();
  const float* x = s.const_data_ptr<float>();
  const unsigned grid = ctx.grid(ceil_div(n, 4), kTopkThreads, 4);
  // Pass 1: bits 31..21 (11 bits); pass 2: bits 20..10 (11 bits); pass 3: bits 9..0 (10 bits).
  topk_hist_kernel<11><<<grid, kTopkThreads, 0, ctx.stream>>>(x, n, 21, false, st, h0);
  PME_CUDA_LAUNCH_CHECK();
  topk_select_kernel<11><<<1, kSelectThreads, 0, ctx.stream>>>(h0, 21, true, k, st, o, false);
  PME_CUDA_LAUNCH_CHECK();
  topk_hist_kernel<11><<<grid, kTopkThreads, 0, ctx.stream>>>(x, n, 10, true, st, ws.get<unsigned long long>(s_h1));
  PME_CUDA_LAUNCH_CHECK();
  topk_select_kernel<11>
      <<<1, kSelectThreads, 0, ctx.stream>>>(ws.get<unsigned long long>(s_h1), 10, false, k, st, o, false);
  PME_CUDA_LAUNCH_CHECK();
  topk_hist_kernel<10><<<grid, kTopkThreads, 0, ctx.stream>>>(x, n, 0, true, st, ws.get<unsigned long long>(s_h2));
  PME_CUDA_LAUNCH_CHECK();
  topk_select_kernel<10>
      <<<1, kSelectThreads, 0, ctx.stream>>>(ws.get<unsigned long long>(s_h2), 0, false, k, st, o, true);
  PME_CUDA_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------
// prune_counts
// ------------------------------------------------------------------------------------------
// G lanes per row (G = 32 for D >= 32, else the power of two >= D).
__global__ void __launch_bounds__(256)
    prune_counts_kernel(const float* x, int64_t V, int64_t D, const float* threshold, int G, int64_t* counts) {
  const float t = *threshold;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (G - 1);
  const int rows_per_warp = kWarp / G;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w * rows_per_warp < V;
       w += nwarps) {
    const int64_t r = w * rows_per_warp + lane / G;
    int64_t cnt = 0;
    if (r < V) {
      const float* row = x + r * D;
      // NaN threshold (k above the number of non-NaN scores): everything counts; else NaN never.
      for (int64_t c = sub; c < D; c += G) cnt += (t != t) || row[c] >= t;
    }
    for (int o = G / 2; o > 0; o >>= 1) cnt += __shfl_xor_sync(kFullMask, cnt, o);
    if (sub == 0 && r < V) counts[r] = cnt;
  }
}

Tensor prune_counts(Tensor scores, Tensor threshold) {
  check_counts_args(scores, threshold);
  const Tensor s = torch::stable::contiguous(scores);
  const int64_t V = s.sizes()[0], D = s.sizes()[1];
  const Ctx ctx(s);
  Tensor counts = torch::stable::new_empty(s, {V}, ScalarType::Long);
  if (V == 0) return counts;
  if (D == 0) {
    PME_CUDA_CHECK(cudaMemsetAsync(counts.mutable_data_ptr(), 0, V * sizeof(int64_t), ctx.stream));
    return counts;
  }
  int G = 1;
  while (G < 32 && G < D) G *= 2;
  const int64_t warps = ceil_div(V, kWarp / G);
  prune_counts_kernel<<<ctx.grid(warps * kWarp, 256), 256, 0, ctx.stream>>>(
      s.const_data_ptr<float>(), V, D, threshold.const_data_ptr<float>(), G, counts.mutable_data_ptr<int64_t>());
  PME_CUDA_LAUNCH_CHECK();
  return counts;
}

// ------------------------------------------------------------------------------------------
// prune_pack
// ------------------------------------------------------------------------------------------
constexpr int64_t kPackMaxD = 4096;  // shared memory per warp: 10 * D bytes

// err[0]: 0 if offsets[0] != 0, r + 1 for the first row r whose size is outside [0, D];
// err[1]: offsets[V] (the output length).
__global__ void pack_check_kernel(const int64_t* off, int64_t V, int64_t D, unsigned long long* err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid == 0) {
    err[1] = static_cast<unsigned long long>(off[V]);
    if (off[0] != 0) atomicMin(&err[0], 0ull);
  }
  for (int64_t r = tid; r < V; r += stride) {
    if (off[r + 1] < off[r] ||
        static_cast<uint64_t>(off[r + 1]) - static_cast<uint64_t>(off[r]) > static_cast<uint64_t>(D)) {
      atomicMin(&err[0], static_cast<unsigned long long>(r + 1));
    }
  }
}

// Key of a score for the per-row selection: -0.0 counts as +0.0 (the CPU compares floats).
__device__ __forceinline__ uint32_t pack_key(float f) {
  return float_key(f == 0.0f ? 0.0f : f);
}

// One warp per row. Shared memory per warp: keys[D] (uint32), kept keys[D] (uint32), kept
// columns[D] (uint16).
template <class T>
__global__ void prune_pack_kernel(const T* dense, const float* scores, const int64_t* off, int64_t V, int64_t D,
                                  bool by_score, T* out) {
  extern __shared__ uint32_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  uint32_t* keys = smem + warp * D;
  uint32_t* kkeys = smem + (wpb + warp) * D;
  uint16_t* kcols = reinterpret_cast<uint16_t*>(smem + 2 * wpb * D) + warp * D;
  const unsigned lt = lanemask_lt();
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + warp; r < V; r += static_cast<int64_t>(gridDim.x) * wpb) {
    const int64_t lo = off[r];
    const int64_t size = off[r + 1] - lo;
    if (size <= 0 || size > D || lo < 0) continue;  // uniform in the warp
    const float* srow = scores + r * D;
    const T* drow = dense + r * D;
    T* orow = out + lo;
    for (int64_t c = lane; c < D; c += kWarp) keys[c] = pack_key(srow[c]);
    __syncwarp();

    // Keep every key > thr, and the first take_eq columns whose key == thr.
    uint32_t thr = 0;
    int64_t take_eq = size;
    if (size < D) {
      // Bit-by-bit radix select of the size-th largest key.
      uint32_t prefix = 0;
      uint32_t remaining = static_cast<uint32_t>(size);
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t hi = bit == 31 ? 0u : (0xffffffffu << (bit + 1));
        const uint32_t b = 1u << bit;
        unsigned cnt = 0;
        for (int64_t c = lane; c < D; c += kWarp) {
          const uint32_t k = keys[c];
          cnt += ((k & hi) == prefix) && (k & b);
        }
        cnt = __reduce_add_sync(kFullMask, cnt);
        if (remaining <= cnt) {
          prefix |= b;
        } else {
          remaining -= cnt;
        }
      }
      thr = prefix;
      take_eq = remaining;
    }  // size == D: thr 0 and take_eq D keep everything

    // Kept entries in column order: output slot = kept entries before this column.
    int64_t taken = 0, eq_seen = 0;
    for (int64_t c0 = 0; c0 < D; c0 += kWarp) {
      const int64_t c = c0 + lane;
      const bool in = c < D;
      const uint32_t k = in ? keys[c] : 0u;
      const bool eq = in && k == thr;
      const unsigned eqb = __ballot_sync(kFullMask, eq);
      const bool keep = (in && k > thr) || (eq && eq_seen + __popc(eqb & lt) < take_eq);
      const unsigned kb = __ballot_sync(kFullMask, keep);
      if (keep) {
        const int64_t p = taken + __popc(kb & lt);
        if (by_score) {
          kkeys[p] = k;
          kcols[p] = static_cast<uint16_t>(c);
        } else {
          orow[p] = drow[c];
        }
      }
      taken += __popc(kb);
      eq_seen += __popc(eqb);
    }
    if (by_score) {
      // Best first: rank = kept entries with a larger key, or an equal key and a lower column
      // (the kept list is in column order).
      __syncwarp();
      for (int64_t p = lane; p < size; p += kWarp) {
        const uint32_t k = kkeys[p];
        int64_t rank = 0;
        for (int64_t q = 0; q < size; ++q) {
          const uint32_t kq = kkeys[q];
          rank += (kq > k) || (kq == k && q < p);
        }
        orow[rank] = drow[kcols[p]];
      }
    }
    __syncwarp();  // before the next row overwrites the shared arrays
  }
}

Tensor prune_pack(Tensor dense, Tensor scores, Tensor offsets, bool by_score) {
  check_pack_args(dense, scores, offsets);
  const int64_t V = dense.sizes()[0], D = dense.sizes()[1];
  PME_CHECK(D <= kPackMaxD, "prune_pack on CUDA supports rows of at most ", kPackMaxD, " entries, got D = ", D);
  const Ctx ctx(dense);
  PME_CHECK(!ctx.capturing(), "prune_pack reads its output length back to the host and cannot be captured in a ",
            "CUDA graph");
  const int64_t* off = offsets.const_data_ptr<int64_t>();

  // Validate the offsets and read the output length (one synchronisation: the output's shape
  // depends on device data, so this operator cannot be captured in a CUDA graph anyway).
  Tensor err_t = torch::stable::new_empty(offsets, {2});
  auto* err = static_cast<unsigned long long*>(err_t.mutable_data_ptr());
  PME_CUDA_CHECK(cudaMemsetAsync(err, 0xff, 2 * sizeof(unsigned long long), ctx.stream));
  pack_check_kernel<<<ctx.grid(std::max<int64_t>(V, 1), 256), 256, 0, ctx.stream>>>(off, V, D, err);
  PME_CUDA_LAUNCH_CHECK();
  unsigned long long h[2];
  read_device(ctx, h, err, 2);
  if (h[0] != ULLONG_MAX) {
    PME_CHECK(h[0] != 0, "offsets[0] must be 0");
    const int64_t r = static_cast<int64_t>(h[0]) - 1;
    int64_t o[2];
    read_device(ctx, o, off + r, 2);
    PME_CHECK(false, "row ", r, " has size ", o[1] - o[0], ", outside [0, D = ", D, "]");
  }
  const int64_t total = static_cast<int64_t>(h[1]);

  const Tensor d = torch::stable::contiguous(dense);
  const Tensor s = torch::stable::contiguous(scores);
  Tensor out = torch::stable::new_empty(d, {total});
  if (total == 0 || V == 0) return out;
  const int wpb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, (48 * 1024) / (10 * D))));
  const size_t smem = static_cast<size_t>(wpb) * 10 * D;
  const unsigned grid = ctx.grid(V * kWarp, wpb * kWarp, 2048 / (wpb * kWarp));
  dispatch_weight(d.scalar_type(), "dense", [&](auto tag) {
    using T = decltype(tag);
    prune_pack_kernel<T><<<grid, wpb * kWarp, smem, ctx.stream>>>(d.const_data_ptr<T>(), s.const_data_ptr<float>(), off,
                                                                  V, D, by_score, out.mutable_data_ptr<T>());
    PME_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CUDA, m) {
  PME_REGISTER_PRUNE(m);
}

}  // namespace pme::cuda
