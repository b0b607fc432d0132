// CPU collection operators (normal form in csrc/collection.h): all output blocks of a batch in
// one call over one flat buffer.
// Forward: one task per range of (block, sample) pairs; each block's bags are pooled by the
// lookup's own kernels (pool_bags.h: AVX-512 / AVX2 registers, fp32 accumulation, fp64 for fp64)
// into the block's output columns; a run of one-hot bags is copied straight there (copy_one_hot).
// Backward and fused update: every (block, lookup) pair becomes a lookup of a global row
// (table_rows[t] + index), grouped by row with row_groups.h, one task per row: deterministic,
// each row's duplicates (across samples, and across blocks sharing a table) summed first.
#include "collection.h"
#include "cpu/pool_bags.h"
#include "cpu/row_groups.h"
#include "cpu/row_step.h"
#include "cpu/validate_cpu.h"

#if defined(__x86_64__)
#include <xmmintrin.h>  // streaming stores (SSE, in every x86-64 CPU)
#define PME_STREAM_STORES 1
#else
#define PME_STREAM_STORES 0
#endif

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pme::cpu {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// Everything the kernels read, as raw pointers, after the argument checks.
template <class I>
struct View {
  const int64_t* off;  // [V + 1]
  int64_t V, total;
  const int64_t* rows;  // table_rows [T + 1]
  const int64_t* feat;  // [F, 5]
  int64_t F, B, N;
  const I* idx;  // [N]
  const I* bo;   // [G * B + 1]
  int64_t out_width;

  const int64_t* block(int64_t k) const { return feat + k * kFFields; }
  // Lookups of block k, sample b: [s, e).
  void bag(int64_t k, int64_t b, int64_t& s, int64_t& e) const {
    const int64_t g = block(k)[kFKey];
    s = static_cast<int64_t>(bo[g * B + b]);
    e = static_cast<int64_t>(bo[g * B + b + 1]);
  }
  // Global row of lookup j in block k, or -1 when the lookup is bad (index out of its table's
  // range, or the row's span outside the buffer or wider than the block).
  int64_t row(const int64_t* f, int64_t j, int64_t& lo, int64_t& size) const {
    const int64_t t = f[kFTable];
    const int64_t base = rows[t], vt = rows[t + 1] - base;
    const int64_t i = static_cast<int64_t>(idx[j]);
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(vt)) return -1;  // also i < 0
    const int64_t r = base + i;
    lo = off[r];
    const int64_t hi = off[r + 1];
    size = hi - lo;
    if (!(size >= 0 && lo >= 0 && hi <= total && size <= f[kFWidth])) return -1;
    return r;
  }
};

inline void note_bad(std::atomic<int64_t>& bad, int64_t j) {
  int64_t cur = bad.load();
  while (j < cur && !bad.compare_exchange_weak(cur, j)) {
  }
}

// Throws the message for the first bad lookup position j (found by a kernel).
template <class I>
[[noreturn]] void report_bad(const View<I>& v, int64_t j) {
  for (int64_t k = 0; k < v.F; ++k) {
    const int64_t* f = v.block(k);
    const int64_t g = f[kFKey];
    if (j < static_cast<int64_t>(v.bo[g * v.B]) || j >= static_cast<int64_t>(v.bo[g * v.B + v.B])) continue;
    int64_t lo, size;
    if (v.row(f, j, lo, size) >= 0) continue;
    const int64_t t = f[kFTable], vt = v.rows[t + 1] - v.rows[t], i = static_cast<int64_t>(v.idx[j]);
    PME_CHECK(i >= 0 && i < vt, "index out of range: indices[", j, "] = ", i, " (key ", g, ", output block ", k,
              ") but table ", t, " has ", vt, " rows (", valid_rows(vt), ")");
    const int64_t r = v.rows[t] + i;
    PME_CHECK(false, "row ", i, " of table ", t, " (global row ", r, ", indices[", j, "]) spans offsets[", r,
              "] = ", v.off[r], " to offsets[", r + 1, "] = ", v.off[r + 1], ": ",
              span_fault(v.off[r], v.off[r + 1], v.total, f[kFWidth], "the table's width"));
  }
  PME_CHECK(false, "bad lookup at indices[", j, "]");
  throw std::runtime_error("unreachable");
}

