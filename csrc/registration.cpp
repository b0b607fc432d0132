// Operator schemas of the `pme` library (one per operator), the build description, and the
// stub Python module whose import loads this shared object. Kernels register themselves in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; fake kernels and autograd live in pme/ops.py.
#include <Python.h>

#include "pme.h"

#define PME_STR2(x) #x
#define PME_STR(x) PME_STR2(x)

namespace {

// "key=value;..." description of what this binary carries, read by pme.info().
PyObject* build_info(PyObject*, PyObject*) {
  const char* info =
      "abi=stable;torch_target=2.10;"
#ifdef PME_WITH_CUDA
      "cuda=" PME_STR(PME_CUDA_VERSION) ";archs=" PME_CUDA_ARCHS ";"
#else
      "cuda=none;archs=;"
#endif
      ;
  return PyUnicode_FromString(info);
}

PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "What this binary was built with."},
                         {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `pme._C`: importing it runs the static operator registrations. Uses only the Python limited
// API, so one binary serves every CPython >= 3.10.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pme compiled kernels", -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace pme {

STABLE_TORCH_LIBRARY(pme, m) {
  // Lookups. weight [total] f32/f64/f16/bf16, offsets [V+1] int64, indices [N] and bag_offsets
  // [B+1] int32 or int64 (same dtype), col_of_size [D+1] int64 (grouped layout) or None
  // (padded), pooling 0 sum / 1 mean / 2 max, padding_idx -1 for none.
  // table_checked (every operator that reads a table): the caller vouches that this very offset
  // table passed the whole-table check before (pme.ops keeps a per-tensor-version memo of it),
  // so the O(V) scan is skipped; every lookup is still bound-checked, so a wrong promise can
  // give wrong values, never an access out of bounds. False (the default) checks the table.
  m.def(
      "bag_forward(Tensor weight, Tensor offsets, Tensor indices, Tensor bag_offsets, "
      "Tensor? per_sample_weights, Tensor? col_of_size, int out_width, int pooling, int padding_idx, "
      "bool table_checked=False) -> (Tensor, Tensor)");
  m.def(
      "bag_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices, Tensor bag_offsets, "
      "Tensor? per_sample_weights, Tensor? col_of_size, Tensor argmax, int pooling, int padding_idx, "
      "bool psw_grad, bool table_checked=False) -> (Tensor, Tensor)");
  // The lookup's backward as a sparse gradient of the flat buffer (sparse=True): the entries of
  // the touched rows, increasing (int64 [nnz]), and their summed gradients ([nnz], weight's
  // dtype); scale_grad_by_freq divides each row's sum by its number of lookups in the batch.
  m.def(
      "bag_backward_sparse(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices, Tensor bag_offsets, "
      "Tensor? per_sample_weights, Tensor? col_of_size, Tensor argmax, int pooling, int padding_idx, "
      "bool scale_grad_by_freq, bool table_checked=False) -> (Tensor, Tensor)");
  m.def(
      "embedding_forward(Tensor weight, Tensor offsets, Tensor indices, Tensor? col_of_size, int out_width, "
      "int padding_idx, bool table_checked=False) -> Tensor");
  m.def(
      "embedding_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices, Tensor? col_of_size, "
      "int padding_idx, bool table_checked=False) -> Tensor");
  // Fused backward + optimizer step into the flat buffer. optimizer 0 SGD (no state), 1 row-wise
  // Adagrad (state1 [V] f32), 2 Adam (state1, state2 [total] f32 moments).
  m.def(
      "sparse_update_(Tensor(a!) weight, Tensor(b!) state1, Tensor(c!) state2, Tensor grad_out, "
      "Tensor offsets, Tensor indices, Tensor bag_offsets, Tensor? per_sample_weights, Tensor? col_of_size, "
      "Tensor argmax, int pooling, int padding_idx, int optimizer, float lr, float weight_decay, float eps, "
      "float beta1, float beta2, float grad_scale, int step, bool table_checked=False) -> ()");
  // torch.optim.SparseAdam's step on a coalesced sparse gradient (pme.optim.SparseAdam):
  // param, exp_avg, exp_avg_sq as [R, C] rows; rows [n] int64 increasing; values [n, C]; the
  // same float operations as torch's step, in place. step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t).
  m.def(
      "sparse_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor values, "
      "float beta1, float beta2, float eps, float step_size) -> ()");
  // Search: scores [total] f32 += |w * g| (rule 0, SNIP) or g^2 (rule 1) for the rows of a batch.
  m.def(
      "accumulate_scores_(Tensor(a!) scores, Tensor grad_out, Tensor weight, Tensor offsets, Tensor indices, "
      "Tensor bag_offsets, Tensor? per_sample_weights, Tensor? col_of_size, Tensor argmax, int pooling, "
      "int padding_idx, int rule, bool table_checked=False) -> ()");
  // Pruning. topk_threshold: the k-th largest of scores (0-d, radix select on the device).
  // prune_counts: per-row number of scores >= threshold. prune_pack: row i keeps its
  // offsets[i+1]-offsets[i] best entries, in score order (by_score) or column order.
  m.def("topk_threshold(Tensor scores, int k) -> Tensor");
  m.def("prune_counts(Tensor scores, Tensor threshold) -> Tensor");
  m.def("prune_pack(Tensor dense, Tensor scores, Tensor offsets, bool by_score) -> Tensor");
  // Collections (normal form in collection.h): all tables in one flat buffer, every output block
  // of a batch in one call. table_rows [T+1] int64, features [F, 5] int64 (table, key, column,
  // width, pooling), bag_offsets [G*B+1] key-major; output [B, out_width].
  m.def(
      "collection_forward(Tensor weight, Tensor offsets, Tensor table_rows, Tensor features, Tensor indices, "
      "Tensor bag_offsets, Tensor? per_sample_weights, SymInt batch_size, int out_width, "
      "bool table_checked=False) -> Tensor");
  m.def(
      "collection_backward(Tensor grad_out, Tensor weight, Tensor offsets, Tensor table_rows, Tensor features, "
      "Tensor indices, Tensor bag_offsets, Tensor? per_sample_weights, SymInt batch_size, bool psw_grad, "
      "bool table_checked=False) -> (Tensor, Tensor)");
  m.def(
      "collection_update_(Tensor(a!) weight, Tensor(b!) state1, Tensor(c!) state2, Tensor grad_out, "
      "Tensor offsets, Tensor table_rows, Tensor features, Tensor indices, Tensor bag_offsets, "
      "Tensor? per_sample_weights, SymInt batch_size, int optimizer, float lr, float weight_decay, float eps, "
      "float beta1, float beta2, float grad_scale, int step, bool table_checked=False) -> ()");
}

}  // namespace pme
