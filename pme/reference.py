"""Pure-PyTorch reference of every pme operator.

This module is both the test oracle and the fallback used when the compiled extension cannot
be loaded. It follows the semantics' one-sentence rule (README "Semantics") literally: build the dense view of the
multi-size table (each row zero-padded on the right, or placed in its size's slot for the
``grouped`` layout) and call ``F.embedding_bag`` / ``F.embedding`` on it. Autograd through the
dense view gives gradients restricted to the stored entries. Memory is O(V * width): fine for
tests and small tables, not for production.

Conventions shared with the compiled operators (see ``pme/ops.py``):

- ``weight``: ``[total]`` float tensor, all rows back to back.
- ``offsets``: ``[V + 1]`` int64, row ``i`` is ``weight[offsets[i]:offsets[i+1]]``.
- ``col_of_size``: ``[D + 1]`` int64 or ``None``; the first output column of a row of each size
  (``None``: the ``padded`` layout, every row starts at column 0).
- ``bag_offsets``: ``[B + 1]`` (the last entry closes the last bag).
- ``mode``: ``"sum"``, ``"mean"`` or ``"max"``; ``padding_idx``: a row index or ``None``.

The backward-side oracles take a pooled lookup as one :class:`Lookup` (the arguments of
:func:`embedding_bag` after ``weight``), the optimizer step as one ``pme.ops.Hyperparameters``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "Lookup",
    "row_ids",
    "to_dense",
    "embedding_bag",
    "embedding",
    "summed_row_grads",
    "bag_backward_sparse",
    "sparse_update_",
    "accumulate_scores_",
    "topk_threshold",
    "prune_counts",
    "prune_pack",
]


def row_ids(offsets: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry: ``[total]`` int64."""
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=offsets.device), sizes)


def to_dense(weight: torch.Tensor, offsets: torch.Tensor, width: int, col_of_size: torch.Tensor | None = None):
    """Dense view ``[V, width]`` of a flat table (differentiable w.r.t. ``weight``)."""
    V = offsets.numel() - 1
    rows = row_ids(offsets)
    sizes = offsets[1:] - offsets[:-1]
    cols = torch.arange(weight.numel(), device=weight.device) - offsets[rows]
    if col_of_size is not None:
        cols = cols + col_of_size[sizes[rows]]
    dense = weight.new_zeros(V, width)
    return dense.index_put((rows, cols), weight)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and optimizer-state) dtype for a table dtype: float64 for
    float64 tables, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def embedding_bag(
    weight,
    offsets,
    indices,
    bag_offsets,
    width,
    col_of_size=None,
    mode="mean",
    per_sample_weights=None,
    padding_idx=None,
):
    """Pooled lookup ``[B, width]`` by ``F.embedding_bag`` on the dense view.

    Accumulates in float32 for float16/bfloat16 tables (as the kernels do) and casts back.
    """
    dense = to_dense(weight, offsets, width, col_of_size)
    acc = acc_dtype(weight.dtype)
    # lookups past the last bag are not part of any bag (F.embedding_bag would run the last bag
    # to the end of the input in some modes: README, Safety, include_last_offset)
    n = int(bag_offsets[-1]) if bag_offsets.numel() else 0
    indices = indices[:n]
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights[:n]
    psw = per_sample_weights.to(acc) if per_sample_weights is not None else None
    if indices.numel() == 0 or bag_offsets.numel() <= 1 or width == 0:
        # F.embedding_bag rejects some empty inputs that the rule still defines: zeros.
        B = bag_offsets.numel() - 1
        return dense.new_zeros(B, width) + 0 * dense.sum()
    if psw is not None and not bool(torch.isfinite(psw).all()):
        return _weighted_stored_only(
            dense.to(acc), weight, offsets, width, col_of_size, indices, bag_offsets, psw, padding_idx
        ).to(weight.dtype)
    out = F.embedding_bag(
        indices,
        dense.to(acc),
        bag_offsets,
        mode=mode,
        per_sample_weights=psw,
        include_last_offset=True,
        padding_idx=padding_idx,
    )
    return out.to(weight.dtype)


