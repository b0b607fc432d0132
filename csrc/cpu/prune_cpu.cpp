// CPU pruning operators: the global top-k threshold by radix select (two 16-bit histogram
// passes, no sort), per-row survivor counts, and packing the kept entries of each row.
#include "pme.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace pme::cpu {
namespace {

// Order-preserving map of a float to uint32 (larger float -> larger key). The order of scores
// (README, Safety): NaN, whatever its sign bit and payload, is below every other value, -inf
// included; all NaNs map to key 0, so a NaN is never kept over a number.
inline uint32_t float_key(float f) {
  if (f != f) return 0u;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Whether score a ranks above score b in that order (NaN lowest, NaNs equal).
inline bool score_above(float a, float b) {
  return b != b ? a == a : a > b;
}

inline float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Histogram of 16 key bits (shift) over entries whose high bits equal prefix under mask.
std::vector<int64_t> histogram16(const float* x, int64_t n, int shift, uint32_t mask, uint32_t prefix) {
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(n / (1 << 16) + 1, 4 * torch::stable::get_num_threads()));
  std::vector<std::vector<int64_t>> part(chunks);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<int64_t>& h = part[c];
      h.assign(1 << 16, 0);
      const int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t k = float_key(x[i]);
        if ((k & mask) == prefix) ++h[(k >> shift) & 0xffffu];
      }
    }
  });
  std::vector<int64_t> h(1 << 16, 0);
  for (const auto& p : part) {
    for (int i = 0; i < (1 << 16); ++i) h[i] += p[i];
  }
  return h;
}

Tensor topk_threshold(Tensor scores, int64_t k) {
  check_topk_args(scores, k);
  const Tensor s = torch::stable::contiguous(scores);
  const int64_t n = s.numel();
  const float* x = s.const_data_ptr<float>();
  // Find the key of the k-th largest: bucket by the high 16 bits, then the low 16 bits.
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;  // rank still wanted, counted from the top, inside the current prefix
  for (int shift : {16, 0}) {
    const std::vector<int64_t> h = histogram16(x, n, shift, mask, prefix);
    int64_t bucket = 0xffff;
    for (; bucket > 0; --bucket) {
      if (remaining <= h[bucket]) break;
      remaining -= h[bucket];
    }
    prefix |= static_cast<uint32_t>(bucket) << shift;
    mask |= 0xffffu << shift;
  }
  Tensor out = torch::stable::new_empty(s, {});
  *out.mutable_data_ptr<float>() = key_float(prefix);
  return out;
}

Tensor prune_counts(Tensor scores, Tensor threshold) {
  check_counts_args(scores, threshold);
  const Tensor s = torch::stable::contiguous(scores);
  const int64_t V = s.sizes()[0], D = s.sizes()[1];
  const float t = *threshold.const_data_ptr<float>();
  const float* x = s.const_data_ptr<float>();
  Tensor counts = torch::stable::new_empty(s, {V}, ScalarType::Long);
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  torch::stable::parallel_for(0, V, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t n = 0;
      // x >= t in that order: a NaN threshold (k above the number of non-NaN scores) keeps
      // everything; otherwise NaN never survives (NaN >= t is false).
      if (t != t)
        n = D;
      else
        for (int64_t j = 0; j < D; ++j) n += x[r * D + j] >= t;
      c[r] = n;
    }
  });
  return counts;
}

Tensor prune_pack(Tensor dense, Tensor scores, Tensor offsets, bool by_score) {
  check_pack_args(dense, scores, offsets);
  const int64_t V = dense.sizes()[0], D = dense.sizes()[1];
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  PME_CHECK(off[0] == 0, "offsets[0] must be 0");
  for (int64_t r = 0; r < V; ++r) {  // in order: offsets[r] >= 0 here, so the difference is exact
    PME_CHECK(off[r + 1] >= off[r] && off[r + 1] - off[r] <= D, "row ", r, " has size ", off[r + 1] - off[r],
              ", outside [0, D = ", D, "]");
  }
  const Tensor d = torch::stable::contiguous(dense);
  const Tensor s = torch::stable::contiguous(scores);
  Tensor out = torch::stable::new_empty(d, {off[V]});
  const float* sc = s.const_data_ptr<float>();
  dispatch_weight(d.scalar_type(), "dense", [&](auto tag) {
    using T = decltype(tag);
    const T* x = d.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, V, 256, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> cols(D);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t size = off[r + 1] - off[r];
        if (size == 0) continue;
        const float* row = sc + r * D;
        std::iota(cols.begin(), cols.end(), int64_t{0});
        // Best first (NaN lowest); ties keep the lower column (a total order: deterministic).
        auto better = [&](int64_t a, int64_t b) {
          return score_above(row[a], row[b]) || (!score_above(row[b], row[a]) && a < b);
        };
        std::partial_sort(cols.begin(), cols.begin() + size, cols.end(), better);
        if (!by_score) std::sort(cols.begin(), cols.begin() + size);
        for (int64_t j = 0; j < size; ++j) o[off[r] + j] = x[r * D + cols[j]];
      }
    });
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  PME_REGISTER_PRUNE(m);
}

}  // namespace pme::cpu
