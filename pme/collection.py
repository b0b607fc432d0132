"""Collections of multi-size tables: TorchRec's EmbeddingBagCollection, one flat buffer, one call.

``MultiSizeEmbeddingBagCollection`` holds many tables (each with its own rows, width, pooling and
per-row sizes) in **one** flat buffer with one offset table, and looks up every feature of a
batch in **one** operator call: a ``torchrec.KeyedJaggedTensor`` in, a ``torchrec.KeyedTensor``
out, exactly as ``torchrec.EmbeddingBagCollection`` (feature order, ``feature@table`` names for a
feature read by several tables, weighted features, sum and mean pooling, empty bags), and every
output equal to that module's on the zero-padded dense views of the tables. TorchRec is optional:
without it, pass ``{feature: (values, offsets[, weights])}`` and get a :class:`KeyedOutput`.

Storage (one table after the other; table ``t`` owns global rows ``[table_rows[t], table_rows[t+1])``):

==============  ===========  ==================================================================
``weight``      ``[total]``  nn.Parameter, all rows of all tables back to back
``offsets``     ``[V + 1]``  int64 buffer, one offset table over ``V = sum(V_t)`` rows
``table_rows``  ``[T + 1]``  int64 buffer
==============  ===========  ==================================================================

``state_dict`` is written **per table**, so that a checkpoint reads like TorchRec's (and a
sharder can place tables one by one); for each table name ``t``:

- ``embedding_bags.t.weight``  ``[total_t]`` the table's flat rows,
- ``embedding_bags.t.offsets`` ``[V_t + 1]`` int64, the table's own offsets (starting at 0),
- with a fused optimizer: ``embedding_bags.t.optim_state1`` (row-wise Adagrad ``[V_t]``, Adam
  ``[total_t]``), ``embedding_bags.t.optim_state2`` (Adam ``[total_t]``, else empty), and one
  ``optim_step`` for the collection.

Loading validates every table before anything is replaced (all or nothing) and accepts other
sizes (the flat buffer is rebuilt). The normal form of the operators is documented in
``csrc/collection.h``; their fake kernels and autograd are registered here.

For a TorchRec sharder the module offers what one needs without touching the flat
buffer's layout: the tables as configs (``embedding_bag_configs()``), per-table views and sizes
(``table_weight``, ``table_offsets``, ``sizes``, ``memory_report()["tables"]`` for the planner's
true multi-size bytes), ``subset(names)`` (a collection of some tables with their optimizer state:
a table-wise shard), a per-table ``state_dict``, and an input normal form in which the blocks of
one rank are just the rows of ``features`` that rank holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import memory, ops, reference
from .modules import _FusedStateOwner, _summary, built_on_host, load_is_strict, parse_sizes

__all__ = [
    "EmbeddingBagConfig",
    "MultiSizeEmbeddingBagCollection",
    "MultiSizeEmbeddingCollection",
    "KeyedOutput",
    "Batch",
    "collection_lookup",
    "collection_update_",
    "embedding_names",
    "convert",
]

POOLINGS = {"sum": 0, "mean": 1}
_F = 5  # fields of a feature row: table, key, column, width, pooling


# --------------------------------------------------------------------------------------------
# Table configs (TorchRec's EmbeddingBagConfig, or this stand-in of the same fields)
# --------------------------------------------------------------------------------------------
@dataclass
class EmbeddingBagConfig:
    """A table, with the fields of ``torchrec.EmbeddingBagConfig`` that matter here.

    ``pooling`` is ``"sum"`` or ``"mean"`` (TorchRec's ``PoolingType.SUM`` / ``MEAN`` are accepted
    too). ``weight_init_min`` / ``max`` default to ``-+sqrt(1 / num_embeddings)``, as TorchRec.
    """

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    feature_names: list = field(default_factory=list)
    pooling: object = "sum"
    weight_init_max: float | None = None
    weight_init_min: float | None = None


@dataclass(frozen=True)
class _Table:
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple
    pooling: str
    init_min: float
    init_max: float


def _pooling_name(p) -> str:
    name = getattr(p, "name", p)  # torchrec.PoolingType is an Enum
    name = str(name).lower()
    if name not in POOLINGS:
        raise ValueError(f"pooling must be sum or mean (TorchRec's SUM / MEAN), got {p!r}")
    return name


def _table_of(cfg, i: int) -> _Table:
    for attr in ("num_embeddings", "embedding_dim", "feature_names"):
        if not hasattr(cfg, attr):
            raise TypeError(
                f"tables[{i}] ({type(cfg).__name__}) has no {attr}: pass torchrec.EmbeddingBagConfig "
                f"or pme.collection.EmbeddingBagConfig"
            )
    V, D = cfg.num_embeddings, cfg.embedding_dim
    if not isinstance(V, int) or V < 1 or not isinstance(D, int) or D < 1:
        raise ValueError(f"tables[{i}]: num_embeddings and embedding_dim must be positive ints, got {V!r}, {D!r}")
    name = getattr(cfg, "name", "") or f"t{i}"
    if not isinstance(name, str) or "." in name:
        raise ValueError(f"tables[{i}]: a table name is a state_dict key part and cannot contain '.', got {name!r}")
    feats = tuple(cfg.feature_names) or (name,)  # as TorchRec: a table without features reads its own name
    if not all(isinstance(f, str) and f for f in feats):
        raise ValueError(f"table {name!r}: feature_names must be a non-empty list of names, got {list(feats)}")
    if len(set(feats)) != len(feats):
        raise ValueError(f"table {name!r}: feature_names has duplicates: {list(feats)}")
    hi = getattr(cfg, "weight_init_max", None)
    lo = getattr(cfg, "weight_init_min", None)
    # each bound defaults on its own to TorchRec's -+sqrt(1 / V) (as torchrec.EmbeddingBagConfig does)
    hi = math.sqrt(1.0 / V) if hi is None else float(hi)
    lo = -math.sqrt(1.0 / V) if lo is None else float(lo)
    return _Table(name, V, D, feats, _pooling_name(getattr(cfg, "pooling", "sum")), lo, hi)


def embedding_names(tables) -> list:
    """Output keys, in output order, as TorchRec names them: a feature read by one table keeps its
    name; a feature read by several tables becomes ``feature@table`` in each."""
    seen: dict = {}
    for t in tables:
        for f in t.feature_names:
            seen[f] = seen.get(f, 0) + 1
    return [f if seen[f] == 1 else f"{f}@{t.name}" for t in tables for f in t.feature_names]


# --------------------------------------------------------------------------------------------
# Output without TorchRec
# --------------------------------------------------------------------------------------------
class KeyedOutput:
    """Pooled embeddings of all features: ``values()`` ``[B, sum(widths)]`` and the keys, with the
    accessors of ``torchrec.KeyedTensor`` (returned when the input is a plain mapping)."""

    def __init__(self, keys, length_per_key, values):
        self._keys, self._lengths, self._values = list(keys), list(length_per_key), values

    def keys(self):
        return self._keys

    def values(self):
        return self._values

    def length_per_key(self):
        return self._lengths

    def offset_per_key(self):
        out = [0]
        for n in self._lengths:
            out.append(out[-1] + n)
        return out

    def to_dict(self) -> dict:
        """``{key: [B, width]}`` (views of ``values()``)."""
        o = self.offset_per_key()
        return {k: self._values[:, o[i] : o[i + 1]] for i, k in enumerate(self._keys)}

    def __getitem__(self, key):
        return self.to_dict()[key]

    def __repr__(self):
        return f"KeyedOutput(keys={self._keys}, values={tuple(self._values.shape)})"


def _inverse_indices(kjt):
    """A KJT's inverse indices ``(keys, [F, B] tensor)``, or None; an empty tensor is none, as
    ``EmbeddingBagCollection`` takes it."""
    inv = kjt.inverse_indices_or_none()
    if inv is None or (isinstance(inv[1], torch.Tensor) and inv[1].numel() == 0):
        return None
    return inv


def _variable_batch(features) -> bool:
    """A torchrec KeyedJaggedTensor whose features have batch sizes of their own (VBE), or that
    maps samples to bags by inverse indices (``EmbeddingBagCollection`` applies them whenever
    they are there)."""
    if not _is_kjt(features):
        return False
    return bool(getattr(features, "variable_stride_per_key", lambda: False)()) or _inverse_indices(features) is not None


def _pad_variable_batch(offsets: torch.Tensor, strides, B: int) -> torch.Tensor:
    """A VBE KJT's offsets (``sum(B_f) + 1``: feature f's ``B_f`` bags in turn) -> offsets of ``B``
    bags per feature (each feature's first ``B`` bags, then empty ones). A feature with more than
    ``B`` bags (one the collection does not read: ``B`` is the largest batch of those it reads)
    keeps its later values in its last bag, so that the next feature still starts at its own first
    value."""
    strides = [int(b) for b in strides]
    if offsets.dim() != 1 or offsets.numel() != sum(strides) + 1:
        raise ValueError(
            f"the KeyedJaggedTensor has {offsets.numel()} offsets but its features' batch sizes {strides} "
            f"need {sum(strides) + 1}"
        )
    n = torch.tensor(strides, dtype=torch.int64, device=offsets.device)
    first = torch.cumsum(n, 0) - n
    # bag b of feature f ends at offsets[first_f + min(b + 1, B_f)]
    ends = torch.minimum(torch.arange(1, B + 1, device=offsets.device), n.unsqueeze(1)) + first.unsqueeze(1)
    if B > 0:
        ends[:, -1] = first + n  # every feature's last bag ends where the feature does
    return offsets[torch.cat([ends.new_zeros(1), ends.reshape(-1)])]


class _VariableBatch(NamedTuple):
    """A VBE KJT's inverse indices for the features a collection reads (keys in the KJT's order):
    ``rows[u, b]`` the bag of feature ``keys[u]`` that sample ``b`` reads."""

    keys: list
    rows: torch.Tensor


def _raise_bad_ends(offsets: torch.Tensor, counts, names) -> None:
    """The check of :func:`_check_bag_ends` on the data: one read of every feature's two ends
    (``names[k]`` "" for a whole KeyedJaggedTensor, whose offsets TorchRec starts at 0); skipped
    for CUDA tensors under ``PME_CUDA_VALIDATE=0`` and during CUDA graph capture, as pme.ops'
    checks are."""
    if offsets.shape[1] == 0 or ops._device_reads_off(offsets):
        return
    ends = offsets[:, [0, -1]].tolist()
    for name, (first, last), n in zip(names, ends, counts):
        if name == "" and last != n:
            raise ValueError(f"the KeyedJaggedTensor's bags end at {last} but it has {n} values")
        if name != "" and (first != 0 or last != n):
            raise ValueError(
                f"feature {name!r}: offsets must start at 0 and end at len(values) = {n}, got {first} and {last}"
            )


def _check_bag_ends(offsets: torch.Tensor, counts, names) -> None:
    """Raises ValueError unless every feature's bags (row ``k`` of ``offsets [F, B + 1]``) start at
    0 and end at its number of values ``counts[k]``. Eager calls read the ends here; a traced call
    (torch.compile, torch.export) puts ``pme::check_bag_ends`` in its graph, which reads them when
    the graph runs (the collection kernel checks only the concatenated bags, where a feature ending
    early would lend its trailing values to the next feature's first bag)."""
    if torch.compiler.is_compiling():
        _check_bag_ends_op(offsets, list(counts), _SEP.join(names))
        return
    _raise_bad_ends(offsets, counts, names)


_SEP = "\x1f"  # the ASCII unit separator, between the feature names given to pme::check_bag_ends


@ops.check_op("check_bag_ends")
def _check_bag_ends_op(offsets: torch.Tensor, counts: list[int], names: str) -> None:
    """:func:`_check_bag_ends` inside a traced graph (the names joined by ``_SEP``)."""
    _raise_bad_ends(offsets, counts, names.split(_SEP))


def _raise_bad_inverse(rows: torch.Tensor, limits, names) -> None:
    """A VBE batch's inverse indices ``rows [F, B]``: sample b of feature k reads one of its
    ``limits[k]`` bags, or IndexError naming the first that does not (one host read for all
    features; also on CUDA, where a bad one would make the expansion's gather fault)."""
    limit = torch.tensor(limits, dtype=torch.int64, device=rows.device)
    bad = (rows < 0) | (rows >= limit.unsqueeze(1))
    if bool(bad.any()):
        u, b = (int(x) for x in bad.nonzero()[0])
        raise IndexError(
            f"inverse indices of feature {names[u]!r}: sample {b} reads bag {int(rows[u, b])} but the feature "
            f"has {limits[u]} bags"
        )


@ops.check_op("check_inverse_indices")
def _check_inverse_indices_op(rows: torch.Tensor, limits: list[int], names: str) -> None:
    """:func:`_raise_bad_inverse` inside a traced graph (the names joined by ``_SEP``)."""
    _raise_bad_inverse(rows, limits, names.split(_SEP))


def _torchrec_configs():
    """``(torchrec.EmbeddingBagConfig, PoolingType, DataType)``, or None without a usable torchrec."""
    import importlib.util

    if importlib.util.find_spec("torchrec") is None:
        return None
    try:
        from torchrec import EmbeddingBagConfig as config, PoolingType
        from torchrec.types import DataType
    except Exception:  # installed but broken (e.g. an fbgemm-gpu of another build): pme's configs
        return None
    return config, PoolingType, DataType


class _Weighted:
    """A collection's ``is_weighted``: called, as TorchRec's ``EmbeddingBagCollection.is_weighted()``
    (which TorchRec code and sharders call), and read as a bool, as pme's attribute always was."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = bool(value)

    def __call__(self) -> bool:
        return self.value

    def __bool__(self) -> bool:
        return self.value

    def __eq__(self, other):
        return self.value == (other.value if isinstance(other, _Weighted) else other)

    def __hash__(self):
        return hash(self.value)

    def __repr__(self):
        return repr(self.value)

    def __reduce__(self):
        return (_Weighted, (self.value,))


def _is_kjt(x) -> bool:
    return all(hasattr(x, a) for a in ("keys", "values", "offsets", "weights_or_none", "stride"))


# --------------------------------------------------------------------------------------------
# Operators: fake kernels and autograd (schemas in csrc/registration.cpp)
# --------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """A batch of a collection in the operators' normal form (``csrc/collection.h``): the
    arguments every collection operator takes after ``offsets``, in their order.

    ``table_rows`` ``[T + 1]`` int64, table t's global rows; ``features`` ``[F, 5]`` int64 rows of
    (table, key, first output column, width, pooling 0 sum / 1 mean); ``indices`` ``[N]``
    int32/int64, local to each table; ``bag_offsets`` ``[G * B + 1]`` (same dtype), key g sample b
    = bag ``g * B + b``; ``per_sample_weights`` ``[N]`` of the weight's dtype (sum pooling only)
    or None; ``batch_size`` B.
    """

    table_rows: torch.Tensor
    features: torch.Tensor
    indices: torch.Tensor
    bag_offsets: torch.Tensor
    per_sample_weights: torch.Tensor | None
    batch_size: int


if ops.BUILD_INFO is not None:

    @ops.register_fake("collection_forward")
    def _(a):
        return a.weight.new_empty(a.batch_size, a.out_width)

    @ops.register_fake("collection_backward")
    def _(a):
        return torch.empty_like(a.weight), a.weight.new_empty(a.indices.shape[0] if a.psw_grad else 0)

    @ops.register_fake("collection_update_")
    def _(a):
        return None

    def _setup(ctx, inputs, output):
        weight, offsets, *args = inputs[:8]
        batch = Batch(*args)
        ctx.batch_size = batch.batch_size
        ctx.psw_grad = batch.per_sample_weights is not None and ctx.needs_input_grad[6]
        ops._save_tensors(ctx, (weight, offsets, *batch[:5]))  # (a collection built in inference mode too)

    def _backward(ctx, grad_out):
        weight, offsets, *tensors = ops._saved_tensors(ctx)
        batch = Batch(*tensors, ctx.batch_size)
        # the forward's table, saved unchanged: checked
        args = (grad_out.contiguous(), weight, offsets, *batch, ctx.psw_grad, True)
        gw, gp = (
            _CollectionBackward.apply(*args) if ops._functorch_active() else torch.ops.pme.collection_backward(*args)
        )
        return gw, None, None, None, None, None, (gp if ctx.psw_grad else None), None, None, None

    torch.library.register_autograd("pme::collection_forward", _backward, setup_context=_setup)

    class _CollectionLookupEager(torch.autograd.Function):
        """``collection_forward`` for eager calls that want a gradient (``pme.ops._eager_grad``): the
        registered formula's setup and backward in the ``forward(ctx, ...)`` form, past
        torch.library's autograd wrapper (about 190 µs of a small graded call; see
        ``pme.ops._BagLookupEager``)."""

        @staticmethod
        def forward(ctx, weight, offsets, *args):
            op = torch.ops.pme.collection_forward.default
            out = ops.forward_call(op, (), weight, offsets, *args)  # grad is off in here: straight to the kernel
            _setup(ctx, (weight, offsets, *args), out)
            return out

        backward = staticmethod(_backward)

    class _CollectionLookup(torch.autograd.Function):
        """``collection_forward`` inside torch.func transforms (grad, vjp, jacrev, vmap) and under
        forward-mode AD: the registered formula's setup and backward with ``setup_context`` (which
        functorch requires), a forward-mode derivative (the lookup is linear in the weight and in
        the per-sample weights), and ``vmap`` by one call per batch element."""

        @staticmethod
        def forward(weight, offsets, *args):
            return ops.forward_call(torch.ops.pme.collection_forward.default, (), weight, offsets, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _setup(ctx, inputs, output)
            ctx.save_for_forward(*inputs[:7])
            ctx.rest = inputs[7:]

        @staticmethod
        def backward(ctx, grad_out):
            return _backward(ctx, grad_out)

        @staticmethod
        def jvp(ctx, w_t, *tangents):
            weight, offsets, *batch = ctx.saved_tensors
            psw_t = tangents[5]
            out_t = None
            if w_t is not None:
                out_t = _CollectionLookup.apply(w_t.contiguous(), offsets, *batch, *ctx.rest)
            if psw_t is not None:
                extra = _CollectionLookup.apply(weight, offsets, *batch[:4], psw_t.contiguous(), *ctx.rest)
                out_t = extra if out_t is None else out_t + extra
            return out_t

    _CollectionLookup.vmap = ops._vmap_by_loop(_CollectionLookup)

    def _once(ctx, *grads):
        raise RuntimeError("pme: a collection's lookup is differentiable once (no second derivative)")

    # inside torch.func transforms: batched (jacrev, per-sample gradients) by one call per element
    # instead of torch's generic fallback, which warns
    _CollectionBackward = ops.backward_function(
        "collection_backward",
        lambda ctx, inputs, output: ctx.mark_non_differentiable(*output),
        _once,
        "pme::collection_backward (differentiable once: no formula for its backward's backward)",
    )


def _virtual(weight, batch: Batch):
    """The batch as one lookup of the global table (reference path): every (block, lookup) pair
    becomes a lookup of global row ``table_rows[t] + index``, block k sample b a bag ``k * B + b``.

    Returns ``(vidx [M] int64, vbo [F * B + 1] int64, vpsw [M] or None, blocks)``.
    """
    feats = batch.features.tolist()
    bo = batch.bag_offsets.long()
    rows = batch.table_rows.tolist()
    indices, psw, B = batch.indices, batch.per_sample_weights, batch.batch_size
    vidx, vbo, vpsw = [], [torch.zeros(1, dtype=torch.int64, device=weight.device)], []
    m = 0
    for t, g, _col, _w, _pool in feats:
        s, e = int(bo[g * B]), int(bo[g * B + B])
        vidx.append(indices[s:e].long() + rows[t])
        vbo.append(bo[g * B + 1 : g * B + B + 1] - s + m)
        if psw is not None:
            vpsw.append(psw[s:e])
        m += e - s
    vidx = torch.cat(vidx) if vidx else indices.new_zeros(0, dtype=torch.int64)
    return vidx, torch.cat(vbo), (torch.cat(vpsw) if psw is not None and vpsw else psw), feats


def _reference_forward(weight, offsets, batch: Batch, out_width):
    """Pure-PyTorch collection lookup (pme.reference, one block at a time)."""
    B, psw = batch.batch_size, batch.per_sample_weights
    out = weight.new_zeros(B, out_width)
    feats = batch.features.tolist()
    rows = batch.table_rows.tolist()
    bo = batch.bag_offsets.long()
    for k, (t, g, col, w, pool) in enumerate(feats):
        s, e = int(bo[g * B]), int(bo[g * B + B])
        idx = batch.indices[s:e].long()
        vt = rows[t + 1] - rows[t]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vt):
            j = int(((idx < 0) | (idx >= vt)).nonzero()[0])
            raise IndexError(
                f"pme: index out of range: indices[{s + j}] = {int(idx[j])} (output block {k}) but table "
                f"{t} has {vt} rows"
            )
        lbo = bo[g * B : g * B + B + 1] - s
        p = psw[s:e] if psw is not None else None
        e0, e1 = int(offsets[rows[t]]), int(offsets[rows[t + 1]])
        toff = offsets[rows[t] : rows[t + 1] + 1] - e0
        ops.check_offsets(toff, e1 - e0)
        # as the operators: every row looked up here fits this block (others need only fit the widest)
        big = (toff[idx + 1] - toff[idx]) > w
        if bool(big.any()):
            j = int(big.nonzero()[0])
            raise ValueError(
                f"pme: row {int(idx[j])} of table {t} has size {int(toff[idx[j] + 1] - toff[idx[j]])}: it does not "
                f"fit in the width {w} of output block {k}"
            )
        # the dense view as wide as the table's widest row, cut to the block (the rows looked up fit it)
        wt = max([w] + (toff[1:] - toff[:-1]).tolist())
        o = reference.embedding_bag(weight[e0:e1], toff, idx, lbo, wt, None, "mean" if pool else "sum", p, None)
        out[:, col : col + w] = o[:, :w]
    return out


def _max_block_width(features):
    """The widest output block of ``features`` (the width the operators check the table's sizes
    against), or None while a CUDA graph is being captured (no host read then; the operators
    skip their validation there anyway)."""
    if features.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return max(1, int(features[:, 3].max())) if features.shape[0] else 1


def _collection_call(fn, weight, offsets, features, width, trusted=False):
    """``fn(table_checked)`` through pme.ops' whole-table-check memo (``width``: the widest block;
    ``trusted``: a collection's own table, see ``pme.ops._table_call``)."""
    width = _max_block_width(features) if width is None else width
    if width is None:
        return fn(False)
    return ops._table_call(fn, weight, offsets, None, width, trusted)


