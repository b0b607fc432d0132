// Collections: many multi-size tables in one flat buffer, looked up for all features of a batch
// in one operator call (collection_forward / collection_backward / collection_update_).
//
// Normal form (what the operators take; pme/collection.py builds it):
//   weight      [total]      all rows of all tables back to back (f32/f64/f16/bf16)
//   offsets     [V + 1]      int64, one offset table over the V = sum(V_t) rows of all tables
//   table_rows  [T + 1]      int64, table t owns the global rows [table_rows[t], table_rows[t+1])
//   features    [F, 5]       int64, one row per output block k:
//                              (table t, input key g, first output column, width D_t, pooling)
//                            several blocks may read one key (a feature shared by two tables)
//   indices     [N]          int32/int64, row numbers local to the block's table
//   bag_offsets [G * B + 1]  dtype of indices: key g, sample b is bag g * B + b (the
//                            KeyedJaggedTensor's key-major order), B = batch_size
//   per_sample_weights [N]   optional, dtype of weight, sum pooling only
//   output      [B, out_width]: block k writes columns [col_k, col_k + D_t) of every sample.
// Block k's lookup of index i reads global row table_rows[t] + i; valid when 0 <= i < V_t and the
// row's stored size fits the block's width (the dense view of table t is [V_t, D_t]).
#pragma once

#include "pme.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace pme {

// Registers the collection operators (the backend's functions of those names) in library block m.
#define PME_REGISTER_COLLECTION(m)                                \
  m.impl("collection_forward", TORCH_BOX(&collection_forward));   \
  m.impl("collection_backward", TORCH_BOX(&collection_backward)); \
  m.impl("collection_update_", TORCH_BOX(&collection_update_))

enum FeatureField : int64_t { kFTable = 0, kFKey = 1, kFCol = 2, kFWidth = 3, kFPooling = 4, kFFields = 5 };

struct CollectionArgs {
  int64_t num_rows;     // V
  int64_t num_tables;   // T
  int64_t num_blocks;   // F (output blocks)
  int64_t num_keys;     // G
  int64_t batch;        // B
  int64_t num_lookups;  // N
};

// Shapes, dtypes and devices (no data is read: the values are checked by the backends).
inline CollectionArgs check_collection_args(const Tensor& weight, const Tensor& offsets, const Tensor& table_rows,
                                            const Tensor& features, const Tensor& indices, const Tensor& bag_offsets,
                                            const std::optional<Tensor>& per_sample_weights, int64_t batch_size) {
  check_1d(weight, "weight");
  check_1d(offsets, "offsets");
  check_1d(table_rows, "table_rows");
  check_1d(indices, "indices");
  check_1d(bag_offsets, "bag_offsets");
  PME_CHECK(offsets.scalar_type() == ScalarType::Long && offsets.numel() >= 1,
            "offsets must be int64 with V + 1 >= 1 entries");
  PME_CHECK(table_rows.scalar_type() == ScalarType::Long && table_rows.numel() >= 1,
            "table_rows must be int64 with T + 1 >= 1 entries");
  PME_CHECK(features.dim() == 2 && features.sizes()[1] == kFFields && features.scalar_type() == ScalarType::Long,
            "features must be an int64 [F, 5] tensor (table, key, column, width, pooling per output block)");
  PME_CHECK(features.is_contiguous(), "features must be contiguous");
  PME_CHECK(bag_offsets.scalar_type() == indices.scalar_type(), "bag_offsets (", dtype_name(bag_offsets.scalar_type()),
            ") must have the dtype of indices (", dtype_name(indices.scalar_type()), ")");
  PME_CHECK(indices.scalar_type() == ScalarType::Int || indices.scalar_type() == ScalarType::Long,
            "indices must be int32 or int64, got ", dtype_name(indices.scalar_type()));
  PME_CHECK(batch_size >= 0, "batch_size must be >= 0, got ", batch_size);
  const int64_t nbo = bag_offsets.numel();
  PME_CHECK(nbo >= 1, "bag_offsets must have G * B + 1 >= 1 entries");
  int64_t G = 0;
  if (batch_size > 0) {
    PME_CHECK((nbo - 1) % batch_size == 0, "bag_offsets has ", nbo,
              " entries: not G * B + 1 for batch_size B = ", batch_size);
    G = (nbo - 1) / batch_size;
  }
  check_same_device(offsets, weight, "offsets");
  check_same_device(table_rows, weight, "table_rows");
  check_same_device(features, weight, "features");
  check_same_device(indices, weight, "indices");
  check_same_device(bag_offsets, weight, "bag_offsets");
  if (per_sample_weights.has_value()) {
    const Tensor& p = *per_sample_weights;
    check_1d(p, "per_sample_weights");
    PME_CHECK(p.numel() == indices.numel(), "per_sample_weights has ", p.numel(), " entries but indices has ",
              indices.numel());
    PME_CHECK(p.scalar_type() == weight.scalar_type(), "per_sample_weights (", dtype_name(p.scalar_type()),
              ") must have the dtype of weight (", dtype_name(weight.scalar_type()), ")");
    check_same_device(p, weight, "per_sample_weights");
  }
  return {offsets.numel() - 1, table_rows.numel() - 1, features.sizes()[0], G, batch_size, indices.numel()};
}