// Argument checks shared by the three operators; returns the raw view.
int64_t max_width(const int64_t* feat, int64_t F) {
  int64_t m = 1;
  for (int64_t k = 0; k < F; ++k) m = std::max(m, feat[k * kFFields + kFWidth]);
  return m;
}

template <class I>
View<I> make_view(const CollectionArgs& a, const Tensor& weight, const Tensor& offsets, const Tensor& table_rows,
                  const Tensor& features, const Tensor& indices, const Tensor& bag_offsets, int64_t out_width,
                  bool weighted, bool table_checked) {
  const View<I> v{offsets.const_data_ptr<int64_t>(),
                  a.num_rows,
                  weight.numel(),
                  table_rows.const_data_ptr<int64_t>(),
                  features.const_data_ptr<int64_t>(),
                  a.num_blocks,
                  a.batch,
                  a.num_lookups,
                  indices.const_data_ptr<I>(),
                  bag_offsets.const_data_ptr<I>(),
                  out_width};
  check_collection_meta(v.rows, v.feat, a, out_width, weighted);
  // The whole offset table (start 0, non-decreasing: no two rows share entries, end = total;
  // sizes within the widest table: each lookup is checked against its own table's width), then
  // the bag offsets (start 0, non-decreasing, inside the input).
  validate_table(TableView{v.off, v.V, v.total, nullptr, 0, max_width(v.feat, v.F), table_checked});
  validate_bag_offsets(v.bo, a.num_keys * a.batch, a.num_lookups);
  return v;
}

// Checks every lookup of every block (one parallel pass); throws naming the first bad one.
template <class I>
void validate_all(const View<I>& v) {
  std::atomic<int64_t> bad{kNone};
  torch::stable::parallel_for(0, v.F * v.B, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k = p / v.B, b = p % v.B;
      const int64_t* f = v.block(k);
      int64_t s, e, lo, size;
      v.bag(k, b, s, e);
      for (int64_t j = s; j < e; ++j) {
        if (v.row(f, j, lo, size) < 0) {
          note_bad(bad, j);
          break;
        }
      }
    }
  });
  if (bad.load() != kNone) report_bad(v, bad.load());
}

// Forward over pairs [p0, p1) (pair p = block p / B, sample p % B): each run of pairs of one
// block is pooled by the lookup's kernel (pool_bags.h) on that block's table, straight into the
// block's output columns (an output row stride of the whole output's width: no pooling buffer and
// no second copy, 7% off the 20-hot forward of benchmarks/bench_collection.py on 1 thread). A bad
// lookup is noted and skipped before its row is read; the caller throws.
constexpr int64_t kRun = 64;