def _batch_size(b):
    """A batch size as the operators take it: an int, or kept symbolic while tracing (torch.export
    with a dynamic batch)."""
    return b if isinstance(b, torch.SymInt) else int(b)


def collection_lookup(weight, offsets, batch: Batch, *, out_width: int, _width=None, _trusted=False):
    """One pooled lookup of every output block of a batch (normal form of ``csrc/collection.h``).

    Args:
        weight: ``[total]`` flat rows of all tables; offsets ``[V + 1]`` int64.
        batch: the :class:`Batch` (tables, output blocks, indices, bags, weights, batch size).

    Returns ``[batch.batch_size, out_width]`` of weight's dtype; differentiable in weight and the
    weights. The whole offset table is checked once per version (see pme.ops), every lookup on every
    call; ``_width`` (the widest block) and ``_trusted`` (a collection's own table) as
    :meth:`CollectionRows.operator_args` gives them.
    """
    batch = Batch(*batch[:5], _batch_size(batch[5]))
    if ops._compiled(weight):
        graded = (weight, batch.per_sample_weights)
        if ops._forward_ad_active():  # (or a torch.func transform)

            def call(checked):
                return _CollectionLookup.apply(weight, offsets, *batch, int(out_width), checked)

        elif ops._eager_grad(*graded):

            def call(checked):
                return _CollectionLookupEager.apply(weight, offsets, *batch, int(out_width), checked)

        else:

            def call(checked):
                op = torch.ops.pme.collection_forward.default
                return ops.forward_call(op, graded, weight, offsets, *batch, int(out_width), checked)

        return _collection_call(call, weight, offsets, batch.features, _width, _trusted)
    return _reference_forward(weight, offsets, batch, int(out_width))