// Output blocks write disjoint column ranges (gaps allowed; empty blocks anywhere): two blocks on
// one column would race for it and leave other columns unwritten. feat is the [F, 5] block table
// on the host, each row's columns already checked to lie in [0, out_width).
inline void check_blocks_disjoint(const int64_t* feat, int64_t F) {
  std::vector<std::pair<int64_t, int64_t>> spans;  // (first column, block), non-empty blocks
  for (int64_t k = 0; k < F; ++k) {
    if (feat[k * kFFields + kFWidth] > 0) spans.emplace_back(feat[k * kFFields + kFCol], k);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const int64_t* a = feat + spans[i - 1].second * kFFields;
    const int64_t* b = feat + spans[i].second * kFFields;
    PME_CHECK(b[kFCol] >= a[kFCol] + a[kFWidth], "features[", spans[i - 1].second, "] and features[", spans[i].second,
              "] write overlapping output columns [", a[kFCol], ", ", a[kFCol] + a[kFWidth], ") and [", b[kFCol], ", ",
              b[kFCol] + b[kFWidth], "): each column belongs to one block");
  }
}

// One row k of features: its table, its key (only with bags: bag_offsets has G * B + 1 entries,
// so the number of keys G is known only when B > 0), its columns and its pooling.
inline void check_block(const int64_t* f, int64_t k, int64_t num_tables, int64_t num_keys, bool check_key,
                        int64_t out_width) {
  PME_CHECK(f[kFTable] >= 0 && f[kFTable] < num_tables, "features[", k, "]: table ", f[kFTable],
            " is out of range for ", num_tables, " tables");
  PME_CHECK(!check_key || (f[kFKey] >= 0 && f[kFKey] < num_keys), "features[", k, "]: key ", f[kFKey],
            " is out of range for ", num_keys, " keys (bag_offsets has G * B + 1 entries)");
  PME_CHECK(f[kFWidth] >= 0 && f[kFCol] >= 0 && f[kFCol] <= out_width - f[kFWidth], "features[", k, "]: columns [",
            f[kFCol], ", ", f[kFCol], " + ", f[kFWidth], ") do not fit in the output width ", out_width);
  PME_CHECK(f[kFPooling] == kSum || f[kFPooling] == kMean, "features[", k,
            "]: pooling must be 0 (sum) or 1 (mean), got ", f[kFPooling]);
}

// The values of table_rows and features, read on the host (CPU backend; the CUDA backend runs
// the same tests in a kernel). Overflow-safe: every sum is bounded before it is formed.
inline void check_collection_meta(const int64_t* table_rows, const int64_t* features, const CollectionArgs& a,
                                  int64_t out_width, bool weighted) {
  PME_CHECK(table_rows[0] == 0, "table_rows[0] must be 0, got ", table_rows[0]);
  for (int64_t t = 0; t < a.num_tables; ++t) {
    PME_CHECK(table_rows[t + 1] >= table_rows[t], "table_rows must be non-decreasing, but table_rows[", t + 1,
              "] = ", table_rows[t + 1], " < table_rows[", t, "] = ", table_rows[t]);
  }
  PME_CHECK(table_rows[a.num_tables] == a.num_rows, "table_rows[-1] = ", table_rows[a.num_tables],
            " must equal the number of rows V = ", a.num_rows, " of offsets");
  PME_CHECK(out_width >= 0, "out_width must be >= 0, got ", out_width);
  for (int64_t k = 0; k < a.num_blocks; ++k) {
    const int64_t* f = features + k * kFFields;
    check_block(f, k, a.num_tables, a.num_keys, a.batch > 0, out_width);
    PME_CHECK(!weighted || f[kFPooling] == kSum, "features[", k,
              "]: per_sample_weights are only supported with sum pooling (as nn.EmbeddingBag)");
  }
  check_blocks_disjoint(features, a.num_blocks);
}

}  // namespace pme