// Outputs of at least this many bytes are written by streaming stores in the one-hot copy: far
// larger than a core's L2, where the cache's read of each output line before it is written costs
// more than the next layer's read from memory instead of cache (the 26-feature one-hot batch of
// benchmarks/bench_collection.py, 13.6 MB: forward 10% faster on 1 thread, forward + a sum of
// the output 3% faster; 2 threads 7% and 7%).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Bags [b0, b1) of block f (at most kRun of them) when each holds at most one lookup (a one-hot
// feature): the pooled row is the row itself (sum or mean of one; times its weight), so it is
// copied straight into the output columns, zero-padded to the block's width: no pooling buffer,
// no second copy. Three passes, so that the memory system has many misses in flight: the first
// prefetches every lookup's offsets (a prefetch retires at once, a load that misses holds the
// reorder buffer), the second checks every lookup and reads its row's span and prefetches the
// row, the third copies. Per entry the result equals the pooling kernel's: one product, rounded
// once, in acc_t<T>. With `stream` (fp32, an output too large to stay in cache, see
// kStreamBytes) the unweighted rows are written with streaming stores, whole 16-byte pieces
// that skip the read the cache would make of each output line first; the caller fences.
template <class T, class I>
void copy_one_hot(const View<I>& v, const int64_t* f, const T* w, const T* psw, int64_t b0, int64_t b1, T* out,
                  bool stream, std::atomic<int64_t>& bad) {
  using A = acc_t<T>;
  const int64_t W = f[kFWidth], col = f[kFCol];
  const I* bo = v.bo + f[kFKey] * v.B;
  int64_t lo[kRun], size[kRun];  // size -1: nothing to copy (empty bag, or a bad lookup)
  {
    const int64_t t = f[kFTable], base = v.rows[t], vt = v.rows[t + 1] - base;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = static_cast<int64_t>(bo[b]);
      if (static_cast<int64_t>(bo[b + 1]) == s) continue;  // empty: s may be N
      const int64_t i = static_cast<int64_t>(v.idx[s]);
      if (static_cast<uint64_t>(i) < static_cast<uint64_t>(vt)) __builtin_prefetch(v.off + base + i);
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    int64_t& l = lo[b - b0];
    int64_t& n = size[b - b0];
    n = -1;
    const int64_t s = static_cast<int64_t>(bo[b]);
    if (static_cast<int64_t>(bo[b + 1]) == s) continue;
    if (v.row(f, s, l, n) < 0) {
      note_bad(bad, s);  // never read; the caller throws
      n = -1;
      continue;
    }
    __builtin_prefetch(w + l);
    if (n > 0) __builtin_prefetch(w + l + n - 1);
  }
  for (int64_t b = b0; b < b1; ++b) {
    T* o = out + b * v.out_width + col;
    const int64_t l = lo[b - b0], n = std::max<int64_t>(size[b - b0], 0);
#if PME_STREAM_STORES
    if constexpr (std::is_same_v<T, float>) {
      if (stream && psw == nullptr && W <= 256 && W % 4 == 0 && reinterpret_cast<uintptr_t>(o) % 16 == 0) {
        alignas(16) float row[256];
        if (n > 0) std::memcpy(row, w + l, static_cast<size_t>(n) * sizeof(float));
        std::fill(row + n, row + W, 0.0f);
        for (int64_t c = 0; c < W; c += 4) _mm_stream_ps(o + c, _mm_load_ps(row + c));
        continue;
      }
    }
#endif
    if (n > 0 && psw != nullptr) {
      const A sc = static_cast<A>(psw[bo[b]]);
      for (int64_t c = 0; c < n; ++c) o[c] = static_cast<T>(static_cast<A>(w[l + c]) * sc);
    } else if (n > 0) {
      std::memcpy(o, w + l, static_cast<size_t>(n) * sizeof(T));
    }
    std::fill(o + n, o + W, T(0));
  }
}

template <class T, class I>
void forward_range(CpuKernel kernel, const View<I>& v, const T* w, const T* psw, int64_t p0, int64_t p1, T* out,
                   bool stream, std::atomic<int64_t>& bad) {
  for (int64_t p = p0; p < p1;) {
    const int64_t k = p / v.B, b0 = p % v.B;
    const int64_t b1 = std::min<int64_t>({v.B, b0 + (p1 - p), b0 + kRun});
    const int64_t* f = v.block(k);
    const int64_t t = f[kFTable], W = f[kFWidth], base = v.rows[t];
    const I* fbo = v.bo + f[kFKey] * v.B;
    bool one_hot = true;
    for (int64_t b = b0; b < b1 && one_hot; ++b) one_hot = fbo[b + 1] - fbo[b] <= 1;
    if (one_hot) {
      copy_one_hot<T, I>(v, f, w, psw, b0, b1, out, stream, bad);
      p += b1 - b0;
      continue;
    }
    // The table as the lookup kernel sees it: its own rows, offsets into the global buffer, and
    // bag b's output at the block's columns of output row b.
    const TableView tv{v.off + base, v.rows[t + 1] - base, v.total, nullptr, 0, W, false, v.out_width};
    T* o = out + b0 * v.out_width + f[kFCol];
    pool_bags<T, I>(kernel, w, tv, v.idx, v.bo + f[kFKey] * v.B + b0, b1 - b0, psw, f[kFPooling], o, bad);
    p += b1 - b0;
  }
}