def collection_update_(
    weight,
    state1,
    state2,
    grad_out,
    offsets,
    batch: Batch,
    *,
    optimizer="rowwise_adagrad",
    step=1,
    _width=None,
    _trusted=False,
    **hyper,
):
    """Fused backward + optimizer step of a collection lookup, in place, all tables in one call.

    ``grad_out`` ``[B, out_width]`` is the gradient of :func:`collection_lookup`'s output for
    ``batch``. The gradients of a row's duplicates (within a bag, across samples, and across output
    blocks that share its table) are summed first, then one step is taken, as pme.optim documents.
    ``optimizer``, ``step`` and the keywords ``hyper`` (``lr=0.1``, ...) as in
    ``pme.ops.sparse_update_`` (:class:`pme.ops.Hyperparameters`).
    """
    hp = ops.Hyperparameters.of(optimizer, **hyper)
    batch = Batch(*batch[:5], _batch_size(batch[5]))
    if ops._compiled(weight):
        args = (weight, state1, state2, grad_out, offsets, *batch, *hp.operator_args(step))
        _collection_call(
            lambda checked: torch.ops.pme.collection_update_(*args, checked),
            weight,
            offsets,
            batch.features,
            _width,
            _trusted,
        )
        return
    B = batch.batch_size
    vidx, vbo, vpsw, feats = _virtual(weight, batch)
    # Mean blocks: their bags' gradient divided by the bag's length; every block padded to Wmax.
    Wmax = max([f[3] for f in feats] + [1])
    vgrad = grad_out.new_zeros(len(feats) * B, Wmax)
    lens = (vbo[1:] - vbo[:-1]).to(grad_out.dtype)
    for k, (_t, _g, col, w, pool) in enumerate(feats):
        gk = grad_out[:, col : col + w]
        if pool == 1:
            gk = gk / lens[k * B : (k + 1) * B].clamp(min=1).unsqueeze(1)
        vgrad[k * B : (k + 1) * B, :w] = gk
    lookup = reference.Lookup(offsets, vidx, vbo, Wmax, mode="sum", per_sample_weights=vpsw)
    reference.sparse_update_(weight, state1, state2, vgrad, lookup, hp, int(step))


class CollectionRows(NamedTuple):
    """What the backward of a collection's fused lookup hands its consumer (``pme.ops.RowConsumer``).

    ``grad_out`` ``[B, out_width]`` contiguous, the output's gradient in the buffer's dtype;
    ``indices`` / ``bag_offsets`` / ``features`` / ``per_sample_weights`` the batch in the normal
    form of :func:`collection_lookup`; ``batch_size`` B.
    """

    grad_out: torch.Tensor
    indices: torch.Tensor
    bag_offsets: torch.Tensor
    features: torch.Tensor
    per_sample_weights: torch.Tensor | None
    batch_size: int

    def update_(self, module, state1, state2, grad_out, **step) -> None:
        """One fused optimizer step of every table of ``module`` on these rows (:func:`collection_update_`);
        as ``pme.ops.BackwardRows.update_``."""
        args, kwargs = self.operator_args(module)
        collection_update_(module.weight.data, state1, state2, grad_out, *args, **kwargs, **step)

    def operator_args(self, module):
        """These rows of ``module``'s tables as :func:`collection_lookup` and :func:`collection_update_`
        take them after their leading tensors: ``(offsets, the Batch)`` and the keywords ``_width``
        and ``_trusted`` (the module's own table: a traced call skips the whole-table scan)."""
        batch = Batch(module.table_rows, self.features, self.indices, self.bag_offsets, *self[4:])
        return (module.offsets, batch), {"_width": module._block_width(), "_trusted": True}


class _ConsumedCollectionLookup(torch.autograd.Function):
    """Collection lookup whose backward hands the rows to the collection's ``RowConsumer``."""

    @staticmethod
    def forward(ctx, anchor, consumer, module, indices, bag_offsets, features, psw, B):
        out = module._lookup(CollectionRows(None, indices, bag_offsets, features, psw, B))
        ctx.consumer, ctx.module, ctx.B = consumer, module, B
        ctx.save_for_backward(indices, bag_offsets, features, psw)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, bag_offsets, features, psw = ctx.saved_tensors
        rows = CollectionRows(
            grad_out.contiguous().to(ctx.module.weight.dtype), indices, bag_offsets, features, psw, ctx.B
        )
        # per_sample_weights that require a gradient get it, from the weights before the consumer's step
        gp = _psw_grad(ctx.module, rows) if ctx.needs_input_grad[6] else None
        ctx.consumer.consume(ctx.module, rows)
        return None, None, None, None, None, None, gp, None


