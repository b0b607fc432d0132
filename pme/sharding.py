"""Sharding multi-size collections with TorchRec's DistributedModelParallel.

``MultiSizeEmbeddingBagCollectionSharder`` is a TorchRec ``ModuleSharder`` for
:class:`pme.collection.MultiSizeEmbeddingBagCollection`: give it to ``DistributedModelParallel``
(and to ``EmbeddingShardingPlanner``) and the collection's tables are placed on ranks, looked up
there by pme's one-call kernel, and trained by the collection's fused optimizer in the backward.
TorchRec moves the data: its ``KJTAllToAll`` sends every feature to the ranks that hold a table
reading it, its ``PooledEmbeddingsAllToAll`` sends the pooled embeddings back (row-wise tables:
its bucketized all-to-all and reduce-scatter); autograd flows through them.

Sharding types (per table, as the plan says):

``table_wise``
    the whole table on one rank.
``column_wise``
    the table's columns ``[c0, c1)`` on one rank per shard. A multi-size row of size ``s`` keeps
    its first ``s`` values (the zero-padded dense view), so a column shard of that row holds
    ``clamp(s - c0, 0, c1 - c0)`` entries: each shard is itself a multi-size table of width
    ``c1 - c0`` (rows past their size store nothing there), and sum / mean pooling of the dense
    view's columns is the pooling of the shards, so outputs and gradients equal the unsharded
    collection's. SGD and Adam work per entry and are exact too; row-wise Adagrad keeps one
    accumulator per row **per shard** (as FBGEMM does under TorchRec's column-wise sharding), so
    its trajectory is that of the collection split into column tables, not of the unsharded one.
``row_wise``
    rows ``[k * ceil(V / W), (k + 1) * ceil(V / W))`` on rank ``k`` (TorchRec's even blocks; a
    table with fewer than ``W`` blocks' worth of rows is refused). A row shard is the table's rows
    as they are (a slice of the flat buffer and its offsets). TorchRec's ``RwSparseFeaturesDist``
    bucketizes each feature's indices by block and sends them to their rank, each rank pools its
    rows' part of every bag of the global batch by sum, and ``PooledEmbeddingsReduceScatter`` adds
    the parts and returns each rank its samples; a mean-pooled table's sum is then divided by the
    bag's length. Every optimizer is exact (a row's state lives on one rank). gloo has
    reduce-scatter under torch 2.14, so this runs on CPU.
others (``data_parallel``, ``table_row_wise``, ...)
    refused (``NotImplementedError``).

TorchRec divides the embedding gradient by the world size in the backward of its all-to-all and
reduce-scatter (``torchrec.distributed.comm_ops.set_gradient_division``): the sharded update is
that of the unsharded collection trained on the mean of the ranks' losses, as DDP does for the
dense parameters.

The sharded module's ``state_dict`` holds the rank's shards: a table-wise table under the keys of
the unsharded collection (``embedding_bags.<t>.weight`` / ``offsets`` / optimizer state), a column
shard under ``embedding_bags.<t>:<c0>-<c1>of<D>.<...>``, a row shard under
``embedding_bags.<t>:r<r0>-<r1>of<V>.<...>``, plus ``optim_step``. :func:`merge_state_dicts`
joins the rank files into the unsharded form (loadable by the unsharded collection), and a
sharded module loads either its own keys, the unsharded form (it takes its shards out of it) or
a torchrec ``EmbeddingBagCollection``'s dense checkpoint: save on 2 ranks, merge, load on 4 is
resharding. Loading validates everything before anything is replaced (the collection's
all-or-nothing rule; under ``strict=True`` a missing shard changes nothing).

The collection must be on a real device (not meta: its sizes are what the shards are cut by);
each rank's shards are built on ``DistributedModelParallel``'s device straight from it, and they
step with the collection's own fused optimizer object (``optimizer``; a change of its ``lr``
reaches every shard).

Planner: ``shardable_parameters`` shows each table as a meta tensor ``[V, D]`` (so plans are made
in TorchRec's terms), and :class:`MultiSizeStorageEstimator` replaces the dense bytes TorchRec
would charge for each pme shard by its true multi-size bytes (stored entries, offsets, optimizer
state); :func:`planner` builds an ``EmbeddingShardingPlanner`` with it.

Run ``torchrun --nproc-per-node 2 -m pme.sharding`` for a small example (CPU, gloo).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll, PooledEmbeddingsReduceScatter
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.sharding.rw_sharding import RwSparseFeaturesDist
from torchrec.distributed.types import LazyAwaitable, ModuleSharder, ShardedModule, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from . import ops
from .collection import MultiSizeEmbeddingBagCollection, _inverse_indices
from .modules import load_is_strict

__all__ = [
    "MultiSizeEmbeddingBagCollectionSharder",
    "ShardedMultiSizeEmbeddingBagCollection",
    "MultiSizeStorageEstimator",
    "planner",
    "merge_state_dicts",
    "shard_bytes",
]

SUPPORTED = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.ROW_WISE.value)
_PIECE = re.compile(r"^(?P<t>.+):(?P<c0>\d+)-(?P<c1>\d+)of(?P<d>\d+)$")
_ROWS = re.compile(r"^(?P<t>.+):r(?P<r0>\d+)-(?P<r1>\d+)of(?P<v>\d+)$")


def _piece_name(table: str, c0: int, c1: int, width: int) -> str:
    """Name of a column shard in the local collection and in the sharded state_dict."""
    return table if (c0, c1) == (0, width) else f"{table}:{c0}-{c1}of{width}"


def _row_name(table: str, r0: int, r1: int, rows: int) -> str:
    """Name of a row shard."""
    return f"{table}:r{r0}-{r1}of{rows}"


# --------------------------------------------------------------------------------------------
# Column pieces of a flat multi-size table
# --------------------------------------------------------------------------------------------
def column_piece(flat: torch.Tensor, offsets: torch.Tensor, c0: int, c1: int):
    """Columns ``[c0, c1)`` of a multi-size table ``(flat [total], offsets [V + 1])``.

    Row ``i`` (size ``s_i``, its values in columns ``[0, s_i)``) gives its entries in
    ``[c0, min(s_i, c1))``. Returns ``(flat [sum of the piece sizes], sizes [V] int64)``.
    """
    s = offsets[1:] - offsets[:-1]
    ps = (s - c0).clamp(0, c1 - c0)
    if c0 == 0 and bool((ps == s).all()):
        return flat, s
    rows = torch.repeat_interleave(torch.arange(s.numel(), device=flat.device), ps)
    po = torch.zeros(s.numel() + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(ps, 0, out=po[1:])
    within = torch.arange(int(po[-1]), device=flat.device) - po[:-1][rows]
    return flat[offsets[:-1][rows] + c0 + within], ps


def join_columns(pieces, num_rows: int):
    """Inverse of :func:`column_piece`: ``pieces`` = ``[(c0, c1, flat, sizes [V])]`` covering the
    columns in order. Returns ``(flat, offsets [V + 1])``; raises ValueError when a row stores a
    value past a gap (not a multi-size row)."""
    pieces = sorted(pieces, key=lambda p: p[0])
    total = torch.zeros(num_rows, dtype=torch.int64)
    for k, (c0, _c1, _flat, ps) in enumerate(pieces):
        ps = ps.cpu()
        if k and bool(((ps > 0) & (total < c0)).any()):
            bad = int(((ps > 0) & (total < c0)).nonzero()[0])
            raise ValueError(f"row {bad} stores values in columns {c0}.. but not all of the columns before")
        total += ps
    off = torch.zeros(num_rows + 1, dtype=torch.int64)
    torch.cumsum(total, 0, out=off[1:])
    out = torch.zeros(int(off[-1]), dtype=pieces[0][2].dtype)
    for c0, _c1, flat, ps in pieces:
        ps = ps.cpu()
        rows = torch.repeat_interleave(torch.arange(num_rows), ps)
        po = torch.zeros(num_rows + 1, dtype=torch.int64)
        torch.cumsum(ps, 0, out=po[1:])
        within = torch.arange(int(po[-1])) - po[:-1][rows]
        out[off[:-1][rows] + c0 + within] = flat.detach().cpu().to(out.dtype)
    return out, off


# --------------------------------------------------------------------------------------------
# The sharded module
# --------------------------------------------------------------------------------------------
class _Context(Multistreamable):
    """Per-call state from input_dist to output_dist: for mean-pooled row-wise tables, the bag
    lengths that divide their sums."""

    def __init__(self):
        self.rw_lengths = []

    def record_stream(self, stream):
        pass


def _table_views(module: MultiSizeEmbeddingBagCollection) -> dict:
    """``module.state_dict()``'s keys and values as views of the collection's buffers (no copy of
    the whole collection while the shards are cut from it)."""
    per_table, host = module._state()
    out = {}
    for i, t in enumerate(module._tables):
        r0, r1, e0, e1 = module._row_span(i)
        p = f"embedding_bags.{t.name}."
        out[p + "weight"] = module.weight.detach()[e0:e1]
        out[p + "offsets"] = module.offsets[r0 : r1 + 1] - e0
        for b in per_table:
            buf = getattr(module, b.name)
            out[p + b.name] = buf[r0:r1] if b.per == "row" else buf[e0:e1] if b.per == "entry" else buf[:0]
    for b in host:
        out[b.name] = getattr(module, b.name)
    return out


def _skip_dist_buffers(module, incompatible_keys):
    """A parent's ``load_state_dict`` (torch's, not DistributedModelParallel's) also visits the
    sharded module's TorchRec all-to-all modules, whose buffers (dimensions per rank, rebuilt from
    the plan) its ``state_dict`` does not save: they are not missing."""
    own = tuple("." + n for n, _ in module.named_buffers())
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.endswith(own)]


class _KeyedAwaitable(LazyAwaitable[KeyedTensor]):
    def __init__(self, waits, perm, keys, lengths):
        super().__init__()
        self._waits, self._perm, self._keys, self._lengths = waits, perm, keys, lengths

    def _wait_impl(self) -> KeyedTensor:
        parts = []
        for a, post in self._waits:
            v = a.wait()
            parts.append(post(v) if post is not None else v)
        values = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self._perm is not None:
            values = values.index_select(1, self._perm)
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=values)


class ShardedMultiSizeEmbeddingBagCollection(ShardedModule):
    """The rank's part of a :class:`MultiSizeEmbeddingBagCollection` under a TorchRec plan.

    ``forward(kjt)`` takes the rank's batch (``KeyedJaggedTensor``, ``B`` samples; every rank the
    same ``B``) and returns (lazily) a ``KeyedTensor`` ``[B, out_width]`` with the unsharded
    collection's keys, column order and values. ``local`` is the collection of this rank's
    table-wise and column-wise shards, ``local_rw`` that of its row-wise shards (one table per
    shard; either may be None). Built by :class:`MultiSizeEmbeddingBagCollectionSharder`.
    """

    def __init__(self, module: MultiSizeEmbeddingBagCollection, table_shardings: Mapping, env, device=None):
        super().__init__()
        if env.process_group is None:
            raise ValueError("pme sharding needs a ShardingEnv with a process group (DistributedModelParallel's)")
        if module.weight.is_meta:
            raise ValueError(
                "pme sharding: the MultiSizeEmbeddingBagCollection is on the meta device, where its sizes (offsets) "
                "have no values to cut shards from; build it on the CPU (DistributedModelParallel then puts each "
                "rank's shards on its device)"
            )
        # The shards are cut from the collection where it is and built on `device`: the whole
        # collection never goes to a rank's device.
        dev = torch.device(device) if device is not None else module.weight.device
        self._pg = env.process_group
        W = self._world = env.world_size
        self._rank = env.rank
        self._tables = list(module._tables)
        self._names = module.embedding_names()
        self._lengths = [self._tables[ti].embedding_dim for ti, _, _ in module._blocks]
        self.is_weighted = module.is_weighted
        self.optimizer = module.optimizer  # the fused optimizer every shard steps with (lr schedules: set its lr)
        self._opt_name = module.optimizer.name if module.optimizer is not None else None
        unknown = set(table_shardings) - {t.name for t in self._tables}
        if unknown:
            raise ValueError(f"the plan names tables {sorted(unknown)} that the collection does not have")
        # pieces[r] = [(table index, c0, c1)] on rank r (table-wise and column-wise shards);
        # rw[ti] = [(r0, r1) of rank k for k in ranks] (row-wise tables).
        pieces = [[] for _ in range(W)]
        rw = {}
        self.sharding_types = {}
        for ti, t in enumerate(self._tables):
            ps = table_shardings.get(t.name)
            if ps is None:
                raise ValueError(
                    f"the plan has no sharding for table {t.name!r}: pme shards every table of a "
                    "collection (give each a table_wise, column_wise or row_wise sharding)"
                )
            st = ps.sharding_type
            if st not in SUPPORTED:
                raise NotImplementedError(
                    f"table {t.name!r}: sharding type {st!r} is not supported by pme's sharder (supported: "
                    f"{list(SUPPORTED)}); shard this table table_wise, column_wise or row_wise"
                )
            self.sharding_types[t.name] = st
            if st == ShardingType.ROW_WISE.value:
                rw[ti] = self._row_blocks(t, ps.sharding_spec.shards)
                continue
            shards = sorted(ps.sharding_spec.shards, key=lambda s: s.shard_offsets[1])
            col = 0
            for sh in shards:
                r0, c0 = sh.shard_offsets
                nr, nc = sh.shard_sizes
                if r0 != 0 or nr != t.num_embeddings:
                    raise ValueError(
                        f"table {t.name!r}: a {st} shard must hold every row, got rows "
                        f"[{r0}, {r0 + nr}) of {t.num_embeddings}"
                    )
                if c0 != col or nc < 1:
                    raise ValueError(
                        f"table {t.name!r}: shards must cover columns 0..{t.embedding_dim} in order, "
                        f"got a shard at column {c0} of width {nc} after column {col}"
                    )
                rank = sh.placement.rank()
                if not 0 <= rank < W:
                    raise ValueError(f"table {t.name!r}: shard placed on rank {rank} of a world of {W}")
                pieces[rank].append((ti, c0, c0 + nc))
                col = c0 + nc
            if col != t.embedding_dim:
                raise ValueError(f"table {t.name!r}: shards cover columns 0..{col}, not its width {t.embedding_dim}")
        for p in pieces:
            p.sort()
        self._pieces = pieces
        self._rw = rw
        # Table-wise / column-wise entries: (piece, feature) per rank, sent by one KJT all-to-all
        # and returned by one pooled all-to-all. Row-wise entries: (table, feature), bucketized by
        # row block to every rank and returned summed by a reduce-scatter.
        self._entries = [[(ti, c0, c1, f) for ti, c0, c1 in p for f in self._tables[ti].feature_names] for p in pieces]
        self._rw_entries = [(ti, f) for ti in sorted(rw) for f in self._tables[ti].feature_names]
        self._features_per_rank = [len(e) for e in self._entries]
        self._dims_per_rank = [sum(c1 - c0 for _, c0, c1, _ in e) for e in self._entries]
        # Output columns: [all-to-all blocks (rank order) | reduce-scatter blocks] -> unsharded order.
        where, pos = {}, 0
        for e in self._entries:
            for ti, c0, c1, f in e:
                where[(ti, f, c0)] = pos
                pos += c1 - c0
        for ti, f in self._rw_entries:
            where[(ti, f, "rw")] = pos
            pos += self._tables[ti].embedding_dim
        perm = []
        for ti, f, _ in module._blocks:
            if ti in rw:
                perm.extend(range(where[(ti, f, "rw")], where[(ti, f, "rw")] + self._tables[ti].embedding_dim))
                continue
            for _, c0, c1 in sorted({(a, b, c) for p in pieces for a, b, c in p if a == ti}):
                perm.extend(range(where[(ti, f, c0)], where[(ti, f, c0)] + c1 - c0))
        self._perm = None if perm == list(range(len(perm))) else torch.tensor(perm, dtype=torch.int64)
        self._permute_cache = {}
        self._input_dist = self._output_dist = self._rw_input_dist = self._rw_output_dist = None
        if sum(self._features_per_rank):
            self._input_dist = KJTAllToAll(self._pg, self._features_per_rank)
            self._output_dist = PooledEmbeddingsAllToAll(self._pg, self._dims_per_rank)
        if self._rw_entries:
            self._rw_input_dist = RwSparseFeaturesDist(
                self._pg,
                len(self._rw_entries),
                [self._tables[ti].num_embeddings for ti, _ in self._rw_entries],
                device=dev,
            )
            self._rw_output_dist = PooledEmbeddingsReduceScatter(self._pg)
            # mean pooling: the shards pool by sum; the sum is divided by the bag's length after
            # the reduce-scatter (a shard sees only its rows' part of a bag)
            self._rw_mean = [
                (k, self._tables[ti].embedding_dim)
                for k, (ti, _) in enumerate(self._rw_entries)
                if self._tables[ti].pooling == "mean"
            ]
        # The local collections (one table per shard), kept out of _modules so that state_dict /
        # load_state_dict of parents see the sharded keys only.
        opt = module.optimizer
        mine = [
            (_piece_name(self._tables[ti].name, c0, c1, self._tables[ti].embedding_dim), ti, "col", c0, c1)
            for ti, c0, c1 in pieces[self._rank]
        ]
        self.__dict__["local"] = self._make_local(mine, module, opt, lambda ti: self._tables[ti].pooling, dev)
        mine_rw = [
            (
                _row_name(self._tables[ti].name, *rw[ti][self._rank], self._tables[ti].num_embeddings),
                ti,
                "row",
                *rw[ti][self._rank],
            )
            for ti in sorted(rw)
        ]
        self.__dict__["local_rw"] = self._make_local(mine_rw, module, opt, lambda ti: "sum", dev)
        self._shards = {"local": mine, "local_rw": mine_rw}
        full = _table_views(module)
        for which in ("local", "local_rw"):
            if getattr(self, which) is not None:
                getattr(self, which).load_state_dict(self._local_state_from(full, which))
        self.train(module.training)
        self.register_load_state_dict_post_hook(_skip_dist_buffers)

    def _row_blocks(self, t, shards):
        """Row-wise shards -> [(r0, r1) of rank k]; TorchRec's even blocks of ceil(V / W) rows on
        ranks 0..W-1, as its bucketized input distribution assumes."""
        W, V = self._world, t.num_embeddings
        bs = -(-V // W)
        got = sorted(
            (sh.shard_offsets[0], sh.shard_sizes[0], sh.shard_offsets[1], sh.shard_sizes[1], sh.placement.rank())
            for sh in shards
        )
        want = [(k * bs, min(bs, V - k * bs), 0, t.embedding_dim, k) for k in range(W)]
        if any(n < 1 for _, n, _, _, _ in want):
            raise ValueError(
                f"table {t.name!r}: {V} rows are too few for row_wise over {W} ranks (a rank would "
                "hold none); shard it table_wise"
            )
        if got != want:
            raise ValueError(
                f"table {t.name!r}: pme's row_wise sharding takes TorchRec's even row blocks (rank k "
                f"holds rows [k * {bs}, (k + 1) * {bs}) of {V}, all columns, every rank a block); got "
                f"(row offset, rows, column offset, columns, rank) = {got}"
            )
        return [(r0, r0 + n) for r0, n, _, _, _ in want]

    def _make_local(self, shards, module, opt, pooling, device):
        if not shards:
            return None
        cfgs, k = [], 0
        for name, ti, kind, a, b in shards:
            t = self._tables[ti]
            n = len(t.feature_names)
            rows, width = (b - a, t.embedding_dim) if kind == "row" else (t.num_embeddings, b - a)
            cfgs.append(_Cfg(rows, width, name, [str(j) for j in range(k, k + n)], pooling(ti), t.init_max, t.init_min))
            k += n
        # The optimizer object itself (it holds hyperparameters only; its state lives on each
        # collection): a change of its lr (a schedule) reaches every shard, as unsharded.
        return MultiSizeEmbeddingBagCollection(
            cfgs,
            sizes=0,
            is_weighted=module.is_weighted,
            device=device,
            dtype=module.weight.dtype,
            optimizer=opt,
        )

    # ---- TorchRec's ShardedModule -------------------------------------------------------
    @property
    def unsharded_module_type(self):
        return MultiSizeEmbeddingBagCollection

    def create_context(self):
        return _Context()

    def _permute_indices(self, keys):
        keys = tuple(keys)
        hit = self._permute_cache.get(keys)
        if hit is None:
            pos = {k: i for i, k in enumerate(keys)}
            wanted = [(ti, f) for e in self._entries for ti, _, _, f in e]
            hit = ([], [])
            for part, lst in ((wanted, hit[0]), (self._rw_entries, hit[1])):
                for ti, f in part:
                    if f not in pos:
                        raise KeyError(
                            f"the input has no feature {f!r} (table {self._tables[ti].name!r} reads it); "
                            f"its keys are {list(keys)}"
                        )
                    lst.append(pos[f])
            self._permute_cache[keys] = hit
        return hit

    def input_dist(self, ctx, features):
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                f"a sharded pme collection takes a torchrec KeyedJaggedTensor, got {type(features).__name__}"
            )
        if features.variable_stride_per_key() or _inverse_indices(features) is not None:
            raise NotImplementedError(
                "pme: a KeyedJaggedTensor with a variable batch per feature or inverse indices (VBE) is not supported "
                "by a sharded collection (the unsharded MultiSizeEmbeddingBagCollection takes it)"
            )
        problem = None  # refused on every rank together (see _check_same_batch)
        if self.is_weighted and features.weights_or_none() is None:
            problem = ValueError("the collection is weighted (is_weighted=True) but the input carries no weights")
        else:
            try:
                idx, idx_rw = self._permute_indices(features.keys())
            except KeyError as e:
                problem = e
        self._check_same_batch(features, problem)
        if not self.is_weighted and features.weights_or_none() is not None:
            features = KeyedJaggedTensor(
                keys=features.keys(), values=features.values(), lengths=features.lengths(), stride=features.stride()
            )
        waits = []
        if self._input_dist is not None:
            waits.append(self._input_dist(features.permute(idx)))
        if self._rw_input_dist is not None:
            kjt = features.permute(idx_rw)
            if self._rw_mean:
                ln = kjt.lengths().view(len(self._rw_entries), -1)
                ctx.rw_lengths = [ln[k].clamp(min=1) for k, _ in self._rw_mean]
            waits.append(self._rw_input_dist(kjt))
        # TorchRec's awaitable of the input all-to-alls (TrainPipelineSparseDist's input-dist stage
        # takes it apart; wait().wait() gives the KJTList compute() reads)
        return KJTListSplitsAwaitable(waits, ctx)

    def _check_same_batch(self, features, problem=None):
        """Every rank must feed the same batch size. The all-to-alls only show the total, which a rank
        whose batch is the ranks' mean cannot tell from a good one (it would go on into the output
        all-to-all and wait there for the ranks that refused), so the ranks exchange their batch
        sizes (one small all-gather a call) and all refuse together, naming each rank's. So are
        inputs refused on one rank (``problem``: a feature missing, no weights): every rank raises,
        instead of the others waiting in the all-to-all until the process group's timeout."""
        if self._world == 1:
            if problem is not None:
                raise problem
            return
        dev = features.values().device
        mine = torch.tensor([features.stride(), problem is not None], dtype=torch.int64, device=dev)
        every = [torch.empty_like(mine) for _ in range(self._world)]
        torch.distributed.all_gather(every, mine, group=self._pg)
        gathered = torch.stack(every).tolist()
        if any(bad for _, bad in gathered):
            said = [None] * self._world
            dist.all_gather_object(said, None if problem is None else str(problem.args[0]), group=self._pg)
            if problem is not None:
                raise type(problem)(f"{problem.args[0]} (every rank refuses this call)") from None
            raise ValueError(
                "the input of another rank was refused, so every rank refuses this call: "
                + "; ".join(f"rank {r}: {m}" for r, m in enumerate(said) if m is not None)
            )
        sizes = [b for b, _ in gathered]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"every rank must feed the same batch size; the ranks fed {sizes} (rank r's at position r)"
            )

    def _lookup(self, which, kjt):
        local = getattr(self, which)
        keys = [str(k) for k in range(len(kjt.keys()))]
        local_kjt = KeyedJaggedTensor(
            keys=keys,
            values=kjt.values(),
            weights=kjt.weights_or_none(),
            lengths=kjt.lengths(),
            offsets=kjt.offsets(),
            stride=kjt.stride(),
        )
        local.train(self.training)
        try:
            return local(local_kjt).values()
        except RuntimeError as e:
            m = _LOCAL_BAD_INDEX.search(str(e))
            # local key k is the k-th feature of this rank's shards (_make_local numbers them so)
            names = [f for _, ti, *_ in self._shards[which] for f in self._tables[ti].feature_names]
            if m is None or int(m.group(1)) >= len(names):
                raise
            where = (
                "a row of that table's shard on this rank, as its row-wise split numbers it"
                if which == "local_rw"
                else "a position in the batch this rank received from every rank"
            )
            raise type(e)(
                f"{str(e)[: m.start()]}feature {names[int(m.group(1))]!r}{str(e)[m.end() :]} (sharded: the value's "
                f"position is {where}; the rank that fed it is one of the {self._world})"
            ) from None

    def compute(self, ctx, dist_input):
        out = []
        k = 0
        if self._input_dist is not None:
            kjt = dist_input[k]
            k += 1
            if self.local is None:
                out.append(
                    torch.zeros(
                        kjt.stride(),
                        0,
                        device=kjt.values().device,
                        requires_grad=torch.is_grad_enabled() and self.training,
                    )
                )
            else:
                out.append(self._lookup("local", kjt))
        if self._rw_input_dist is not None:
            out.append(self._lookup("local_rw", dist_input[k]))
        return out

    def output_dist(self, ctx, output):
        perm = self._perm
        if perm is not None and perm.device != output[0].device:
            perm = self._perm = perm.to(output[0].device)
        waits, k = [], 0
        if self._output_dist is not None:
            waits.append((self._output_dist(output[k]), None))
            k += 1
        if self._rw_output_dist is not None:
            post = None
            if self._rw_mean:
                post = self._mean_division(ctx.rw_lengths)
            waits.append((self._rw_output_dist(output[k]), post))
        return _KeyedAwaitable(waits, perm, self._names, self._lengths)

    def _mean_division(self, lengths):
        offs = [0]
        for ti, _ in self._rw_entries:
            offs.append(offs[-1] + self._tables[ti].embedding_dim)

        def post(values):
            div = torch.ones_like(values)
            for (k, D), ln in zip(self._rw_mean, lengths):
                div[:, offs[k] : offs[k] + D] = ln.to(values.dtype).unsqueeze(1)
            return values / div

        return post

    # ---- parameters, state_dict ---------------------------------------------------------
    def _locals(self):
        return [(w, getattr(self, w)) for w in ("local", "local_rw") if getattr(self, w) is not None]

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        for w, m in self._locals():
            yield (prefix + "." if prefix else "") + w + ".weight", m.weight

    def sharded_parameter_names(self, prefix=""):
        for k, _ in self.named_parameters(prefix):
            yield k

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for _, m in self._locals():
            m._apply(fn, recurse)
        return self

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """This rank's shards: whole tables under the unsharded keys, column shards under
        ``embedding_bags.<table>:<c0>-<c1>of<D>.*``, row shards under
        ``embedding_bags.<table>:r<r0>-<r1>of<V>.*``, and ``optim_step`` with a fused optimizer."""
        if destination is None:
            from collections import OrderedDict

            destination = OrderedDict()
        for _, m in self._locals():
            step = destination.get(prefix + "optim_step")
            m.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
            if step is not None:
                destination[prefix + "optim_step"] = step
        return destination

    def _local_state_from(self, state_dict, which, prefix=""):
        """The state_dict of local collection ``which`` out of ``state_dict``: this rank's own
        keys, or the unsharded keys (whole tables, from which the shards are cut)."""
        out = {}
        local = getattr(self, which)
        states = local._state_per_row()
        for name, ti, kind, a, b in self._shards[which]:
            t = self._tables[ti]
            own = f"{prefix}embedding_bags.{name}."
            full = f"{prefix}embedding_bags.{t.name}."
            if own + "weight" in state_dict:
                for k in ["weight", "offsets", *states]:
                    if own + k in state_dict:
                        out[f"embedding_bags.{name}.{k}"] = state_dict[own + k]
                continue
            dense = state_dict.get(full + "weight")
            if isinstance(dense, torch.Tensor) and dense.dim() == 2 and full + "offsets" not in state_dict:
                # a torchrec EmbeddingBagCollection's checkpoint ([V, D] per table): the shard's rows or
                # columns of it; the local collection keeps each row's first values, as unsharded
                if tuple(dense.shape) != (t.num_embeddings, t.embedding_dim):
                    raise ValueError(
                        f"{full}weight: a dense table must be [{t.num_embeddings}, {t.embedding_dim}], got "
                        f"{tuple(dense.shape)}"
                    )
                out[f"embedding_bags.{name}.weight"] = dense.detach()[a:b] if kind == "row" else dense.detach()[:, a:b]
                continue
            if full + "weight" not in state_dict or full + "offsets" not in state_dict:
                continue  # reported as missing by the local collection
            w, o = state_dict[full + "weight"], state_dict[full + "offsets"]
            if not isinstance(o, torch.Tensor) or o.dtype != torch.int64 or o.shape != (t.num_embeddings + 1,):
                raise ValueError(f"{full}offsets must be int64 [{t.num_embeddings + 1}]")
            if not isinstance(w, torch.Tensor) or w.dim() != 1:
                raise ValueError(f"{full}weight must be a 1-D tensor")
            o = o.detach().cpu()
            try:
                ops.check_offsets(o, w.numel(), t.embedding_dim)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"{full}weight / offsets: {e}") from None
            if kind == "row":
                e0, e1 = int(o[a]), int(o[b])
                pw, po = w.detach().cpu()[e0:e1], o[a : b + 1] - e0
            else:
                pw, psz = column_piece(w.detach().cpu(), o, a, b)
                po = torch.zeros(t.num_embeddings + 1, dtype=torch.int64)
                torch.cumsum(psz, 0, out=po[1:])
            out[f"embedding_bags.{name}.weight"] = pw
            out[f"embedding_bags.{name}.offsets"] = po
            for k, how in states.items():
                if full + k not in state_dict:
                    continue
                s = state_dict[full + k]
                if how == "entries":
                    if not isinstance(s, torch.Tensor) or s.shape != w.shape:
                        raise ValueError(f"{full}{k} must have {w.numel()} entries")
                    s = s.detach().cpu()
                    s = s[int(o[a]) : int(o[b])] if kind == "row" else column_piece(s, o, a, b)[0]
                elif how == "rows" and kind == "row":
                    if not isinstance(s, torch.Tensor) or s.shape != (t.num_embeddings,):
                        raise ValueError(f"{full}{k} must have {t.num_embeddings} entries")
                    s = s[a:b]
                out[f"embedding_bags.{name}.{k}"] = s  # per-row state: each column shard starts from the row's
        if self._opt_name is not None and prefix + "optim_step" in state_dict:
            out["optim_step"] = state_dict[prefix + "optim_step"]
        return out

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Loads this rank's shards from its own sharded keys or from the unsharded form
        (:func:`merge_state_dicts`' output, an unsharded collection's ``state_dict`` or a torchrec
        ``EmbeddingBagCollection``'s dense one): the other ranks' tables in it are skipped.
        Everything is checked before anything is replaced; ``strict=True`` with keys missing
        changes nothing, ``strict=False`` loads the shards it holds whole and reports the rest."""
        from torch.nn.modules.module import _IncompatibleKeys

        missing = self._load(
            state_dict,
            lambda e: RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t{e}"),
            strict,
        )
        return _IncompatibleKeys(missing, [])

    def _load(self, state_dict, error, strict):
        """Loads the local collections from ``state_dict``. Returns the missing keys (strict=False:
        the shards the checkpoint holds whole are loaded, the others kept); raises ``error(message)``
        for keys missing under strict=True and for bad values, with nothing replaced."""
        parts = []
        try:
            for which, m in self._locals():
                parts.append((m, self._local_state_from(state_dict, which)))
        except ValueError as e:
            raise error(e) from None
        if not parts:
            return []  # a rank without shards
        if strict:
            absent = [
                n
                for (w, _), (_, sd) in zip(self._locals(), parts)
                for n, *_ in self._shards[w]
                if f"embedding_bags.{n}.weight" not in sd
            ]
            if absent:
                raise error(self._absent_message(state_dict, absent))
        # All or nothing. Each local collection checks all its tables before it replaces any (and
        # under strict=True replaces nothing when a key is missing); with two (row-wise shards next
        # to others) the first is tried on a copy, so that an error in the second leaves both as
        # they were.
        missing = []
        for m, sd in parts[:-1]:
            missing += copy.deepcopy(m).load_state_dict(sd, strict=strict).missing_keys
        missing += parts[-1][0].load_state_dict(parts[-1][1], strict=strict).missing_keys
        for m, sd in parts[:-1]:
            m.load_state_dict(sd, strict=strict)
        return missing

    def _absent_message(self, state_dict, absent) -> str:
        """Says which of this rank's shards a checkpoint lacks, and what it holds of their tables."""
        table_of = {n: self._tables[ti].name for w in self._shards.values() for n, ti, *_ in w}
        held = {}
        for k in state_dict:
            m = re.match(r"^embedding_bags\.([^.]+)\.weight$", k)
            if m is not None:
                name = m.group(1)
                held.setdefault((_PIECE.match(name) or _ROWS.match(name) or m).group(1), []).append(name)
        other = {table_of[n]: sorted(held[table_of[n]]) for n in absent if table_of[n] in held}
        msg = (
            f"the checkpoint lacks this rank's shards {absent}: it has neither their own keys "
            f"({', '.join(f'embedding_bags.{n}.weight / offsets' for n in absent)}) nor their whole tables' "
            f"({', '.join(sorted({f'embedding_bags.{table_of[n]}.weight / offsets' for n in absent}))}); this rank "
            f"holds {[n for w in self._shards.values() for n, *_ in w]}"
        )
        if other:
            msg += (
                f". It holds other shards of those tables ({other}): a rank's state_dict loads only into the same "
                "plan on the same rank; join the ranks' state_dicts with pme.sharding.merge_state_dicts and load "
                "that (into any plan)"
            )
        return msg

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            missing_keys.extend(prefix + k for k in self._load(sub, ValueError, load_is_strict(strict)))
        except (ValueError, RuntimeError) as e:
            error_msgs.append(str(e))

    def extra_repr(self):
        mine = [n for w in self._shards.values() for n, *_ in w]
        return f"rank={self._rank}/{self._world}, shards={mine}, sharding_types={self.sharding_types}"


class _Cfg:
    """Table config of a shard (the fields pme.collection reads)."""

    def __init__(self, num_embeddings, embedding_dim, name, feature_names, pooling, weight_init_max, weight_init_min):
        self.num_embeddings, self.embedding_dim, self.name = num_embeddings, embedding_dim, name
        self.feature_names, self.pooling = feature_names, pooling
        self.weight_init_max, self.weight_init_min = weight_init_max, weight_init_min


# --------------------------------------------------------------------------------------------
# The sharder
# --------------------------------------------------------------------------------------------
class MultiSizeEmbeddingBagCollectionSharder(ModuleSharder[MultiSizeEmbeddingBagCollection]):
    """TorchRec ``ModuleSharder`` of :class:`pme.collection.MultiSizeEmbeddingBagCollection`.

    Sharding types ``table_wise``, ``column_wise`` and ``row_wise``; one compute kernel,
    ``fused`` (pme's collection kernel, with the collection's own fused optimizer if it has one).
    """

    @property
    def module_type(self):
        return MultiSizeEmbeddingBagCollection

    def shardable_parameters(self, module):
        """One meta tensor ``[V_t, D_t]`` per table (the dense shape the plan splits)."""
        return {
            t.name: nn.Parameter(
                torch.empty(t.num_embeddings, t.embedding_dim, device="meta", dtype=module.weight.dtype),
                requires_grad=False,
            )
            for t in module._tables
        }

    def sharding_types(self, compute_device_type):
        return list(SUPPORTED)

    def compute_kernels(self, sharding_type, compute_device_type):
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(self, module, params, env, device=None, module_fqn=None):
        return ShardedMultiSizeEmbeddingBagCollection(module, params, env, device)


# --------------------------------------------------------------------------------------------
# Planner: true multi-size bytes
# --------------------------------------------------------------------------------------------
def shard_bytes(
    module: MultiSizeEmbeddingBagCollection,
    table: str,
    c0: int = 0,
    c1: int | None = None,
    r0: int = 0,
    r1: int | None = None,
) -> int:
    """Bytes a shard (columns ``[c0, c1)`` of rows ``[r0, r1)``) of ``table`` holds: its stored
    entries, its offsets (int64, one per row + 1) and the fused optimizer's state (row-wise
    Adagrad one float per row, Adam two per entry)."""
    t = module._tables[module._table_index(table)]
    c1 = t.embedding_dim if c1 is None else c1
    r1 = t.num_embeddings if r1 is None else r1
    if not (0 <= c0 <= c1 <= t.embedding_dim and 0 <= r0 <= r1 <= t.num_embeddings):
        raise ValueError(
            f"table {table!r} ({t.num_embeddings} rows, {t.embedding_dim} columns) has no shard of columns "
            f"[{c0}, {c1}) and rows [{r0}, {r1})"
        )
    s = module.sizes(table)[r0:r1]
    entries = int((s - c0).clamp(0, c1 - c0).sum())
    es = module.weight.element_size()
    acc = torch.tensor([], dtype=ops.acc_dtype(module.weight.dtype)).element_size()
    opt = module.optimizer.name if module.optimizer is not None else None
    state = {"rowwise_adagrad": (r1 - r0) * acc, "adam": 2 * entries * acc}.get(opt, 0)
    return entries * es + (r1 - r0 + 1) * 8 + state


_NEVER = 2**62  # bytes that fit no device


class MultiSizeStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimator, with each pme shard's tensor bytes replaced by its true
    multi-size bytes (:func:`shard_bytes`); TorchRec's input/output buffer estimate is kept. A
    row-wise option that would leave a rank without rows (which the sharder refuses) is made too
    big to place. Other modules (EmbeddingBagCollection, ...) are estimated as TorchRec does."""

    def estimate(self, sharding_options, sharder_data_map=None):
        super().estimate(sharding_options, sharder_data_map)
        W = self._topology.world_size
        for so in sharding_options:
            mod = so.module[1]
            if not isinstance(mod, MultiSizeEmbeddingBagCollection):
                continue
            V, D = so.tensor.shape
            dense = V * D * so.tensor.element_size()
            if so.sharding_type == ShardingType.ROW_WISE.value and (W - 1) * -(-V // W) >= V:
                for shard in so.shards:  # a rank would get no rows: the sharder refuses that plan
                    shard.storage.hbm = shard.storage.ddr = _NEVER
                continue
            for shard in so.shards:
                nr, nc = shard.size
                r0, c0 = shard.offset
                was = -(-dense * nr * nc // (V * D))  # TorchRec's share of the dense tensor (no optimizer)
                true = shard_bytes(mod, so.name, c0, c0 + nc, r0, r0 + nr)
                st = shard.storage
                if st.hbm >= was and self._topology.compute_device != "cpu":
                    st.hbm += true - was
                elif st.ddr >= was:
                    st.ddr += true - was


def planner(
    world_size: int,
    compute_device: str = "cpu",
    hbm_cap: int | None = None,
    ddr_cap: int | None = None,
    batch_size: int = 512,
    constraints=None,
    **topology_kwargs,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` whose storage estimate knows pme's multi-size bytes.

    ``hbm_cap`` / ``ddr_cap`` are bytes per rank (TorchRec's ``Topology``). Use it as TorchRec's:
    ``plan = planner(2).collective_plan(model, [MultiSizeEmbeddingBagCollectionSharder()], pg)``.
    """
    topo = Topology(
        world_size=world_size,
        compute_device=compute_device,
        hbm_cap=hbm_cap,
        ddr_cap=ddr_cap,
        local_world_size=topology_kwargs.pop("local_world_size", world_size),
        **topology_kwargs,
    )
    est = [
        EmbeddingPerfEstimator(topology=topo, constraints=constraints),
        MultiSizeStorageEstimator(topology=topo, constraints=constraints),
    ]
    enum = EmbeddingEnumerator(topology=topo, batch_size=batch_size, constraints=constraints, estimator=est)
    return EmbeddingShardingPlanner(topology=topo, batch_size=batch_size, constraints=constraints, enumerator=enum)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _covered(spans) -> int:
    """Where the shards ``spans`` (sorted ``(start, end)`` pairs) stop covering ``0, 1, ...`` without a gap."""
    end = 0
    for start, stop in spans:
        if start != end:
            break
        end = stop
    return end


_LOCAL_BAD_INDEX = re.compile(r"feature '(\d+)'")  # a local collection's key in its bad-index message


def merge_state_dicts(state_dicts, prefix: str | None = None, optimizer: str | None = None) -> dict:
    """Joins the ranks' ``state_dict`` s (any world size) into the unsharded form.

    Keys of whole tables and replicated keys pass through (the first rank's wins); the column
    shards ``<prefix>embedding_bags.<t>:<c0>-<c1>of<D>.*`` of each table are joined into
    ``<prefix>embedding_bags.<t>.*``, and so are the row shards ``<t>:r<r0>-<r1>of<V>``.
    ``prefix=None`` (the default) finds every collection in the model wherever it sits (e.g.
    ``sparse_arch.embedding_bag_collection.``); a given prefix joins only that one's. Raises
    ValueError when a table's shards do not cover it, and for row-wise Adagrad state of column
    shards (one accumulator per row per shard has no unsharded equivalent: load it into the same
    plan instead).
    """
    del optimizer  # (unused: the state's shapes say which optimizer wrote it)
    out, pieces, width, row_pieces, num_rows = {}, {}, {}, {}, {}
    head = r"(?P<pre>(?:.*\.)?)" if prefix is None else "(?P<pre>" + re.escape(prefix) + ")"
    pat = re.compile(
        "^" + head + r"embedding_bags\.(?P<name>[^.]+)\.(?P<field>weight|offsets|optim_state1|optim_state2)$"
    )
    for sd in state_dicts:
        for k, v in sd.items():
            m = pat.match(k)
            r = _ROWS.match(m.group("name")) if m else None
            if r is not None:
                t = (m.group("pre"), r.group("t"))
                key = (int(r.group("r0")), int(r.group("r1")))
                row_pieces.setdefault(t, {}).setdefault(key, {})[m.group("field")] = v
                num_rows[t] = int(r.group("v"))
                continue
            p = _PIECE.match(m.group("name")) if m else None
            if p is None:
                out.setdefault(k, v)
                continue
            t = (m.group("pre"), p.group("t"))
            key = (p.group("t"), int(p.group("c0")), int(p.group("c1")), int(p.group("d")))
            pieces.setdefault(t, {}).setdefault(key, {})[m.group("field")] = v
            width[t] = int(p.group("d"))
    for (pre, t), parts in pieces.items():
        parts = {k[:3]: v for k, v in parts.items()}
        cols = sorted(parts)
        if _covered([(c0, c1) for _, c0, c1 in cols]) != width[(pre, t)]:
            raise ValueError(
                f"table {pre}{t!r}: column shards {[(a, b) for _, a, b in cols]} do not cover its "
                f"{width[(pre, t)]} columns (is a rank's state_dict missing?)"
            )
        base = f"{pre}embedding_bags.{t}."
        V = parts[cols[0]]["offsets"].numel() - 1
        sizes = {key: f["offsets"][1:] - f["offsets"][:-1] for key, f in parts.items()}
        flat, off = join_columns([(c0, c1, parts[(t, c0, c1)]["weight"], sizes[(t, c0, c1)]) for _, c0, c1 in cols], V)
        out[base + "weight"], out[base + "offsets"] = flat, off
        got = {f: [parts[key].get(f) for key in cols] for f in ("optim_state1", "optim_state2")}
        for field, gs in got.items():
            if any(g is None for g in gs) and not all(g is None for g in gs):
                have = [(c0, c1) for g, (_, c0, c1) in zip(gs, cols) if g is not None]
                raise ValueError(
                    f"table {pre}{t!r}: column shards {have} have {field} and the others none (rank files of "
                    "different optimizers?)"
                )
        # Row-wise Adagrad: optim_state1 one value per row of each shard, optim_state2 empty. Told
        # apart from a per-entry state by optim_state2 too (a shard can store as many entries as it
        # has rows).
        per_row = (
            any(g is not None and g.numel() for g in got["optim_state1"])
            and all(g is None or g.numel() == 0 for g in got["optim_state2"])
            and all(g.numel() == V for g in got["optim_state1"])
        )
        for field, gs in got.items():
            if all(g is None for g in gs):
                continue
            if all(g.numel() == 0 for g in gs):
                out[base + field] = gs[0]
            elif not per_row and all(g.numel() == int(sizes[key].sum()) for g, key in zip(gs, cols)):
                out[base + field] = join_columns(
                    [(c0, c1, g, sizes[(t, c0, c1)]) for g, (_, c0, c1) in zip(gs, cols)], V
                )[0]
            else:
                raise ValueError(
                    f"table {pre}{t!r}: {field} is per row and per column shard (row-wise Adagrad); it has "
                    "no unsharded equivalent. Load this checkpoint into the same plan, or drop the "
                    "optimizer state"
                )
    for (pre, t), parts in row_pieces.items():
        rows = sorted(parts)
        if _covered(rows) != num_rows[(pre, t)]:
            raise ValueError(
                f"table {pre}{t!r}: row shards {rows} do not cover its {num_rows[(pre, t)]} rows (is a rank's "
                "state_dict missing?)"
            )
        base = f"{pre}embedding_bags.{t}."
        out[base + "weight"] = torch.cat([parts[k]["weight"] for k in rows])
        off, e = [torch.zeros(1, dtype=torch.int64)], 0
        for k in rows:
            o = parts[k]["offsets"]
            off.append(o[1:] - o[0] + e)
            e += int(o[-1] - o[0])
        out[base + "offsets"] = torch.cat(off)
        for field in ("optim_state1", "optim_state2"):
            got = [parts[k].get(field) for k in rows]
            if all(g is None for g in got):
                continue
            if any(g is None for g in got):
                raise ValueError(
                    f"table {pre}{t!r}: row shards {[k for k, g in zip(rows, got) if g is not None]} have {field} and "
                    "the others none (rank files of different optimizers?)"
                )
            out[base + field] = got[0] if all(g.numel() == 0 for g in got) else torch.cat(got)
    return out


# --------------------------------------------------------------------------------------------
# Example: torchrun --nproc-per-node 2 -m pme.sharding
# --------------------------------------------------------------------------------------------
def _example():  # pragma: no cover - run by hand / by the README's command
    import os

    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from .collection import EmbeddingBagConfig
    from .optim import RowwiseAdagrad

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(1000 * (t + 1), 64, f"t{t}", [f"f{t}"]) for t in range(4)]
    gen = torch.Generator().manual_seed(1)
    sizes = {c.name: torch.randint(1, 65, (c.num_embeddings,), generator=gen) for c in tables}
    ebc = MultiSizeEmbeddingBagCollection(tables, sizes, optimizer=RowwiseAdagrad(lr=0.05))
    sharder = MultiSizeEmbeddingBagCollectionSharder()
    plan = planner(world).collective_plan(ebc, [sharder], dist.group.WORLD)
    model = DistributedModelParallel(
        ebc,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[sharder],
        init_data_parallel=False,
    )
    B = 32
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        lengths = torch.randint(0, 4, (4 * B,), generator=g)
        values = torch.cat(
            [
                torch.randint(0, 1000 * (t + 1), (int(lengths[t * B : (t + 1) * B].sum()),), generator=g)
                for t in range(4)
            ]
        )
        kjt = KeyedJaggedTensor.from_lengths_sync([f"f{t}" for t in range(4)], values, lengths)
        out = model(kjt).wait()
        loss = out.values().pow(2).mean()
        loss.backward()  # the fused row-wise Adagrad step runs here, on each rank's shards
        print(f"rank {rank} step {step}: loss {loss.item():.5f}, out {tuple(out.values().shape)}")
    if rank == 0:
        print(model.plan)
    sd = model.state_dict()
    print(f"rank {rank} holds {sorted({k.split('.')[1] for k in sd if k.startswith('embedding_bags.')})}")
    dist.destroy_process_group()
    return os.EX_OK


if __name__ == "__main__":
    raise SystemExit(_example())