Tensor collection_forward(Tensor weight, Tensor offsets, Tensor table_rows, Tensor features, Tensor indices,
                          Tensor bag_offsets, std::optional<Tensor> per_sample_weights, int64_t batch_size,
                          int64_t out_width, bool table_checked) {
  const CollectionArgs a = check_collection_args(weight, offsets, table_rows, features, indices, bag_offsets,
                                                 per_sample_weights, batch_size);
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  Tensor out = new_output(weight, a.batch, out_width, "the output [batch_size, out_width]");
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const View<I> v = make_view<I>(a, weight, offsets, table_rows, features, indices, bag_offsets, out_width,
                                   per_sample_weights.has_value(), table_checked);
    std::atomic<int64_t> bad{kNone};
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      T* o = out.mutable_data_ptr<T>();
      // Columns no block writes are zero (blocks may leave gaps).
      int64_t covered = 0;
      for (int64_t k = 0; k < v.F; ++k) covered += v.block(k)[kFWidth];
      if (covered != out_width) std::fill(o, o + a.batch * out_width, T(0));
      const T* w = weight.const_data_ptr<T>();
      const T* psw = per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr;
      const CpuKernel kernel = cpu_kernel();  // getenv once per call, not per chunk
      const bool stream =
          std::is_same_v<T, float> && a.batch * out_width * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
      torch::stable::parallel_for(0, v.F * v.B, kRun, [&](int64_t p0, int64_t p1) {
        forward_range<T, I>(kernel, v, w, psw, p0, p1, o, stream, bad);
#if PME_STREAM_STORES
        if (stream) _mm_sfence();  // the streaming stores are visible before the task ends
#endif
      });
    });
    if (bad.load() != kNone) report_bad(v, bad.load());
  });
  return out;
}

// Every (block, lookup) pair as a lookup of a global row, in block order: vrow[m] (global row),
// vpos[m] (its position j in indices), vbo [F * B + 1] (virtual bag k * B + b), then grouped by row.
struct Virtual {
  std::vector<int64_t> vrow, vpos, vbo;
  RowGroups groups;
};

template <class I>
Virtual virtual_lookups(const View<I>& v) {
  Virtual out;
  const int64_t F = v.F, B = v.B;
  out.vbo.assign(F * B + 1, 0);
  std::vector<int64_t> start(F + 1, 0);
  for (int64_t k = 0; k < F; ++k) {
    const int64_t g = v.block(k)[kFKey];
    start[k + 1] = start[k] + (static_cast<int64_t>(v.bo[g * B + B]) - static_cast<int64_t>(v.bo[g * B]));
  }
  const int64_t M = start[F];
  out.vrow.resize(M);
  out.vpos.resize(M);
  torch::stable::parallel_for(0, F, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t* f = v.block(k);
      const int64_t g = f[kFKey], j0 = static_cast<int64_t>(v.bo[g * B]);
      for (int64_t b = 0; b < B; ++b) out.vbo[k * B + b] = start[k] + static_cast<int64_t>(v.bo[g * B + b]) - j0;
      const int64_t j1 = static_cast<int64_t>(v.bo[g * B + B]);
      const int64_t base = v.rows[f[kFTable]];
      for (int64_t j = j0; j < j1; ++j) {
        out.vrow[start[k] + j - j0] = base + static_cast<int64_t>(v.idx[j]);
        out.vpos[start[k] + j - j0] = j;
      }
    }
  });
  out.vbo[F * B] = M;
  out.groups = group_by_row<int64_t>(out.vrow.data(), M, out.vbo.data(), F * B, -1);
  return out;
}

// Summed gradient of segment s's row into g[0 : size).
template <class T, class I>
void row_gradient(const View<I>& v, const Virtual& vl, const T* grad_out, const T* psw, int64_t s, int64_t size,
                  acc_t<T>* g) {
  using A = acc_t<T>;
  const RowGroups& gr = vl.groups;
  std::fill(g, g + size, A(0));
  for (int64_t q = gr.seg[s]; q < gr.seg[s + 1]; ++q) {
    const int64_t m = gr.pos[q];
    const int64_t vb = gr.bag_of[m];
    const int64_t k = vb / v.B, b = vb % v.B;
    const int64_t* f = v.block(k);
    A scale = psw ? static_cast<A>(psw[vl.vpos[m]]) : A(1);
    if (f[kFPooling] == kMean) scale /= static_cast<A>(gr.count[vb]);
    const T* go = grad_out + b * v.out_width + f[kFCol];
    for (int64_t c = 0; c < size; ++c) g[c] += scale * static_cast<A>(go[c]);
  }
}