def _psw_grad(module, rows: CollectionRows):
    """Gradient of a collection's sum lookup w.r.t. its per_sample_weights ``[N]``: for lookup j,
    ``<row of j, grad_out[bag of j, its block's columns]>`` summed over the output blocks that read
    its feature (a feature read by several tables), as the unfused backward gives; accumulated in
    ``acc_dtype``, returned in the weight's dtype. The rows come from one non-pooled lookup of the
    global table (``[M, widest block]``, M = lookups over all blocks), not a gradient of the table."""
    weight = module.weight.detach()
    batch = Batch(
        module.table_rows, rows.features, rows.indices, rows.bag_offsets, rows.per_sample_weights, rows.batch_size
    )
    vidx, _, _, feats = _virtual(weight, batch)
    wmax = max([f[3] for f in feats] + [1])
    acc = ops.acc_dtype(weight.dtype)
    got = ops.embedding(weight, module.offsets, vidx, width=wmax, _trusted=True).to(acc)  # [M, wmax]
    grad = rows.grad_out.to(acc)
    B, bo = rows.batch_size, rows.bag_offsets.long()
    gp = torch.zeros(rows.indices.numel(), dtype=acc, device=weight.device)
    m = 0
    for _t, g, col, w, _pool in feats:
        s, e = int(bo[g * B]), int(bo[g * B + B])
        counts = bo[g * B + 1 : g * B + B + 1] - bo[g * B : g * B + B]
        bag = torch.repeat_interleave(torch.arange(B, device=weight.device), counts)
        gp[s:e] += (got[m : m + e - s, :w] * grad[bag, col : col + w]).sum(1)
        m += e - s
    return gp.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
def _sizes_list(sizes, tables):
    """``sizes`` argument -> one entry per table (None, int, or per-row sequence / tensor)."""
    if sizes is None:
        return [None] * len(tables)
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        return [sizes] * len(tables)
    if isinstance(sizes, Mapping):
        unknown = set(sizes) - {t.name for t in tables}
        if unknown:
            raise KeyError(
                f"sizes names tables {sorted(unknown)} that the collection does not have ({[t.name for t in tables]})"
            )
        return [sizes.get(t.name) for t in tables]
    if isinstance(sizes, (list, tuple)) and len(sizes) == len(tables):
        return list(sizes)
    raise TypeError(
        "sizes must be None, an int (every row of every table), a mapping {table name: sizes} or a "
        f"list with one sizes entry per table ({len(tables)} tables)"
    )


def _table_sizes(sizes, t: _Table) -> torch.Tensor:
    """One table's ``sizes`` entry as ``parse_sizes`` reads it, an error naming the table."""
    try:
        return parse_sizes(sizes, t.num_embeddings, t.embedding_dim)
    except (TypeError, ValueError) as e:
        raise type(e)(f"table {t.name!r}: {e}") from None