def _weighted_stored_only(dense, weight, offsets, width, col_of_size, indices, bag_offsets, psw, padding_idx):
    """The weighted sum when a weight is not finite: each weight scales its row's stored entries
    only (a column the row does not store adds nothing, where the dense view's 0 * inf would add
    NaN), as every kernel computes it."""
    stored = to_dense(torch.ones_like(weight, dtype=dense.dtype), offsets, width, col_of_size) != 0
    idx = indices.long()
    keep = stored[idx] if padding_idx is None else stored[idx] & (idx != padding_idx).unsqueeze(1)
    terms = torch.where(keep, F.embedding(idx, dense) * psw.unsqueeze(1), dense.new_zeros(()))
    counts = bag_offsets.long().diff()
    bag = torch.repeat_interleave(torch.arange(counts.numel(), device=idx.device), counts)
    return dense.new_zeros(bag_offsets.numel() - 1, width).index_add(0, bag, terms)


def embedding(weight, offsets, indices, width, col_of_size=None, padding_idx=None):
    """Non-pooled lookup ``[*indices.shape, width]`` by ``F.embedding`` on the dense view."""
    dense = to_dense(weight, offsets, width, col_of_size)
    return F.embedding(indices, dense, padding_idx=padding_idx)


class Lookup(NamedTuple):
    """A pooled lookup of a flat table: :func:`embedding_bag`'s arguments after ``weight``, in its
    order (``embedding_bag(weight, *lookup)``), as the backward-side oracles take it."""

    offsets: torch.Tensor
    indices: torch.Tensor
    bag_offsets: torch.Tensor
    width: int
    col_of_size: torch.Tensor | None = None
    mode: str = "mean"
    per_sample_weights: torch.Tensor | None = None
    padding_idx: int | None = None


def summed_row_grads(grad_out, weight, lookup: Lookup):
    """Gradient of ``sum(out * grad_out)`` w.r.t. the flat weight, and the rows it touches."""
    w = weight.detach().requires_grad_(True)
    with torch.enable_grad():
        out = embedding_bag(w, *lookup)
        (g,) = torch.autograd.grad(out, w, grad_out.to(out.dtype), allow_unused=True)
    if g is None:
        g = torch.zeros_like(weight)
    n = int(lookup.bag_offsets[-1])
    touched = lookup.indices[:n].long().unique()
    if lookup.padding_idx is not None:
        touched = touched[touched != lookup.padding_idx]
    return g, touched


def bag_backward_sparse(grad_out, weight, lookup: Lookup, scale_grad_by_freq=False):
    """Sparse gradient of the flat weight: ``(entries [nnz] int64 increasing, values [nnz])``, the
    stored entries of every row the batch looks up (padding excluded), duplicates summed; with
    ``scale_grad_by_freq`` each row's gradient is divided by its number of lookups."""
    g, touched = summed_row_grads(grad_out, weight, lookup)
    offsets = lookup.offsets
    rows = touched.long().sort().values
    sizes = offsets[rows + 1] - offsets[rows]
    slot = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), sizes)
    start = torch.cumsum(sizes, 0) - sizes
    entries = offsets[rows][slot] + torch.arange(slot.numel(), device=rows.device) - start[slot]
    values = g[entries]
    if scale_grad_by_freq:
        used = lookup.indices[: int(lookup.bag_offsets[-1])].long()
        counts = torch.bincount(used, minlength=offsets.numel() - 1)
        values = (values.to(acc_dtype(weight.dtype)) / counts[rows][slot]).to(weight.dtype)
    return entries, values