int64_t check_grad(const Tensor& grad_out, const Tensor& weight, const CollectionArgs& a) {
  PME_CHECK(grad_out.dim() == 2 && grad_out.sizes()[0] == a.batch, "grad_out must be [", a.batch, ", out_width]");
  PME_CHECK(grad_out.scalar_type() == weight.scalar_type(), "grad_out must have the dtype of weight");
  check_same_device(grad_out, weight, "grad_out");
  return grad_out.sizes()[1];
}

// The set-up collection_backward and collection_update_ share (after check_collection_args):
// checks grad_out, validates the whole call (table, bag offsets, every lookup), rewrites the
// batch as virtual lookups grouped by row, then calls f(v, vl, go, psw) in the indices' and
// the weight's types (go: grad_out [B, out_width], contiguous; psw or nullptr).
template <class F>
void with_grouped_collection(const CollectionArgs& a, const Tensor& grad_out, const Tensor& weight,
                             const Tensor& offsets, const Tensor& table_rows, const Tensor& features,
                             const Tensor& indices, const Tensor& bag_offsets,
                             const std::optional<Tensor>& per_sample_weights, bool table_checked, F&& f) {
  const int64_t W = check_grad(grad_out, weight, a);
  const Tensor go_t = torch::stable::contiguous(grad_out);
  dispatch_index(indices.scalar_type(), "indices", [&](auto itag) {
    using I = decltype(itag);
    const View<I> v = make_view<I>(a, weight, offsets, table_rows, features, indices, bag_offsets, W,
                                   per_sample_weights.has_value(), table_checked);
    validate_all(v);
    const Virtual vl = virtual_lookups(v);
    dispatch_weight(weight.scalar_type(), "weight", [&](auto wtag) {
      using T = decltype(wtag);
      const T* psw = per_sample_weights ? per_sample_weights->const_data_ptr<T>() : nullptr;
      f(v, vl, go_t.const_data_ptr<T>(), psw);
    });
  });
}

// Runs f(s, r, g) for every row r the batch touches, g its summed gradient (row_gradient).
template <class T, class I, class F>
void for_each_row_gradient(const View<I>& v, const Virtual& vl, const T* go, const T* psw, const F& f) {
  for_each_row_gradient<acc_t<T>>(
      vl.groups, max_width(v.feat, v.F),
      [&](int64_t s, acc_t<T>* g) {
        const int64_t r = vl.groups.rows[s];
        row_gradient(v, vl, go, psw, s, v.off[r + 1] - v.off[r], g);
      },
      f);
}