class MultiSizeEmbeddingBagCollection(_FusedStateOwner, nn.Module):
    """TorchRec's ``EmbeddingBagCollection`` over multi-size tables, all in one flat buffer.

    Args:
        tables: ``torchrec.EmbeddingBagConfig`` (or :class:`EmbeddingBagConfig`) list; table
            names must be unique, a feature may be read by several tables.
        sizes: per-row stored lengths: ``None`` (every row full width), an int for every row of
            every table, ``{table name: sizes}`` or one entry per table, each entry as
            ``MultiSizeEmbeddingBag`` takes it (``None``, an int, or ``V_t`` ints in ``[0, D_t]``).
        is_weighted: the input carries per-lookup weights (sum pooling only).
        device, dtype: of the flat buffer (default: torch's default device and dtype).
        optimizer: a ``pme.optim`` optimizer (``RowwiseAdagrad``, ``SGD``, ``Adam``): then
            ``loss.backward()`` updates every table of the collection in one fused call and
            ``weight`` gets no ``.grad``.

    ``forward(features)`` takes a ``torchrec.KeyedJaggedTensor`` (returns a ``KeyedTensor``) or a
    mapping ``{feature: (values [n], offsets [B + 1])}`` / ``(values, offsets, weights [n])``
    (returns a :class:`KeyedOutput`); both give ``[B, sum of the output widths]`` values with keys
    :meth:`embedding_names` in table order, then feature order.
    """

    _state_prefix = "embedding_bags"  # state_dict keys: <prefix>.<table>.weight, as TorchRec's module

    @built_on_host
    def __init__(
        self, tables, sizes=None, is_weighted: bool = False, device=None, dtype=None, optimizer=None, _weight=None
    ):
        super().__init__()
        tabs = [_table_of(c, i) for i, c in enumerate(tables)]
        if not tabs:
            raise ValueError("a collection needs at least one table")
        names = [t.name for t in tabs]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in ops.WEIGHT_DTYPES:
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        if is_weighted and any(t.pooling != "sum" for t in tabs):
            bad = [t.name for t in tabs if t.pooling != "sum"]
            raise ValueError(f"is_weighted=True needs sum pooling (as nn.EmbeddingBag); tables {bad} pool by mean")
        self._tables = tabs
        self.is_weighted = _Weighted(is_weighted)
        self._embedding_names = embedding_names(tabs)
        # Output blocks: (table, feature name, first column), in output order.
        self._blocks = []
        col = 0
        for ti, t in enumerate(tabs):
            for f in t.feature_names:
                self._blocks.append((ti, f, col))
                col += t.embedding_dim
        self.out_width = col
        self._feature_cache: dict = {}
        per_table = [_table_sizes(s, t) for s, t in zip(_sizes_list(sizes, tabs), tabs)]
        host_offsets = self._global_offsets(per_table)
        self.register_buffer("offsets", memory.fresh_table(host_offsets.to(device)))
        rows = torch.zeros(len(tabs) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([t.num_embeddings for t in tabs]), 0, out=rows[1:])
        self.register_buffer("table_rows", rows.to(device))
        total = int(host_offsets[-1])  # (from the host copy: the meta device has no values)
        if _weight is not None:
            if _weight.shape != (total,):
                raise ValueError(f"_weight must have shape ({total},), got {tuple(_weight.shape)}")
            self.weight = nn.Parameter(memory.fresh_table(_weight.detach().to(device=device, dtype=dtype), copy=True))
        else:
            self.weight = nn.Parameter(memory.empty(total, dtype, device))  # reset_parameters fills it
            self.reset_parameters()
        self.optimizer = None
        if optimizer is not None:
            self._attach(optimizer)

    @staticmethod
    def _global_offsets(per_table) -> torch.Tensor:
        sizes = torch.cat(per_table) if per_table else torch.zeros(0, dtype=torch.int64)
        off = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=off[1:])
        return off

    # ---- tables ---------------------------------------------------------------------------
    def embedding_bag_configs(self) -> list:
        """The tables as ``torchrec.EmbeddingBagConfig`` when torchrec is installed (as
        EmbeddingBagCollection gives them, for planners and sharders), else as pme's
        :class:`EmbeddingBagConfig` (the same fields; pooling ``"sum"`` / ``"mean"``)."""
        tr = _torchrec_configs()
        if tr is not None:
            config, pooling, data_type = tr
            kind = {torch.float16: "FP16", torch.bfloat16: "BF16"}.get(self.weight.dtype, "FP32")
            return [
                config(
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    name=t.name,
                    data_type=data_type[kind],
                    feature_names=list(t.feature_names),
                    pooling=pooling[t.pooling.upper()],
                    weight_init_max=t.init_max,
                    weight_init_min=t.init_min,
                )
                for t in self._tables
            ]
        return [
            EmbeddingBagConfig(
                t.num_embeddings, t.embedding_dim, t.name, list(t.feature_names), t.pooling, t.init_max, t.init_min
            )
            for t in self._tables
        ]

    @property
    def table_names(self) -> list:
        return [t.name for t in self._tables]

    def embedding_names(self) -> list:
        """Output keys in output order (``feature`` or ``feature@table``, as TorchRec)."""
        return list(self._embedding_names)

    def _table_index(self, name) -> int:
        for i, t in enumerate(self._tables):
            if t.name == name:
                return i
        raise KeyError(f"no table {name!r} in the collection (tables: {self.table_names})")

    def _row_span(self, i: int):
        self._check_materialised()
        if self.offsets.is_meta:
            raise RuntimeError(
                f"{type(self).__name__} is on the meta device, where its tables' row sizes are not known: the "
                "per-table views, sizes, memory_report() and state_dict() need the collection built on a real device"
            )
        r0, r1 = int(self.table_rows[i]), int(self.table_rows[i + 1])
        return r0, r1, int(self.offsets[r0]), int(self.offsets[r1])

    def table_offsets(self, name) -> torch.Tensor:
        """``[V_t + 1]`` int64: the table's own offsets (starting at 0)."""
        r0, r1, e0, _ = self._row_span(self._table_index(name))
        return self.offsets[r0 : r1 + 1] - e0

    def table_weight(self, name) -> torch.Tensor:
        """``[total_t]``: a view of the table's rows in the flat buffer."""
        _, _, e0, e1 = self._row_span(self._table_index(name))
        return self.weight[e0:e1]

    def sizes(self, name) -> torch.Tensor:
        """``[V_t]`` int64: the stored length of every row of table ``name``."""
        o = self.table_offsets(name)
        return o[1:] - o[:-1]

    def to_dense(self, name=None):
        """Dense view ``[V_t, D_t]`` of table ``name`` (rows zero-padded), or ``{name: view}`` for all."""
        if name is None:
            return {t.name: self.to_dense(t.name) for t in self._tables}
        t = self._tables[self._table_index(name)]
        return ops.to_dense(self.table_weight(name), self.table_offsets(name), t.embedding_dim)

    def reset_parameters(self):
        """Each table uniform in ``[weight_init_min, weight_init_max]`` (TorchRec's default)."""
        if self.weight.is_meta:
            return  # no values to draw on the meta device
        with torch.no_grad():
            for i, t in enumerate(self._tables):
                _, _, e0, e1 = self._row_span(i)
                self.weight[e0:e1].uniform_(t.init_min, t.init_max)

    # ---- memory accounting ----------------------------------------------------------------
    def num_stored(self) -> int:
        return self.weight.numel()

    def memory_report(self) -> dict:
        """Stored entries and bytes, per table and in all, next to the dense tables'."""
        es = self.weight.element_size()
        per = {}
        for i, t in enumerate(self._tables):
            r0, r1, e0, e1 = self._row_span(i)
            dense = t.num_embeddings * t.embedding_dim
            per[t.name] = {
                "rows": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "stored_entries": e1 - e0,
                "dense_entries": dense,
                "entry_fraction": (e1 - e0) / dense,
                "bytes": (e1 - e0) * es + (r1 - r0 + 1) * 8,
                "dense_bytes": dense * es,
            }
        stored = self.weight.numel()
        dense = sum(p["dense_entries"] for p in per.values())
        return {
            "tables": per,
            "stored_entries": stored,
            "dense_entries": dense,
            "entry_fraction": stored / dense,
            "bytes": stored * es + self.offsets.numel() * 8,
            "dense_bytes": dense * es,
        }

    def extra_repr(self) -> str:
        lines = []
        for t in self._tables:
            # no sizes to show: built on the meta device (as TorchRec does), or moved off it by to_empty()
            unknown = (
                "meta device" if self.offsets.is_meta else "to_empty" if self.__dict__.get("_unmaterialised") else None
            )
            if unknown:
                lines.append(
                    f"({t.name}): {t.num_embeddings} x {t.embedding_dim}, pooling={t.pooling!r}, "
                    f"features={list(t.feature_names)}, sizes=? ({unknown})"
                )
                continue
            s = self.sizes(t.name).cpu()
            lines.append(
                f"({t.name}): {t.num_embeddings} x {t.embedding_dim}, pooling={t.pooling!r}, "
                f"features={list(t.feature_names)}, sizes={_summary(s)}, "
                f"stored={100 * int(s.sum()) / (t.num_embeddings * t.embedding_dim):.1f}% of dense"
            )
        head = f"tables={len(self._tables)}, out_width={self.out_width}, stored={self.weight.numel():,}"
        if self.is_weighted:
            head += ", is_weighted=True"
        if self.weight.dtype != torch.float32:
            head += f", dtype={self.weight.dtype}"
        if self.optimizer is not None:
            head += f", optimizer={self.optimizer!r}"
        return head + "\n" + "\n".join(lines)

    # ---- input normal form ----------------------------------------------------------------
    def _block_width(self) -> int:
        """The widest output block (every input has all blocks): what the table's sizes are checked against."""
        return max([self._tables[ti].embedding_dim for ti, _, _ in self._blocks] + [1])

    def _features(self, keys) -> torch.Tensor:
        """``[F, 5]`` int64 on the table's device for an input whose keys come in ``keys`` order."""
        keys = tuple(keys)
        dev = self.weight.device
        hit = self._feature_cache.get((keys, dev))
        if hit is not None:
            return hit
        pos = {k: i for i, k in enumerate(keys)}
        rows = []
        for ti, f, col in self._blocks:
            if f not in pos:
                raise KeyError(
                    f"the input has no feature {f!r} (table {self._tables[ti].name!r} reads it); "
                    f"its keys are {list(keys)}"
                )
            t = self._tables[ti]
            rows.append([ti, pos[f], col, t.embedding_dim, POOLINGS[t.pooling]])
        out = torch.tensor(rows, dtype=torch.int64).reshape(-1, _F).to(dev)
        if not torch.compiler.is_compiling():  # a traced tensor must not outlive its trace
            self._feature_cache[(keys, dev)] = out
        return out

    def _normal_form(self, features):
        """Input -> (keys, indices, bag_offsets, weights or None, B). A KJT with a variable batch per
        feature (VBE): each feature's ``B_f`` bags followed by empty ones up to ``B``, the largest
        ``B_f`` of the features the collection reads (:meth:`_read_batch`)."""
        self._check_materialised()
        if _is_kjt(features):
            keys = features.keys()
            values, offs = features.values(), features.offsets()
            w = features.weights_or_none()
            if offs.device.type == "cpu":
                _check_bag_ends(offs.unsqueeze(0), [values.numel()], [""])
            if _variable_batch(features):
                B = self._read_batch(features)
                offs = _pad_variable_batch(offs, features.stride_per_key(), B)
            else:
                B = features.stride()
                if offs.dim() != 1 or offs.numel() != len(keys) * B + 1:
                    raise ValueError(
                        f"the KeyedJaggedTensor has {offs.numel()} offsets but {len(keys)} keys x batch {B} "
                        f"need {len(keys) * B + 1}"
                    )
        elif isinstance(features, Mapping):
            keys, vals, raw, wl = [], [], [], []
            B = None
            read = self._read_keys()
            dev = self.weight.device
            for k, item in features.items():
                if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                    raise TypeError(
                        f"feature {k!r}: expected (values, offsets) or (values, offsets, weights), got "
                        f"{type(item).__name__}"
                    )
                if k not in read:
                    continue  # as EmbeddingBagCollection: a feature no table reads is ignored
                v, o = item[0], item[1]
                if not isinstance(v, torch.Tensor) or not isinstance(o, torch.Tensor) or v.dim() != 1 or o.dim() != 1:
                    raise ValueError(f"feature {k!r}: values and offsets must be 1-D tensors")
                for what, x in (("values", v), ("offsets", o)):
                    if x.dtype not in ops.INDEX_DTYPES:
                        raise TypeError(f"feature {k!r}: {what} must be int32 or int64, got {x.dtype}")
                if len(item) == 3 and item[2] is not None:
                    wk = item[2]
                    if not isinstance(wk, torch.Tensor) or wk.dim() != 1 or wk.numel() != v.numel():
                        raise ValueError(
                            f"feature {k!r}: weights must be 1-D with one entry per value ({v.numel()}), got "
                            f"{tuple(wk.shape) if isinstance(wk, torch.Tensor) else type(wk).__name__}"
                        )
                    if not wk.is_floating_point():
                        raise TypeError(f"feature {k!r}: weights must be floating point, got {wk.dtype}")
                for what, x in (("values", v), ("offsets", o), ("weights", item[2] if len(item) == 3 else None)):
                    if x is not None and x.device != dev:
                        raise ValueError(f"feature {k!r}: its {what} are on {x.device} but the collection is on {dev}")
                if o.numel() < 1:
                    raise ValueError(f"feature {k!r}: offsets must have B + 1 >= 1 entries (they include the end)")
                if B is None:
                    B = o.numel() - 1
                elif o.numel() - 1 != B:
                    raise ValueError(
                        f"feature {k!r} has {o.numel() - 1} bags but the first feature has {B}; every "
                        "feature needs the same batch size"
                    )
                keys.append(k)
                vals.append(v)
                raw.append(o.long())
                wl.append(item[2] if len(item) == 3 else None)
            if not keys:
                raise ValueError(
                    f"the input has none of the features the collection reads ({sorted(read)})"
                    if features
                    else "the input has no features"
                )
            # every feature's bags at once: [F, B + 1], checked, then shifted by the values before it
            raw = torch.stack(raw)
            counts = [v.numel() for v in vals]
            _check_bag_ends(raw, counts, keys)
            starts = [0]
            for n in counts[:-1]:
                starts.append(starts[-1] + n)
            shift = torch.tensor(starts, dtype=torch.int64, device=raw.device).unsqueeze(1)
            offs = torch.cat([raw[0, :1], (raw[:, 1:] + shift).reshape(-1)])
            dtype = torch.int64 if any(v.dtype == torch.int64 for v in vals) else vals[0].dtype
            values = torch.cat([v if v.dtype == dtype else v.to(dtype) for v in vals])
            if any(x is not None for x in wl):
                if any(x is None for x in wl):
                    without = [k for k, x in zip(keys, wl) if x is None]
                    raise ValueError(f"either every feature carries weights or none does: features {without} have none")
                w = torch.cat(wl)
            else:
                w = None
        else:
            raise TypeError(
                "features must be a torchrec KeyedJaggedTensor or a mapping {feature: (values, offsets)}, "
                f"got {type(features).__name__}"
            )
        if values.dtype not in ops.INDEX_DTYPES:
            raise TypeError(f"values (indices) must be int32 or int64, got {values.dtype}")
        dev = self.weight.device
        if values.device != dev:
            raise ValueError(f"the input is on {values.device} but the collection is on {dev}")
        if offs.dtype != values.dtype:
            offs = offs.to(values.dtype)
        if self.is_weighted:
            if w is None:
                raise ValueError("the collection is weighted (is_weighted=True) but the input carries no weights")
            if not w.is_floating_point():
                raise TypeError(f"the input's weights must be floating point, got {w.dtype}")
            # (eager only: traced, the operator checks it, without tying two dynamic sizes in the graph)
            if not torch.compiler.is_compiling() and (w.dim() != 1 or w.numel() != values.numel()):
                raise ValueError(
                    f"the input's weights must be 1-D with one entry per value ({values.numel()}), got shape "
                    f"{tuple(w.shape)}"
                )
            if w.device != dev:
                raise ValueError(f"the input's weights are on {w.device} but the collection is on {dev}")
            if w.dtype != self.weight.dtype:
                w = w.to(self.weight.dtype)
        elif w is not None:
            w = None  # as EmbeddingBagCollection: an unweighted collection ignores the input's weights
        return keys, values.contiguous(), offs.contiguous(), (w.contiguous() if w is not None else None), _batch_size(B)

    def _read_keys(self) -> set:
        """The input features some output block reads."""
        return {f for _, f, _ in self._blocks}

    def _read_batch(self, kjt) -> int:
        """A VBE KJT's batch as the collection pools it: the largest batch of a feature it reads."""
        read = self._read_keys()
        return max([int(b) for k, b in zip(kjt.keys(), kjt.stride_per_key()) if k in read], default=0)

    def _variable_batch_rows(self, kjt) -> _VariableBatch | None:
        """A VBE KJT's inverse indices for the features the collection reads, checked (None when
        every feature has the same batch and there are none: nothing to expand)."""
        keys = list(kjt.keys())
        strides = [int(b) for b in kjt.stride_per_key()]
        inv = _inverse_indices(kjt)
        read = self._read_keys()
        if inv is None:
            if len({b for k, b in zip(keys, strides) if k in read}) <= 1:  # one batch: nothing to expand
                return None
            raise ValueError(
                "a KeyedJaggedTensor with a variable batch per feature needs inverse indices "
                "(KeyedJaggedTensor(..., inverse_indices=(keys, [F, B] tensor))) that map every sample to its "
                "bag of each feature, as EmbeddingBagCollection does"
            )
        names, table = inv
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != len(names):
            raise ValueError(
                f"inverse indices must be (keys, [len(keys), B] tensor), got {len(names)} keys and a tensor of shape "
                f"{tuple(getattr(table, 'shape', ()))}"
            )
        if table.dtype not in ops.INDEX_DTYPES:
            raise TypeError(f"inverse indices must be int32 or int64, got {table.dtype}")
        used = [k for k in keys if k in read]  # the features the collection reads, in the KJT's order
        where = {n: i for i, n in enumerate(names)}
        missing = [f for f in used if f not in where]
        if missing:
            raise KeyError(f"the inverse indices have no feature {missing[0]!r}; their keys are {list(names)}")
        dev = self.weight.device
        pos = {k: i for i, k in enumerate(keys)}
        rows = table.to(dev)[[where[f] for f in used]].long()  # [features, B]: bag within the feature
        limits = [strides[pos[f]] for f in used]
        if torch.compiler.is_compiling():  # the graph keeps the check as an operator of its own
            _check_inverse_indices_op(rows, limits, _SEP.join(used))
        else:
            _raise_bad_inverse(rows, limits, used)
        return _VariableBatch(used, rows)

    def _expand_outputs(self, values: torch.Tensor, vb: _VariableBatch) -> torch.Tensor:
        """``[max B_f, out_width]`` pooled bags of each feature -> ``[B, out_width]``, sample ``b``'s
        columns of block k copied from row ``vb.rows[feature of k, b]``. One ``index_select`` over
        the output cut into chunks of ``g`` columns (``g`` divides every block's width and first
        column), so each copy is a contiguous run: about half the time of one call per block."""
        at = {f: u for u, f in enumerate(vb.keys)}
        B, W = vb.rows.shape[1], self.out_width
        blocks = [(c, self._tables[ti].embedding_dim, at[f]) for ti, f, c in self._blocks]
        if not blocks or W == 0:
            return values.new_zeros(B, W)
        g = math.gcd(W, *(d for _, d, _ in blocks), *(c for c, _, _ in blocks))
        n = W // g
        feature_of_chunk = torch.empty(n, dtype=torch.int64)
        for c, d, u in blocks:  # the blocks tile the output (the module builds them so)
            feature_of_chunk[c // g : (c + d) // g] = u
        feature_of_chunk = feature_of_chunk.to(vb.rows.device)
        src = vb.rows.index_select(0, feature_of_chunk) * n + torch.arange(n, device=vb.rows.device).unsqueeze(1)
        return values.reshape(-1, g).index_select(0, src.t().reshape(-1)).view(B, W)

    # ---- forward ----------------------------------------------------------------------------
    def _lookup(self, rows: CollectionRows):
        """:func:`collection_lookup` of a batch (``rows`` without its ``grad_out``)."""
        args, kwargs = rows.operator_args(self)
        return collection_lookup(self.weight, *args, out_width=self.out_width, **kwargs)

    def forward(self, features):
        """KeyedJaggedTensor -> KeyedTensor, or ``{feature: (values, offsets[, weights])}`` -> KeyedOutput.

        Values ``[B, out_width]``: output block ``feature`` of table ``t`` in columns of width
        ``D_t``, equal to ``nn.EmbeddingBag(mode=t.pooling)`` on the table's dense view. A KJT with
        a variable batch per feature (``stride_per_key_per_rank`` and ``inverse_indices``, B the
        inverse indices' width) gives what ``EmbeddingBagCollection`` gives: sample ``b`` reads
        bag ``inverse_indices[f][b]`` of feature ``f``.
        """
        if self.weight.is_meta:  # shapes only (a model built on the meta device, as TorchRec does)
            return self._keyed(features, self.weight.new_empty(self._meta_batch(features), self.out_width))
        vb = self._variable_batch_rows(features) if _variable_batch(features) else None
        keys, idx, bo, psw, B = self._normal_form(features)
        feats = self._features(keys)
        try:
            if self.optimizer is not None and self.training and torch.is_grad_enabled() and not self._frozen:
                self.optimizer.check_attached(self)
                anchor = torch.zeros((), device=self.weight.device, requires_grad=True)
                values = _ConsumedCollectionLookup.apply(anchor, self.optimizer, self, idx, bo, feats, psw, B)
            else:
                values = self._lookup(CollectionRows(None, idx, bo, feats, psw, B))
        except RuntimeError as e:
            named = None if torch.compiler.is_compiling() else self._named_error(e, keys, bo, B)
            if named is None:
                raise
            raise named from None
        if vb is not None:  # VBE: each feature's bags were pooled once; now each sample's copy
            values = self._expand_outputs(values, vb)
        return self._keyed(features, values)

    def _keyed(self, features, values):
        """``values [B, out_width]`` keyed by output name: a KeyedTensor for KJT input, else a KeyedOutput."""
        lengths = [self._tables[ti].embedding_dim for ti, _, _ in self._blocks]
        if _is_kjt(features):
            from torchrec.sparse.jagged_tensor import KeyedTensor

            if values.dtype in (torch.float16, torch.bfloat16):
                values = values.float()  # EmbeddingBagCollection returns float32 for half tables
            return KeyedTensor(keys=self.embedding_names(), length_per_key=lengths, values=values)
        return KeyedOutput(self.embedding_names(), lengths, values)

    def _meta_batch(self, features) -> int:
        """The batch size of an input, from its shapes alone (the meta device has no values); an
        input with values (not on the meta device) is refused, as the tables refuse one."""
        values = features.values() if _is_kjt(features) else None
        if isinstance(features, Mapping) and features:
            item = next(iter(features.values()))
            values = item[0] if isinstance(item, (tuple, list)) and item else None
        if isinstance(values, torch.Tensor) and not values.is_meta:
            raise ValueError(f"input is on {values.device} but the collection is on meta (built on the meta device)")
        if _is_kjt(features):
            inv = _inverse_indices(features) if _variable_batch(features) else None
            return inv[1].shape[1] if inv is not None else features.stride()
        if not isinstance(features, Mapping) or not features:
            raise TypeError("features must be a KeyedJaggedTensor or a non-empty mapping {feature: (values, offsets)}")
        return next(iter(features.values()))[1].numel() - 1

    _BAD_INDEX = re.compile(
        r"index out of range: indices\[(\d+)\] = (-?\d+) \(key (\d+), output block \d+\) but table (\d+) has (\d+) rows"
    )

    _DECREASING = re.compile(r"bag offsets must be non-decreasing, but offsets\[(\d+)\]")

    def _named_error(self, e, keys, bo, B):
        """The operators' message for a bad index or decreasing bag offsets (positions in the
        concatenated input, keys and tables by number) said with the feature's and table's names
        and the position inside the feature's own values; None for other errors."""
        d = self._DECREASING.search(str(e))
        if d is not None and B > 0 and (int(d.group(1)) - 1) // B < len(keys):
            p = int(d.group(1)) - 1  # bags p and p + 1 of the concatenated batch
            s0 = int(bo[(p // B) * B])  # the feature's first value
            return type(e)(
                f"pme: feature {keys[p // B]!r}: its offsets decrease at bag {p % B} ({int(bo[p]) - s0} then "
                f"{int(bo[p + 1]) - s0}); lengths must be >= 0"
            )
        m = self._BAD_INDEX.search(str(e))
        if m is None:
            return None
        j, i, g, t, vt = (int(x) for x in m.groups())
        if g >= len(keys) or t >= len(self._tables):
            return None
        start = int(bo[g * B])
        return type(e)(
            f"pme: index out of range: feature {keys[g]!r} value {j - start} is {i}, but table "
            f"{self._tables[t].name!r} has {vt} rows ({'valid: 0 to ' + str(vt - 1) if vt else 'it has none'})"
        )

    # ---- fused optimizer (a pme.ops.RowConsumer) --------------------------------------------
    def _attach(self, opt):
        from .optim import FusedOptimizer

        if not isinstance(opt, FusedOptimizer):
            raise TypeError(
                f"optimizer must be a pme.optim optimizer (SGD, RowwiseAdagrad, Adam), got {type(opt).__name__}"
            )
        for b in opt.state(self):
            if not b.host and b.per is None and tuple(b.shape) != (0,):
                raise NotImplementedError(
                    f"pme: {type(opt).__name__}'s state {b.name} {tuple(b.shape)} is neither "
                    "per row nor per entry: a collection cannot save it table by table"
                )
        opt.attach(self)

    def _apply(self, fn, recurse=True):
        # As pme.modules: the consumer's state keeps its own dtype and device rules (pme.ops.RowConsumer);
        # the feature tables are rebuilt on the new device.
        was_meta = self.offsets.is_meta
        if self.optimizer is None:
            super()._apply(fn, recurse)
        else:
            with self.optimizer.state_kept(self):
                super()._apply(fn, recurse)
        self._feature_cache = {}
        if was_meta and not self.offsets.is_meta:
            # off the meta device only to_empty (a parent module's: it reaches the collection
            # here) can take it; the offsets and table rows are now uninitialised memory
            self._unmaterialised = True
            raise NotImplementedError(self._TO_EMPTY)
        return self

    _TO_EMPTY = (
        "to_empty(): a collection's offsets and table rows are structure, not values to fill later; build it "
        "on its real device (device=...) and load a checkpoint there"
    )

    def to_empty(self, *, device, recurse=True):
        """Not supported: a collection's row layout (offsets, table rows) is structure that
        ``to_empty`` would leave uninitialised; build the collection on its device. (A parent
        module's ``to_empty`` raises the same, and the collection refuses every later use.)"""
        raise NotImplementedError(f"{type(self).__name__}.{self._TO_EMPTY}")

    def _check_materialised(self):
        if self.__dict__.get("_unmaterialised"):
            raise RuntimeError(f"{type(self).__name__} was moved off the meta device by {self._TO_EMPTY}")

    # ---- state_dict per table ---------------------------------------------------------------
    def _state(self):
        """The attached optimizer's buffers (``pme.ops.StateBuffer``): per table, then the host ones."""
        if self.optimizer is None:
            return [], []
        specs = self.optimizer.state(self)
        return [b for b in specs if not b.host], [b for b in specs if b.host]

    def _state_per_row(self) -> dict:
        """``{buffer name: "rows" | "entries" | "none"}``: how each per-table optimizer buffer is cut
        (by rows, by stored entries, or empty), for code that splits or merges checkpoints by table."""
        return {b.name: {"row": "rows", "entry": "entries"}.get(b.per, "none") for b in self._state()[0]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Copies (not views): a view of one table would make torch.save write the whole buffer.
        per_table, host = self._state()
        for i, t in enumerate(self._tables):
            r0, r1, e0, e1 = self._row_span(i)
            p = f"{prefix}{self._state_prefix}.{t.name}."
            w = self.weight[e0:e1]
            destination[p + "weight"] = (w if keep_vars else w.detach()).clone()
            destination[p + "offsets"] = self.offsets[r0 : r1 + 1] - e0
            for b in per_table:
                buf = getattr(self, b.name)
                part = buf[r0:r1] if b.per == "row" else buf[e0:e1] if b.per == "entry" else buf[:0]
                destination[p + b.name] = part.detach().clone()
        for b in host:
            destination[prefix + b.name] = getattr(self, b.name).detach().clone()

    def _from_dense_checkpoint(self, state_dict, prefix, error_msgs):
        """A table given as a dense ``[V, D]`` weight without offsets (a torchrec
        ``EmbeddingBagCollection``'s checkpoint, whose keys are the same) keeps this collection's
        sizes: each row its first ``sizes[i]`` values (a fused optimizer's state then starts fresh,
        :meth:`_fresh_optim_state`). Returns the state dict to load."""
        out = None
        for t in self._tables:
            p = f"{prefix}{self._state_prefix}.{t.name}."
            w = state_dict.get(p + "weight")
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or (p + "offsets") in state_dict:
                continue
            if tuple(w.shape) != (t.num_embeddings, t.embedding_dim) or w.dtype not in ops.WEIGHT_DTYPES:
                error_msgs.append(
                    f"{p}weight: a dense table must be a float [{t.num_embeddings}, {t.embedding_dim}] tensor, "
                    f"got {w.dtype} {tuple(w.shape)}"
                )
                continue
            out = dict(state_dict) if out is None else out
            offs = self.table_offsets(t.name).cpu()
            keep = torch.arange(t.embedding_dim).unsqueeze(0) < (offs[1:] - offs[:-1]).unsqueeze(1)
            out[p + "weight"] = w.detach()[keep.to(w.device)]
            out[p + "offsets"] = offs
        return state_dict if out is None else out

    def _fresh_optim_state(self, state_dict, prefix):
        """A checkpoint of the tables' values without the fused optimizer's state (saved without
        one, or a torchrec EmbeddingBagCollection's): the state of each such table starts fresh
        (zeros; the step count 0 when no table has state). Returns the state dict to load."""
        per_table, host = self._state()
        if not per_table and not host:
            return state_dict
        out = dict(state_dict)
        fresh_all = True
        for t in self._tables:
            p = f"{prefix}{self._state_prefix}.{t.name}."
            have = [b for b in per_table if p + b.name in state_dict]
            if have or p + "weight" not in state_dict or p + "offsets" not in state_dict:
                fresh_all = fresh_all and not have
                continue
            w = state_dict[p + "weight"]
            entries = w.numel() if isinstance(w, torch.Tensor) else 0  # (a bad weight is refused later)
            for b in per_table:
                n = t.num_embeddings if b.per == "row" else entries if b.per == "entry" else 0
                out[p + b.name] = torch.zeros(n, dtype=getattr(self, b.name).dtype)
        for b in host:
            if prefix + b.name not in state_dict and fresh_all:
                out[prefix + b.name] = torch.zeros_like(getattr(self, b.name))
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._refuse_meta_checkpoint(prefix, error_msgs):
            return
        per_table, host = self._state()
        state_dict = self._fresh_optim_state(self._from_dense_checkpoint(state_dict, prefix, error_msgs), prefix)
        expected = []
        for t in self._tables:
            p = f"{prefix}{self._state_prefix}.{t.name}."
            expected += [p + "weight", p + "offsets"] + [p + b.name for b in per_table]
        expected += [prefix + b.name for b in host]
        missing = [k for k in expected if k not in state_dict]
        missing_keys.extend(missing)
        strict = load_is_strict(strict)  # (torch passes strict=True down whatever the call said)
        if strict:
            own = prefix + self._state_prefix + "."
            unexpected_keys.extend(k for k in state_dict if k.startswith(own) and k not in expected)
        if missing and strict:
            return  # all or nothing: torch raises for the missing keys
        if missing:
            # strict=False: load the tables the checkpoint holds whole and keep the others as they are
            own = {}
            self._save_to_state_dict(own, prefix, keep_vars=False)
            state_dict = dict(state_dict)
            for t in self._tables:
                p = f"{prefix}{self._state_prefix}.{t.name}."
                keys = [k for k in own if k.startswith(p)]
                if any(k not in state_dict for k in keys):
                    state_dict.update({k: own[k] for k in keys})
            state_dict.update({k: own[k] for k in (prefix + b.name for b in host) if k not in state_dict})
        # Validate every table first; replace nothing unless all are good.
        weights, offs, st = [], [], {b.name: [] for b in per_table}
        errors = []
        for _i, t in enumerate(self._tables):
            p = f"{prefix}{self._state_prefix}.{t.name}."
            w, o = state_dict[p + "weight"], state_dict[p + "offsets"]
            try:
                if not isinstance(o, torch.Tensor) or o.dtype != torch.int64 or o.shape != (t.num_embeddings + 1,):
                    raise ValueError(
                        f"offsets must be int64 [{t.num_embeddings + 1}], got "
                        f"{getattr(o, 'dtype', type(o))} {tuple(getattr(o, 'shape', ()))}"
                    )
                if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype not in ops.WEIGHT_DTYPES:
                    raise ValueError("weight must be a 1-D float tensor")
                o = o.detach().cpu()
                ops.check_offsets(o, w.numel(), t.embedding_dim)
                for b in per_table:
                    s = state_dict[p + b.name]
                    n = t.num_embeddings if b.per == "row" else w.numel() if b.per == "entry" else 0
                    b._replace(shape=(n,)).check(s)
                    st[b.name].append(s)
            except ValueError as e:
                errors.append(f"{p[:-1]}: {e}")
                continue
            weights.append(w)
            offs.append(o)
        for b in host:
            try:
                b.check(state_dict[prefix + b.name])
            except ValueError as e:
                errors.append(f"{prefix}{b.name}: {e}")
        if errors:
            error_msgs.extend(errors)
            return
        sizes = [o[1:] - o[:-1] for o in offs]
        new_off = memory.fresh_table(self._global_offsets(sizes).to(self.offsets.device))
        dev, dtype = self.weight.device, self.weight.dtype
        flat = torch.cat([w.detach().to(device=dev, dtype=dtype) for w in weights])
        with torch.no_grad():
            if flat.numel() == self.weight.numel():
                self.weight.copy_(flat)
            else:
                self.weight = nn.Parameter(memory.fresh_table(flat), requires_grad=self.weight.requires_grad)
        self.offsets = new_off
        for b in per_table:
            buf = getattr(self, b.name)
            setattr(self, b.name, torch.cat([s.detach().to(device=buf.device, dtype=buf.dtype) for s in st[b.name]]))
        for b in host:
            getattr(self, b.name).copy_(state_dict[prefix + b.name].reshape(()))

    # ---- constructors -----------------------------------------------------------------------
    def subset(self, table_names) -> MultiSizeEmbeddingBagCollection:
        """A new collection of the named tables (in that order), with copies of their rows, sizes
        and fused-optimizer state: the unit a table-wise sharder places on one rank."""
        idx = [self._table_index(n) for n in table_names]
        if len(set(idx)) != len(idx):
            raise ValueError(f"table names repeat: {list(table_names)}")
        cfgs = [self.embedding_bag_configs()[i] for i in idx]
        opt = None
        if self.optimizer is not None:
            opt = type(self.optimizer).__new__(type(self.optimizer))
            opt.__dict__.update(self.optimizer.__dict__)
        kwargs = {} if type(self) is not MultiSizeEmbeddingBagCollection else {"is_weighted": self.is_weighted}
        new = type(self)(
            cfgs,
            {n: self.sizes(n).cpu() for n in table_names},
            device=self.weight.device,
            dtype=self.weight.dtype,
            optimizer=opt,
            **kwargs,
        )
        sd = self.state_dict()
        host = {b.name for b in self._state()[1]}
        keep = {k: v for k, v in sd.items() if k in host or k.split(".")[1] in set(table_names)}
        new.load_state_dict(keep)
        return new

    @classmethod
    def from_ebc(cls, ebc, sizes=None, scores=None, order: str = "position", **kwargs):
        """Multi-size copy of a ``torchrec.EmbeddingBagCollection`` (tables, features, pooling, weights).

        Row ``i`` of table ``t`` keeps its first ``sizes[t][i]`` values (or its best by
        ``scores[t]`` ``[V_t, D_t]``, packed in ``order``); ``sizes`` as the constructor takes it.
        Other keyword arguments go to the constructor (``optimizer=``, ...).
        """
        configs = ebc.embedding_bag_configs()
        dense = {c.name: ebc.embedding_bags[c.name].weight.detach() for c in configs}
        return cls.from_dense(
            configs,
            dense,
            sizes,
            scores=scores,
            order=order,
            is_weighted=kwargs.pop("is_weighted", ebc.is_weighted()),
            **kwargs,
        )

    @classmethod
    def from_dense(cls, tables, dense, sizes=None, scores=None, order: str = "position", **kwargs):
        """A collection whose table ``t`` keeps ``sizes[t]`` entries of ``dense[t]`` ``[V_t, D_t]`` per row.

        ``dense`` is ``{table name: [V_t, D_t]}`` (or a list in table order); ``scores`` likewise
        (optional) picks the kept entries by score, as ``MultiSizeEmbeddingBag.from_dense``.
        """
        tabs = [_table_of(c, i) for i, c in enumerate(tables)]
        dense = _per_table(dense, tabs, "dense")
        missing = [t.name for t in tabs if t.name not in dense]
        if missing:
            raise KeyError(f"dense has no weight for tables {missing} (it has {sorted(dense)})")
        scores = _per_table(scores or {}, tabs, "scores")
        flats = []
        first = next(iter(dense.values()))
        if "dtype" not in kwargs:
            dtypes = {n: d.dtype for n, d in dense.items()}
            if len(set(dtypes.values())) > 1:
                raise ValueError(
                    f"the tables have different dtypes {dtypes}, and a collection holds all its tables in one "
                    "buffer of one dtype: pass dtype= (e.g. dtype=torch.float32) to convert them"
                )
        kwargs.setdefault("dtype", first.dtype)
        kwargs.setdefault("device", first.device)
        for t, s in zip(tabs, _sizes_list(sizes, tabs)):
            w = dense[t.name].detach()
            if w.shape != (t.num_embeddings, t.embedding_dim):
                raise ValueError(
                    f"table {t.name!r}: dense weight has shape {tuple(w.shape)}, expected "
                    f"({t.num_embeddings}, {t.embedding_dim})"
                )
            sz = _table_sizes(s, t).to(w.device)
            sc = scores.get(t.name)
            if sc is None:
                sc = -torch.arange(t.embedding_dim, dtype=torch.float32, device=w.device).expand_as(w).contiguous()
            elif tuple(sc.shape) != tuple(w.shape):
                raise ValueError(
                    f"table {t.name!r}: scores have shape {tuple(sc.shape)}, expected {tuple(w.shape)} "
                    "(the dense table's)"
                )
            flat, _ = ops.prune_pack(w, sc.detach().float(), sz, order)
            flats.append(flat)
        sizes_l = [_table_sizes(s, t) for s, t in zip(_sizes_list(sizes, tabs), tabs)]
        return cls(tables, sizes=sizes_l, _weight=torch.cat(flats), **kwargs)


def _per_table(x, tabs, what: str) -> dict:
    """``{table name: tensor}`` from a mapping by name or a list in table order (``what`` names the
    argument in errors): a name the collection does not have, or a list of another length, is refused."""
    names = [t.name for t in tabs]
    if isinstance(x, Mapping):
        unknown = [k for k in x if k not in names]
        if unknown:
            raise KeyError(f"{what} names tables {unknown} that the collection does not have ({names})")
        return dict(x)
    x = list(x)
    if len(x) != len(tabs):
        raise ValueError(f"{what} has {len(x)} entries but there are {len(tabs)} tables ({names})")
    return dict(zip(names, x))


def _is_ebc(mod) -> bool:
    return hasattr(mod, "embedding_bag_configs") and hasattr(mod, "embedding_bags") and hasattr(mod, "is_weighted")


def convert(model: nn.Module, sizes_by_module: Mapping, init: str = "kept", scores=None, **kwargs) -> nn.Module:
    """``pme.convert`` that also swaps TorchRec collections, in place.

    A name of ``sizes_by_module`` that is a ``torchrec.EmbeddingBagCollection`` becomes a
    :class:`MultiSizeEmbeddingBagCollection` (``from_ebc``; its sizes are ``{table name: sizes}``,
    ``scores`` likewise ``{table name: [V_t, D_t]}``); every other name goes to
    ``pme.modules.convert`` (nn.EmbeddingBag / nn.Embedding). Returns ``model``.
    """
    from . import modules

    if not isinstance(sizes_by_module, Mapping):
        raise TypeError("sizes_by_module must be a mapping {module name: sizes}")
    named = dict(model.named_modules(remove_duplicate=False))
    modules._check_targets(named, sizes_by_module)
    rest = {}
    for name, sizes in sizes_by_module.items():
        mod = named.get(name)
        if not _is_ebc(mod):
            rest[name] = sizes
            continue
        if init != "kept":
            raise NotImplementedError(f"pme: init={init!r} is not supported for collections (only 'kept')")
        new = MultiSizeEmbeddingBagCollection.from_ebc(mod, sizes, scores=(scores or {}).get(name), **kwargs)
        modules.replace_module(model, mod, new)
    if rest:
        own = {n: sc for n, sc in (scores or {}).items() if n in rest}
        modules.convert(model, rest, init=init, scores=own or None, **kwargs)
    return model


class MultiSizeEmbeddingCollection(MultiSizeEmbeddingBagCollection):
    """TorchRec's non-pooled ``EmbeddingCollection`` over multi-size tables (one flat buffer).

    Tables as :class:`MultiSizeEmbeddingBagCollection` takes them (``torchrec.EmbeddingConfig``
    accepted; pooling is ignored); as TorchRec, every table has the same ``embedding_dim`` D.
    ``forward(kjt)`` returns ``{embedding name: torchrec.JaggedTensor}`` whose values are
    ``[n_f, D]`` (one zero-padded row per lookup, equal to ``nn.Embedding`` on the dense view) and
    whose lengths are the feature's; a mapping ``{feature: (values, offsets [B + 1])}`` returns
    ``{embedding name: (embeddings [n_f, D], offsets)}``. All features are looked up in one call
    (``pme::embedding_forward`` on the whole buffer, rows shifted by their table's first row).
    The fused optimizers are not offered here (use the dense gradient of ``weight``).
    """

    _state_prefix = "embeddings"  # as torchrec.EmbeddingCollection

    def __init__(self, tables, sizes=None, device=None, dtype=None, _weight=None, optimizer=None):
        if optimizer is not None:
            raise NotImplementedError(
                "pme: MultiSizeEmbeddingCollection has no fused optimizer yet; train its weight with a torch optimizer"
            )
        super().__init__(tables, sizes, is_weighted=False, device=device, dtype=dtype, _weight=_weight)
        dims = {t.embedding_dim for t in self._tables}
        if len(dims) != 1:
            raise ValueError(
                f"all tables of an EmbeddingCollection must have the same embedding_dim (as TorchRec), "
                f"got {sorted(dims)}"
            )
        self.embedding_dim = dims.pop()

    def _meta_forward(self, features):
        """Shapes only (a model built on the meta device, as TorchRec does): each output's values
        ``[n_f, D]`` on meta, with the input feature's lengths (KJT) or offsets (mapping)."""
        self._meta_batch(features)  # refuses an input with values
        kjt = _is_kjt(features)
        if kjt:
            from torchrec.sparse.jagged_tensor import JaggedTensor

            parts = features.to_dict()
        elif isinstance(features, Mapping):
            parts = features
        out = {}
        dtype = torch.float32 if kjt and self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        for name, (ti, f, _) in zip(self.embedding_names(), self._blocks):
            if f not in parts:
                raise KeyError(
                    f"the input has no feature {f!r} (table {self._tables[ti].name!r} reads it); its keys "
                    f"are {list(parts)}"
                )
            if kjt:
                jt = parts[f]
                vals = self.weight.new_empty(jt.values().shape[0], self.embedding_dim, dtype=dtype)
                out[name] = JaggedTensor(values=vals, lengths=jt.lengths(), offsets=jt.offsets())
            else:
                v, o = parts[f][0], parts[f][1]
                out[name] = (self.weight.new_empty(v.shape[0], self.embedding_dim, dtype=dtype), o)
        return out

    def forward(self, features):
        if self.weight.is_meta:
            return self._meta_forward(features)
        keys, idx, bo, _, B = self._normal_form(features)
        pos = {k: i for i, k in enumerate(keys)}
        # a variable batch per feature (VBE): feature g has its own B_g bags (then empty ones to B)
        nbags = dict(zip(keys, features.stride_per_key())) if _variable_batch(features) else {}
        bo = bo.long()
        down = (bo[1:] < bo[:-1]).nonzero()
        if down.numel():  # (the pooled operators check this themselves; here the offsets only cut)
            p = int(down[0])
            s0 = int(bo[(p // B) * B])  # the feature's first value
            raise ValueError(
                f"feature {keys[p // B]!r}: its offsets decrease at bag {p % B} ({int(bo[p]) - s0} then "
                f"{int(bo[p + 1]) - s0}); lengths must be >= 0"
            )
        rows = self.table_rows.tolist()
        parts, spans = [], []
        for ti, f, _ in self._blocks:
            if f not in pos:
                raise KeyError(
                    f"the input has no feature {f!r} (table {self._tables[ti].name!r} reads it); its keys "
                    f"are {list(keys)}"
                )
            g = pos[f]
            s, e = int(bo[g * B]), int(bo[g * B + B])
            v = idx[s:e].long()
            vt = self._tables[ti].num_embeddings
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= vt):
                j = int(((v < 0) | (v >= vt)).nonzero()[0])
                raise IndexError(
                    f"pme: index out of range: feature {f!r} value {j} is {int(v[j])}, but table "
                    f"{self._tables[ti].name!r} has {vt} rows (valid: 0 to {vt - 1})"
                )
            parts.append(v + rows[ti])
            spans.append((s, e, g))
        flat = torch.cat(parts) if parts else idx.new_zeros(0, dtype=torch.int64)
        emb = ops.embedding(self.weight, self.offsets, flat, width=self.embedding_dim, _trusted=True)
        out, m = {}, 0
        kjt = _is_kjt(features)
        if kjt:
            from torchrec.sparse.jagged_tensor import JaggedTensor
        for name, (s, e, g) in zip(self.embedding_names(), spans):
            vals = emb[m : m + e - s]
            m += e - s
            offs = bo[g * B : g * B + nbags.get(keys[g], B) + 1] - s
            if kjt:
                if vals.dtype in (torch.float16, torch.bfloat16):
                    vals = vals.float()  # as EmbeddingCollection
                out[name] = JaggedTensor(values=vals, offsets=offs)
            else:
                out[name] = (vals, offs)
        return out