def sparse_update_(weight, state1, state2, grad_out, lookup: Lookup, hyper, step=1):
    """Reference fused update: the dense optimizer step on the summed gradient, rows of the batch only.

    ``hyper``: a ``pme.ops.Hyperparameters``; ``optimizer`` ``"sgd"``, ``"rowwise_adagrad"``
    (``state1`` ``[V]``) or ``"adam"`` (``state1``/``state2`` ``[total]``; lazy: rows outside the
    batch keep their moments); ``step`` the step count (Adam's bias correction).
    """
    g, touched = summed_row_grads(grad_out, weight, lookup)
    offsets = lookup.offsets
    lr, eps, beta1, beta2 = hyper.lr, hyper.eps, hyper.beta1, hyper.beta2
    acc = state1.dtype if state1.numel() else acc_dtype(weight.dtype)
    with torch.no_grad():
        for r in touched.tolist():
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            if hi == lo:
                continue
            w = weight[lo:hi].to(acc)
            gr = g[lo:hi].to(acc) / hyper.grad_scale + hyper.weight_decay * w
            if hyper.optimizer == "sgd":
                w = w - lr * gr
            elif hyper.optimizer == "rowwise_adagrad":
                state1[r] += (gr * gr).mean()
                w = w - lr * gr / (state1[r].sqrt() + eps)
            elif hyper.optimizer == "adam":
                m, v = state1[lo:hi], state2[lo:hi]
                m.mul_(beta1).add_((1 - beta1) * gr)
                v.mul_(beta2).add_((1 - beta2) * gr * gr)
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                w = w - (lr * math.sqrt(bc2) / bc1) * m / (v.sqrt() + eps)  # SparseAdam's eps placement
            else:
                raise ValueError(f"unknown optimizer {hyper.optimizer!r}")
            weight[lo:hi] = w.to(weight.dtype)


def accumulate_scores_(scores, grad_out, weight, lookup: Lookup, rule="snip"):
    """``scores += |w * g|`` (``snip``) or ``g^2`` (``grad``) on the rows of the batch."""
    g, touched = summed_row_grads(grad_out, weight, lookup)
    mask = torch.zeros(lookup.offsets.numel() - 1, dtype=torch.bool, device=weight.device)
    mask[touched] = True
    entry = mask[row_ids(lookup.offsets)]
    g = g.to(scores.dtype)
    contrib = (weight.to(scores.dtype) * g).abs() if rule == "snip" else g * g
    with torch.no_grad():
        scores += torch.where(entry, contrib, torch.zeros_like(contrib))


# Order of scores (README, Safety): NaN, whatever its sign bit, ranks below every number (-inf
# included) and all NaNs rank equal; -0.0 and +0.0 are equal. A NaN is never kept over a number.


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest score (0-d float32) in that order: NaN when ``k`` exceeds the non-NaN count."""
    flat = scores.reshape(-1).float().cpu()
    finite = flat[~flat.isnan()]
    if k > finite.numel():
        return torch.tensor(float("nan"), device=scores.device)
    return torch.kthvalue(finite, finite.numel() - k + 1).values.to(scores.device)


def prune_counts(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per-row number of scores ``>= threshold`` in that order (a NaN threshold counts all)."""
    if bool(threshold.isnan()):
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64, device=scores.device)
    return (scores >= threshold).sum(dim=1)


def prune_pack(dense: torch.Tensor, scores: torch.Tensor, offsets: torch.Tensor, by_score: bool) -> torch.Tensor:
    """Row ``i`` keeps its ``offsets[i+1]-offsets[i]`` best entries (ties: lower column first)."""
    V, D = dense.shape
    out = []
    cols = torch.arange(D, device=dense.device)
    for r in range(V):
        s = int(offsets[r + 1] - offsets[r])
        if s == 0:
            continue
        # Stable sort of -score keeps lower columns first among ties; NaN sorts last (below -inf).
        key = -scores[r].double()
        key = torch.where(key.isnan(), torch.full_like(key, float("inf")), key)
        order = torch.sort(key, stable=True).indices
        nan_last = torch.sort(scores[r][order].isnan().to(torch.int8), stable=True).indices
        order = order[nan_last][:s]
        if not by_score:
            order = torch.sort(order).values
        out.append(dense[r, cols[order]])
    return torch.cat(out) if out else dense.new_zeros(0)