std::tuple<Tensor, Tensor> collection_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor table_rows,
                                               Tensor features, Tensor indices, Tensor bag_offsets,
                                               std::optional<Tensor> per_sample_weights, int64_t batch_size,
                                               bool psw_grad, bool table_checked) {
  const CollectionArgs a = check_collection_args(weight, offsets, table_rows, features, indices, bag_offsets,
                                                 per_sample_weights, batch_size);
  PME_CHECK(!psw_grad || per_sample_weights.has_value(), "psw_grad needs per_sample_weights");
  Tensor grad_w = torch::stable::new_zeros(weight, {weight.numel()});
  Tensor grad_psw = torch::stable::new_zeros(weight, {psw_grad ? a.num_lookups : 0});
  with_grouped_collection(a, grad_out, weight, offsets, table_rows, features, indices, bag_offsets, per_sample_weights,
                          table_checked, [&](const auto& v, const Virtual& vl, const auto* go, const auto* psw) {
                            using T = std::decay_t<decltype(*go)>;
                            using A = acc_t<T>;
                            T* gw = grad_w.mutable_data_ptr<T>();
                            for_each_row_gradient(v, vl, go, psw, [&](int64_t, int64_t r, const A* g) {
                              T* dst = gw + v.off[r];
                              for (int64_t c = 0, size = v.off[r + 1] - v.off[r]; c < size; ++c)
                                dst[c] = static_cast<T>(g[c]);
                            });
                            if (psw_grad) {
                              // d out / d psw[j] = <row, grad of its bag's columns>, summed over the blocks reading j.
                              const RowGroups& gr = vl.groups;
                              const int64_t M = static_cast<int64_t>(vl.vrow.size());
                              std::vector<A> dot(M, A(0));
                              const T* w = weight.const_data_ptr<T>();
                              torch::stable::parallel_for(0, M, 1024, [&](int64_t m0, int64_t m1) {
                                for (int64_t m = m0; m < m1; ++m) {
                                  const int64_t vb = gr.bag_of[m];
                                  if (vb < 0) continue;
                                  const int64_t k = vb / v.B, b = vb % v.B, r = vl.vrow[m];
                                  const T* row = w + v.off[r];
                                  const T* gp = go + b * v.out_width + v.block(k)[kFCol];
                                  A d = 0;
                                  for (int64_t c = 0, n = v.off[r + 1] - v.off[r]; c < n; ++c)
                                    d += static_cast<A>(row[c]) * static_cast<A>(gp[c]);
                                  dot[m] = d;
                                }
                              });
                              std::vector<A> sum(a.num_lookups, A(0));
                              for (int64_t m = 0; m < M; ++m) sum[vl.vpos[m]] += dot[m];  // block order: deterministic
                              T* gp = grad_psw.mutable_data_ptr<T>();
                              for (int64_t j = 0; j < a.num_lookups; ++j) gp[j] = static_cast<T>(sum[j]);
                            }
                          });
  return {grad_w, grad_psw};
}

void collection_update_(Tensor weight, Tensor state1, Tensor state2, Tensor grad_out, Tensor offsets, Tensor table_rows,
                        Tensor features, Tensor indices, Tensor bag_offsets, std::optional<Tensor> per_sample_weights,
                        int64_t batch_size, int64_t optimizer, double lr, double weight_decay, double eps, double beta1,
                        double beta2, double grad_scale, int64_t step, bool table_checked) {
  const CollectionArgs a = check_collection_args(weight, offsets, table_rows, features, indices, bag_offsets,
                                                 per_sample_weights, batch_size);
  check_update_args(weight, state1, state2, offsets, optimizer, lr, weight_decay, eps, beta1, beta2, grad_scale, step);
  check_update_in_place(weight, state1, state2,
                        {{&grad_out, "grad_out"},
                         {&offsets, "offsets"},
                         {&table_rows, "table_rows"},
                         {&features, "features"},
                         {&indices, "indices"},
                         {&bag_offsets, "bag_offsets"},
                         {per_sample_weights ? &*per_sample_weights : nullptr, "per_sample_weights"}});
  const Hyper h{optimizer, lr, weight_decay, eps, beta1, beta2, 1.0 / grad_scale, step};
  with_grouped_collection(a, grad_out, weight, offsets, table_rows, features, indices, bag_offsets, per_sample_weights,
                          table_checked, [&](const auto& v, const Virtual& vl, const auto* go, const auto* psw) {
                            using T = std::decay_t<decltype(*go)>;
                            using A = acc_t<T>;
                            T* w = weight.mutable_data_ptr<T>();
                            A* s1 = state1.numel() ? state1.mutable_data_ptr<A>() : nullptr;
                            A* s2 = state2.numel() ? state2.mutable_data_ptr<A>() : nullptr;
                            for_each_row_gradient(v, vl, go, psw, [&](int64_t, int64_t r, A* g) {
                              const int64_t lo = v.off[r], size = v.off[r + 1] - lo;
                              apply_step<T, A>(h, w + lo, g, size, optimizer == kRowwiseAdagrad ? s1 + r : nullptr,
                                               optimizer == kAdam ? s1 + lo : nullptr,
                                               optimizer == kAdam ? s2 + lo : nullptr);
                            });
                          });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pme, CPU, m) {
  PME_REGISTER_COLLECTION(m);
}

}  // namespace pme::cpu
