"""PME size search: score every entry of full-size tables, prune to a global budget, read sizes.

Our reconstruction of PME (Pruning-based Multi-size Embedding, Liu et al., Frontiers in Big
Data 2023; only the abstract is public, so the details below are ours):

1. Copy the model; every searched table becomes a full-width ``MultiSizeEmbeddingBag`` whose
   backward feeds the fused score accumulation (no gradient the size of the table is built).
2. Score a **trained** (or warmed-up) model: scores taken at initialisation mostly measure token
   frequency times a random weight. Either pass a model you trained (``warmup_steps=0``), or let
   the search train the copy for ``warmup_steps`` Adam steps first (the cheap mode: a fraction of
   one epoch).
3. Score every entry: ``magnitude`` ``|w|`` (default), ``movement`` ``|w - w_0|`` (distance from
   the weights before the warm-up), ``taylor`` ``|w * g|`` summed over ``num_batches`` training
   batches at the end of training (weights frozen while scoring), ``saliency`` the first-order
   change of the loss when an entry is masked, ``|w * dL/dw|``, on held-out batches
   (``held_out=``; pass a few large batches: each batch adds ``|w * g_batch|``), and the older
   ``snip`` (``|w * g|`` on training batches) and ``grad`` (``g^2``). Or sum ``|w * g|`` while
   you train the model yourself (:class:`TrainingScores`, hooks that only read) and cut those
   scores with :func:`from_scores`.
4. Optionally shrink toward what the table's rows have in common (``counts=``, the tokens'
   training counts): a row seen ``n`` times keeps the weight ``n / (n + shrink * D)`` on its own
   scores and gives the rest to its table's average score profile, so a row seen fewer times
   than it has entries is sized mostly by its table. Trained magnitudes of rare ids are mostly
   their initial values and noise; on MovieLens-100K they made PME lose to even sizes inside
   the id fields, while a well-observed small vocabulary (census adult) is left as it was.
5. Optionally normalise per field (``normalize="field"``: every table's scores divided by their
   mean over the rows the data touches) so that tables of very different cardinality and scale
   compete under one global budget. The default keeps raw scores (``"none"``): on both real data
   sets we tried, the trained magnitudes already compare across tables and the per-field
   normalisation lost (it hands large, weak fields budget that strong small ones used better).
6. Keep the top entries under a budget (a fraction of all ``V * D`` entries, global across
   tables or per table); a token's size is its number of surviving entries ("capacity
   transfer"), rounded to the alignment quantum and clamped to ``[min_size, D]``. The threshold
   is found by radix select on the device (``pme.ops.topk_threshold``), adjusted by bisection
   so that the rounded sizes fit, then the last quanta go to the rows with the best next entry,
   so the total meets the budget to within one quantum.

``pme.search`` is this module and also callable: ``pme.search(model, loader, budget)`` is
:func:`search`. The sizes at equal budget, PME's and the baselines' (uniform, popularity by MDE's
power rule, random, and the grouped layout with per-size projections shared across tables), all
keyed by the model's table names: :func:`sizes_at_budget`.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .modules import MultiSizeEmbedding, MultiSizeEmbeddingBag, convert, parse_sizes

__all__ = [
    "search",
    "from_scores",
    "TrainingScores",
    "SearchResult",
    "sizes_for_budget",
    "sizes_at_budget",
    "table_shapes",
    "token_counts",
    "default_granularity",
    "uniform_sizes",
    "popularity_sizes",
    "random_sizes",
    "grouped_sizes",
    "grouped_classes",
    "convert_grouped",
    "normalize_scores",
    "shrink_scores",
    "alignment_quantum",
    "batch_to",
    "RULES",
    "METHODS",
]

RULES = ("magnitude", "movement", "taylor", "saliency", "snip", "grad")
NORMALIZE = ("field", "none")
METHODS = ("pme", "uniform", "popularity", "random", "grouped")


def alignment_quantum(dtype: torch.dtype) -> int:
    """Entries per 16 bytes: sizes that are multiples of it keep rows 16-byte aligned."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


class _Scorer(ops.RowConsumer):
    """Adds the scores of the batch's entries (``scores [total]``, the accumulation dtype) in backward."""

    def __init__(self, rule: str):
        self.rule = rule

    def __repr__(self):
        return f"_Scorer(rule={self.rule!r})"

    def state(self, module):
        return [ops.StateBuffer("scores", (module.weight.numel(),), per="entry")]

    def consume(self, module, rows):
        args, kwargs = rows.operator_args(module)
        ops.accumulate_scores_(module.scores, rows.grad_out, module.weight, *args, rule=self.rule, **kwargs)


_TRAINING_RULES = {"taylor": "snip", "grad": "grad"}


class _ScoringConsumer(ops.RowConsumer):
    """Wraps a pme table's fused optimizer: each batch's rows first add their scores (with the
    weights before the step), then go to the optimizer as before. Every attribute other than its
    own three (``_inner``, ``_owner``, ``_table``) is the optimizer's, read and written: a
    schedule's ``module.optimizer.lr = ...`` or a GradScaler's ``grad_scale`` reach the step."""

    _OWN = ("_inner", "_owner", "_table")

    def __init__(self, inner, owner, table):
        for k, v in zip(self._OWN, (inner, owner, table)):
            object.__setattr__(self, k, v)

    def __repr__(self):
        return f"{self._inner!r} + TrainingScores(rule={self._owner.rule!r})"

    def __getattr__(self, name):  # the optimizer's own attributes (name, lr, hyperparameters, ...)
        if name in self._OWN:
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def state(self, module):
        return self._inner.state(module)

    def state_kept(self, module):
        return self._inner.state_kept(module)

    def consume(self, module, rows):
        if self._owner._tick(self._table):
            args, kwargs = rows.operator_args(module)
            rule = _TRAINING_RULES[self._owner.rule]
            ops.accumulate_scores_(
                self._owner._acc[self._table], rows.grad_out, module.weight, *args, rule=rule, **kwargs
            )
        self._inner.consume(module, rows)


class TrainingScores:
    """Accumulates entry scores of a model's full-size tables **while you train it**.

    ``rule="taylor"`` adds ``|w * g|`` (``"grad"``: ``g^2``) of every training step, with the
    weights before the step and the step's gradient (a row looked up twice in a batch counts
    once, with its summed gradient), from backward pass ``start_step`` on: pass the number of
    steps to let go by to score only the last part of training. Nothing in training changes
    (the hooks only read), so the model you train for its own sake also gives PME its scores.

    Works with ``nn.EmbeddingBag`` / ``nn.Embedding`` (dense or ``sparse=True`` gradients, any
    optimizer: a hook after the gradient is accumulated) and full-width pme tables (with a fused
    optimizer the scores come from the fused kernel ``pme.ops.accumulate_scores_``, before the
    optimizer's update). One backward per optimizer step (a second backward before the step
    would count the accumulated gradient twice). ``start_step`` counts the table's backward
    passes: on the fused path a table looked up twice in one step (a shared table) counts two.
    Rows no step touched score 0. The gradients are read as backward gives them: under a
    ``GradScaler`` they are scaled, so a step counts in proportion to the scale of its time (a
    constant scale changes nothing, the cut is relative; one that changes weights the steps).

    Example::

        acc = pme.search.TrainingScores(model, rule="taylor", start_step=3 * steps_per_epoch)
        train(model, epochs=4)  # your loop, unchanged
        result = pme.search.from_scores(acc.scores(), budget=0.2, counts=counts)
        acc.remove()

    Attributes:
        steps: ``{table name: backward passes scored}``.
    """

    def __init__(self, model: nn.Module, tables=None, rule: str = "taylor", start_step: int = 0):
        if rule not in _TRAINING_RULES:
            raise ValueError(f"TrainingScores: rule must be one of {sorted(_TRAINING_RULES)}, got {rule!r}")
        if int(start_step) < 0:
            raise ValueError(f"TrainingScores: start_step must be >= 0, got {start_step}")
        self.rule, self.start_step = rule, int(start_step)
        self._tables, self._acc, self._seen, self._handles, self._wrapped = {}, {}, {}, [], {}
        self.steps = {}
        for name, m in _searchable(model, tables, who="TrainingScores", fused_ok=True).items():
            w = m.weight
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            self._tables[name] = m
            self._acc[name] = torch.zeros(w.shape if w.dim() == 2 else (w.numel(),), dtype=acc, device=w.device)
            self._seen[name], self.steps[name] = 0, 0
            if isinstance(m, (MultiSizeEmbeddingBag, MultiSizeEmbedding)) and m.optimizer is not None:
                self._wrapped[name] = m.optimizer
                m.optimizer = _ScoringConsumer(m.optimizer, self, name)
            else:
                self._handles.append(w.register_post_accumulate_grad_hook(self._hook(name)))

    def __repr__(self):
        return (
            f"TrainingScores(rule={self.rule!r}, tables={len(self._tables)}, start_step={self.start_step}, "
            f"steps={self.steps})"
        )

    def _tick(self, name) -> bool:
        self._seen[name] += 1
        if self._seen[name] <= self.start_step:
            return False
        self.steps[name] += 1
        return True

    def _hook(self, name):
        def add(param):
            g = param.grad
            if g is None or not self._tick(name):
                return
            acc = self._acc[name]
            with torch.no_grad():
                if g.is_sparse:
                    g = g.coalesce()
                    idx, vals = g.indices()[0], g.values().to(acc.dtype)
                    w = param.detach().index_select(0, idx).to(acc.dtype)
                    term = (w * vals).abs() if self.rule == "taylor" else vals * vals
                    acc.index_add_(0, idx, term.reshape(idx.numel(), *acc.shape[1:]))
                else:
                    g = g.to(acc.dtype).reshape(acc.shape)
                    w = param.detach().to(acc.dtype).reshape(acc.shape)
                    acc.add_((w * g).abs() if self.rule == "taylor" else g * g)

        return add

    def scores(self) -> dict:
        """``{table name: [V, D] float32}`` the scores so far (a copy)."""
        return {
            n: self._acc[n].reshape(m.num_embeddings, m.embedding_dim).float().clone() for n, m in self._tables.items()
        }

    def remove(self) -> None:
        """Takes the hooks off and gives the fused tables their own optimizer back."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, inner in self._wrapped.items():
            self._tables[name].optimizer = inner
        self._wrapped = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@dataclass
class SearchResult:
    """What ``pme.search`` found.

    Attributes:
        sizes: ``{table name: [V] int64}`` sizes in ``[min_size, D]``, multiples of ``quantum``.
        scores: ``{table name: [V, D] float32}`` the entry scores (after normalisation).
        budget_entries: the entries the budget allows; ``kept_entries``: what the sizes use.
        dense_entries: ``sum(V * D)`` over the searched tables.
        threshold: the score threshold of the global budget (per table: a dict).
        seconds: wall time of warm-up + scoring + thresholding; ``steps``: warm-up steps,
            ``batches``: scoring batches; ``rule``, ``normalize``, ``shrink`` (None: no shrinkage):
            how entries were scored; ``per_table``: whether each table was cut at the budget on
            its own (``for_budget`` keeps it unless told otherwise); ``dtype``: the tables' dtype
            (it sets the default size quantum).
    """

    sizes: dict
    scores: dict
    budget_entries: int
    kept_entries: int
    dense_entries: int
    threshold: object
    seconds: float
    rule: str
    steps: int = 0
    batches: int = 0
    stats: dict = field(default_factory=dict)
    normalize: str = "none"
    shrink: float | None = None
    per_table: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def fraction(self) -> float:
        """Kept entries / dense entries."""
        return self.kept_entries / max(1, self.dense_entries)

    def __repr__(self):
        return (
            f"SearchResult(rule={self.rule!r}, normalize={self.normalize!r}, shrink={self.shrink}, "
            f"tables={len(self.sizes)}, "
            f"kept={self.kept_entries:,} of {self.dense_entries:,} entries ({100 * self.fraction:.1f}%), "
            f"warm-up steps={self.steps}, seconds={self.seconds:.2f})"
        )

    def for_budget(
        self, budget: float, per_table: bool | None = None, quantum: int | None = None, min_size: int | None = None
    ):
        """The same scores cut at another budget (no new scoring): a new ``SearchResult``.
        ``per_table=None`` cuts as the search did (each table on its own when it was searched
        with ``per_table=True``); ``quantum`` / ``min_size`` default as in :func:`search` (the
        grid of ``default_granularity`` for this budget and the tables' dtype)."""
        t0 = time.perf_counter()
        per_table = self.per_table if per_table is None else bool(per_table)
        dims = [int(sc.shape[1]) for sc in self.scores.values()]
        quantum, min_size = _grid(budget, min(dims), self.dtype, quantum, min_size)
        sizes, thr = sizes_for_budget(self.scores, budget, per_table=per_table, quantum=quantum, min_size=min_size)
        kept = sum(int(s.sum()) for s in sizes.values())
        return SearchResult(
            sizes,
            self.scores,
            int(budget * self.dense_entries),
            kept,
            self.dense_entries,
            thr,
            self.seconds + time.perf_counter() - t0,
            self.rule,
            self.steps,
            self.batches,
            normalize=self.normalize,
            shrink=self.shrink,
            per_table=per_table,
            dtype=self.dtype,
        )

    def convert(self, model: nn.Module, init: str = "fresh", **kwargs) -> nn.Module:
        """``pme.convert(model, self.sizes, ...)``: ``init="fresh"`` draws new values with the
        original table's scale; ``init="kept"`` keeps each row's best-scored entries of ``model``;
        pass the model *as it was before training* with ``init="kept"`` to rewind (the surviving
        entries restart from their initial values)."""
        return convert(model, self.sizes, init=init, scores=self.scores if init == "kept" else None, **kwargs)


def default_granularity(budget: float, dim: int, quantum: int) -> tuple:
    """``(quantum, min_size)`` for a budget: the alignment quantum and a floor of one quantum per
    token; when the budget leaves fewer than two quanta a token on average, that grid is too
    coarse (most tokens would sit on the floor), so sizes go entry by entry with a floor of 1."""
    return (quantum, quantum) if budget * dim >= 2 * quantum else (1, 1)


def _check_budget(budget) -> float:
    """``budget`` as a float in (0, 1], or a clear error."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise TypeError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if isinstance(budget, (str, bytes)) or not 0 < b <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return b


def _grid(budget: float, dim: int, dtype: torch.dtype, quantum, min_size) -> tuple:
    """``(quantum, min_size)``: the given ones, or ``default_granularity``'s for the narrowest width
    ``dim`` and the tables' ``dtype`` (a default floor is at most one quantum)."""
    q_default, floor_default = default_granularity(budget, dim, alignment_quantum(dtype))
    q = q_default if quantum is None else ops.as_int(quantum, "quantum", 1)
    return q, (min(floor_default, q) if min_size is None else ops.as_int(min_size, "min_size", 0))


def _check_cut(budget: float, normalize: str, shrink: float) -> None:
    """The arguments of the cut that ``search`` and ``from_scores`` share."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    _check_budget(budget)
    if not shrink >= 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")


def _round_sizes(counts: torch.Tensor, D: int, quantum: int, min_size: int) -> torch.Tensor:
    q = quantum
    s = torch.div(counts + q // 2, q, rounding_mode="floor") * q
    return s.clamp(min=min_size, max=D)


def _total(sizes: dict) -> int:
    return sum(int(s.sum()) for s in sizes.values())


def _per_table(flat: torch.Tensor, like: dict) -> dict:
    """Splits ``flat`` (one entry per row of every table in ``like``'s order) back into ``{name: [V]}``."""
    return dict(zip(like, torch.split(flat, [t.numel() for t in like.values()])))


def _top_up(sizes: dict, priority, dims: dict, target: int, quantum: int) -> dict:
    """Adds quanta to the rows of highest priority that have room until the total is within one
    quantum of ``target`` (never above it), in rounds of at most one quantum a row, so that a gap
    larger than one quantum a row (ties at a threshold, rows clamped to a narrow table's width)
    still closes. ``priority``: ``{name: [V] float}``, or a function of the current sizes giving
    it (recomputed each round). Returns new sizes."""
    if _total(sizes) > target:
        floor = min(int(s.min()) for s in sizes.values() if s.numel())
        raise ValueError(
            f"budget of {target} entries is below what the floor of {floor} per row allows "
            f"(below what min_size={floor} allows); lower min_size or raise the budget"
        )
    names = list(sizes)
    while True:  # every round adds at least one quantum or stops; sizes are bounded by the widths
        gap = (target - _total(sizes)) // quantum
        if gap <= 0:
            return sizes
        room = torch.cat([(sizes[n] + quantum <= dims[n]).cpu() for n in names])
        k = min(gap, int(room.sum()))
        if k <= 0:
            return sizes
        pri_now = priority(sizes) if callable(priority) else priority
        pri = torch.cat([pri_now[n].detach().double().reshape(-1).cpu() for n in names])
        pri = torch.where(room, pri, torch.full_like(pri, -float("inf")))
        pick = torch.topk(pri, k, sorted=False).indices
        add = torch.zeros(pri.numel(), dtype=torch.int64)
        add[pick] = quantum
        sizes = {n: sizes[n] + a.to(sizes[n].device) for n, a in _per_table(add, sizes).items()}


def sizes_for_budget(scores: dict, budget: float, per_table: bool = False, quantum: int = 1, min_size: int = 0):
    """Sizes that keep the best-scored entries within ``budget`` (a fraction of all entries).

    The k-th largest score (radix select) gives a first threshold; a bisection over k then makes
    the rounded, clamped sizes fit ``floor(budget * entries)``; finally the rows whose next entry
    scores best get one more quantum each until the total is within one quantum of the budget.
    Returns ``(sizes dict, threshold)``.
    """
    _check_budget(budget)
    quantum, min_size = ops.as_int(quantum, "quantum", 1), ops.as_int(min_size, "min_size", 0)
    if per_table:
        out, thr = {}, {}
        for name, sc in scores.items():
            s, t = sizes_for_budget({name: sc}, budget, False, quantum, min_size)
            out.update(s)
            thr[name] = t
        return out, thr
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    n = flat.numel()
    target = int(budget * n)

    def sizes_at(k):
        t = ops.topk_threshold(flat, max(1, min(n, k)))
        sizes = {
            name: _round_sizes(ops.prune_counts(sc.float(), t), sc.shape[1], quantum, min_size)
            for name, sc in scores.items()
        }
        return sizes, float(t)

    lo, hi = 1, n  # find the largest k whose rounded total fits the target
    best = None
    sizes, t = sizes_at(target)
    if _total(sizes) <= target:
        best, lo = (sizes, t), target
    else:
        hi = target
    for _ in range(40):
        if hi - lo <= max(1, n // 100000):
            break
        mid = (lo + hi) // 2
        sizes, t = sizes_at(mid)
        if _total(sizes) <= target:
            best, lo = (sizes, t), mid
        else:
            hi = mid
    if best is None:
        # no cut fits: ties at every threshold tried (equal scores keep whole groups of entries at
        # once). Start from the floor and let the top-up pick entry by entry.
        floor_sizes = {
            name: torch.full((sc.shape[0],), min(max(min_size, 0), sc.shape[1]), dtype=torch.int64)
            for name, sc in scores.items()
        }
        if _total(floor_sizes) > target:
            raise ValueError(
                f"budget {budget} ({target} entries) is below what min_size={min_size} allows for every "
                f"row ({_total(floor_sizes)} entries); lower min_size (0 lets tokens be pruned away) "
                "or raise the budget"
            )
        best = (floor_sizes, float("inf"))
    sizes, t = best
    # the score of each row's next entry decides who gets the last quanta
    srt = {name: torch.sort(sc.detach().float().cpu(), dim=1, descending=True).values for name, sc in scores.items()}

    def next_entry(cur):
        return {
            name: v.gather(1, cur[name].cpu().clamp(max=max(v.shape[1] - 1, 0)).unsqueeze(1)).squeeze(1)
            for name, v in srt.items()
        }

    sizes = _top_up(
        {k: v.cpu() for k, v in sizes.items()}, next_entry, {k: v.shape[1] for k, v in scores.items()}, target, quantum
    )
    return sizes, t


def normalize_scores(scores: dict, how: str = "field", touched: dict | None = None) -> dict:
    """Per-table score normalisation so that tables of different cardinality and scale compete
    under one global budget.

    ``how="field"``: each table's ``[V, D]`` scores divided by their mean over the rows in
    ``touched`` (``{name: [V] bool}``, the rows the data used; default every row), so every table's
    typical entry scores 1 and tokens still rank by their own scores inside it. ``"none"``: as is.
    """
    if how not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {how!r}")
    if how == "none":
        return scores
    out = {}
    for name, sc in scores.items():
        rows = sc if touched is None or name not in touched or not bool(touched[name].any()) else sc[touched[name]]
        m = float(rows.double().mean()) if rows.numel() else 0.0
        out[name] = sc / m if m > 0 else sc
    return out


def shrink_scores(scores: dict, counts: dict, strength: float = 1.0) -> dict:
    """Pulls each row's scores toward its table's average score profile, the more the less the
    row was seen (empirical-Bayes style shrinkage of noisy per-row evidence).

    Args:
        scores: ``{name: [V, D]}`` entry scores.
        counts: ``{name: [V]}`` how often each token occurs in the training data (``token_counts``).
        strength: ``k`` in the row's weight ``n / (n + k * D)``: at ``k = 1`` a row seen as many
            times as it has entries keeps half of its own scores. 0 leaves the scores as they are.

    Returns:
        ``{name: [V, D] float32}``: entry ``j`` of row ``r`` becomes
        ``w_r * s[r, j] + (1 - w_r) * p[rank of s[r, j] in its row]``, where ``p[k]`` is the mean
        over the table's seen rows (every row when none was seen) of their k-th largest score. The
        order of the entries inside a row is kept, so ``init="kept"`` keeps the same entries.
    """
    if not strength >= 0:
        raise ValueError(f"shrink strength must be >= 0, got {strength}")
    missing = [n for n in scores if n not in counts]
    if missing:
        raise KeyError(f"counts lack tables {missing} (give every searched table's token counts)")
    out = {}
    for name, sc in scores.items():
        V, D = sc.shape
        n = torch.as_tensor(counts[name]).reshape(-1).to(device=sc.device, dtype=torch.float64)
        if n.numel() != V:
            raise ValueError(f"counts[{name!r}] has {n.numel()} entries but the table has {V} rows")
        _check_finite_nonnegative(n, f"counts[{name!r}]")
        if strength == 0 or V == 0:
            out[name] = sc.float()
            continue
        srt, order = torch.sort(sc.double(), dim=1, descending=True, stable=True)
        seen = n > 0
        profile = (srt[seen] if bool(seen.any()) else srt).mean(0)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(D, device=sc.device).expand(V, D).contiguous())
        lam = (n / (n + strength * D)).unsqueeze(1)
        out[name] = (lam * sc.double() + (1 - lam) * profile[rank]).float()
    return out


def _default_loss(model, batch):
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TypeError("pme.search: batches are not dicts with 'labels'; pass loss_fn(model, batch) -> loss")
    return F.binary_cross_entropy_with_logits(model(batch), batch["labels"])


_TABLE_TYPES = (nn.EmbeddingBag, nn.Embedding, MultiSizeEmbeddingBag, MultiSizeEmbedding)


def _searchable(model, tables, who: str = "pme.search", fused_ok: bool = False, needs_grad: bool = True):
    """The full-size tables to score: ``tables`` (names) or every table wider than 1. A pme table
    with a fused optimizer (no weight gradient) counts when ``fused_ok``; a frozen table counts
    unless ``needs_grad`` (the rule reads gradients)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, _TABLE_TYPES)}
    if isinstance(tables, str):
        tables = [tables]
    elif tables is not None:
        tables = list(tables)  # read twice below (a generator would be empty the second time)
    if tables is None:
        chosen = {n: m for n, m in found.items() if getattr(m, "embedding_dim", 0) > 1}
        if not chosen and found:
            raise ValueError(
                f"{who}: the model's embedding tables {sorted(found)} are all of width 1, which a search "
                "leaves alone by default; name them with tables=[...] to search them anyway"
            )
    else:
        # a shared (tied) table may be named by any of its names (pme.convert swaps every reference)
        every = {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, _TABLE_TYPES)}
        missing = [t for t in tables if t not in every]
        if missing:
            raise KeyError(f"{who}: {missing} are not embedding tables of the model (tables: {sorted(found)})")
        chosen, named = {}, {}
        for t in tables:
            if id(every[t]) in named and named[id(every[t])] != t:
                raise ValueError(
                    f"{who}: tables names {named[id(every[t])]!r} and {t!r}, which are the same (tied) table; "
                    "name it once"
                )
            named[id(every[t])] = t
            chosen[t] = every[t]
    if not chosen:
        what = "tables=[] names no table" if tables is not None else "the model has no embedding tables to search"
        raise ValueError(f"{who}: {what}")
    if "" in chosen:
        raise ValueError(
            f"{who}: the model is itself an embedding table; wrap it in a module (e.g. "
            "nn.ModuleDict({'table': table})) so that its sizes have a name to be converted by"
        )
    for n, m in chosen.items():
        pme_table = isinstance(m, (MultiSizeEmbeddingBag, MultiSizeEmbedding))
        fused = fused_ok and pme_table and m.optimizer is not None and not m._frozen
        if needs_grad and not m.weight.requires_grad and not fused:
            raise ValueError(f"{who}: table {n!r} does not require gradients (frozen?); the score needs them")
        if pme_table and int(m.sizes.min()) != m.embedding_dim:
            raise ValueError(f"{who}: table {n!r} is already multi-size; search from full-size tables")
    return chosen


def _tables_dtype(tables) -> torch.dtype:
    """The dtype that sets the size quantum of ``tables``: the narrowest element among them (the
    largest quantum), so that every table's rows stay 16-byte aligned."""
    return min((m.weight.dtype for m in tables), key=lambda d: torch.empty((), dtype=d).element_size())


def table_shapes(model: nn.Module, tables=None) -> dict:
    """``{table name: (V, D)}`` of the tables ``pme.search`` would search (default: every
    embedding table wider than 1)."""
    return {
        n: (int(m.num_embeddings), int(m.embedding_dim))
        for n, m in _searchable(model, tables, needs_grad=False).items()
    }


def token_counts(model: nn.Module, data, tables=None) -> dict:
    """``{table name: [V] int64}`` token frequencies of ``data`` (a ``pme.recsys.data.CTRDataset``) for
    the model's tables: a table named ``...<field>`` (e.g. ``embeddings.user``) counts ``field``."""
    out = {}
    for n, (V, _) in table_shapes(model, tables).items():
        f = n.rpartition(".")[2]
        if f not in data.field_names:
            raise KeyError(f"table {n!r}: the data has no field {f!r} (fields: {data.field_names})")
        c = data.token_counts(f).cpu()
        if c.numel() != V:
            raise ValueError(f"table {n!r} has {V} rows but field {f!r} has cardinality {c.numel()}")
        out[n] = c
    return out


def search(
    model: nn.Module,
    loader,
    budget: float = 0.2,
    *,
    tables=None,
    rule: str = "magnitude",
    normalize: str = "none",
    num_batches: int = 8,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-3,
    held_out=None,
    loss_fn=None,
    per_table: bool = False,
    quantum: int | None = None,
    min_size: int | None = None,
    counts: dict | None = None,
    shrink: float = 1.0,
    device=None,
    progress: bool = True,
) -> SearchResult:
    """Finds a size for every row of the model's embedding tables by pruning (PME).

    Score a trained model: either pass one you trained (``warmup_steps=0``, the default; the
    search then costs seconds on top of that training), or an untrained one with
    ``warmup_steps`` (the search trains its copy with Adam first; a fraction of one epoch is the
    cheap mode). Scores at initialisation mostly measure token frequency.

    Args:
        model: a model with full-size tables (``nn.EmbeddingBag``, ``nn.Embedding``, or pme
            tables of full width). It is not modified: the search works on a copy.
        loader: an iterable of training batches (re-iterated if shorter than warm-up + scoring);
            not used by ``magnitude`` / ``movement`` without warm-up.
        budget: fraction of the dense embedding entries to keep, in (0, 1].
        tables: names of the tables to search (default: every table wider than 1).
        rule: ``"magnitude"`` |w| (default), ``"movement"`` |w - w before warm-up|, ``"taylor"``
            |w * g| summed over ``num_batches`` training batches, ``"saliency"`` |w * g| on the
            ``held_out`` batches (first-order change of the loss when an entry is masked),
            ``"snip"`` (|w * g| on training batches, the older default) or ``"grad"`` (g^2).
        normalize: ``"none"`` (default: raw scores compete under the global budget) or
            ``"field"`` (each table's scores divided by their mean over the rows the data
            touched); see ``normalize_scores``. ``"none"`` won the pilot on both real data sets.
        num_batches: scoring batches (``taylor``, ``snip``, ``grad``).
        warmup_steps, warmup_lr: Adam steps (and their learning rate) on the copy before scoring.
        held_out: iterable of held-out batches for ``saliency`` (required there).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default BCE-with-logits of
            ``model(batch)`` against ``batch["labels"]``.
        per_table: the budget applies to each table instead of across all of them.
        quantum: sizes are multiples of it (default: 16 bytes' worth of the table's dtype, or 1
            when the budget is under two such quanta a token: see ``default_granularity``);
        min_size: smallest size (default: one quantum; 0 lets a token be pruned away).
        counts: ``{table name: [V]}`` the tokens' counts in the training data (for a
            ``CTRDataset``: ``token_counts(model, data)``). When given, rows seen fewer times
            than they have entries are sized mostly by their table's average (``shrink_scores``
            with ``strength=shrink``); recommended for id fields with rare tokens.
        shrink: the shrinkage strength ``k`` (row weight ``n / (n + k * D)``); used with ``counts``.

    Returns:
        ``SearchResult`` with ``sizes`` per table name (use ``result.convert(model)``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    _check_cut(budget, normalize, shrink)
    if num_batches < 1 and rule in ("taylor", "snip", "grad"):
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if rule == "saliency" and held_out is None:
        raise ValueError("rule='saliency' needs held_out=<iterable of held-out batches>")
    if rule == "movement" and warmup_steps == 0:
        raise ValueError("rule='movement' measures the change during the warm-up: pass warmup_steps > 0")
    loss_fn = loss_fn or _default_loss
    t0 = time.perf_counter()
    chosen = _searchable(model, tables, fused_ok=True, needs_grad=rule != "magnitude" or warmup_steps > 0)
    on_meta = [n for n, m in chosen.items() if m.weight.is_meta]
    if on_meta:
        raise ValueError(
            f"pme.search: tables {on_meta} are on the meta device and hold no values to score; materialise "
            "and train the model first (the baselines of sizes_at_budget need only the shapes)"
        )
    dtype = _tables_dtype(chosen.values())
    quantum, min_size = _grid(budget, min(m.embedding_dim for m in chosen.values()), dtype, quantum, min_size)
    work = copy.deepcopy(model)
    if device is not None:
        work = work.to(device)
    wt = dict(work.named_modules(remove_duplicate=False))
    for n in chosen:  # a full-width table with a fused optimizer: its copy warms up and scores by plain gradients
        if getattr(wt[n], "optimizer", None) is not None and not wt[n]._frozen:
            wt[n].optimizer = None
            wt[n].weight.requires_grad_(True)
    before = {n: wt[n].weight.detach().clone() for n in chosen} if rule == "movement" else None
    touched = {n: torch.zeros(m.num_embeddings, dtype=torch.bool) for n, m in chosen.items()}

    def batches(source, need):
        n = 0
        while True:
            got = False
            for b in source:
                got = True
                yield b
                n += 1
            if not got and n == 0:
                raise ValueError("pme.search: the loader yielded no batch")
            if not got:
                raise ValueError(
                    f"pme.search: the loader ran out after {n} batches; {need} need more: "
                    "pass a re-iterable loader (a list, a DataLoader)"
                )

    def note(batch):  # rows the data touches, for the per-field normalisation
        fields = batch.get("fields") if isinstance(batch, dict) else None
        if not fields:
            return
        for n in chosen:
            f = n.rpartition(".")[2]
            if f in fields:
                v = fields[f][0] if isinstance(fields[f], (tuple, list)) else fields[f]
                touched[n][v.reshape(-1).cpu()] = True

    it = batches(loader, f"warm-up + scoring ({warmup_steps} + {num_batches} batches)")
    steps = 0
    if warmup_steps > 0:
        opt = torch.optim.Adam([p for p in work.parameters() if p.requires_grad], lr=warmup_lr)
        work.train()
        for _ in tqdm(range(warmup_steps), desc="pme.search warm-up", leave=False, disable=not progress):
            b = batch_to(next(it), device)
            note(b)
            opt.zero_grad(set_to_none=True)
            loss_fn(work, b).backward()
            opt.step()
            steps += 1
    # Full-width pme tables that accumulate scores in their backward.
    convert(
        work,
        {n: wt[n].embedding_dim for n in chosen if not isinstance(wt[n], (MultiSizeEmbeddingBag, MultiSizeEmbedding))},
        init="kept",
    )
    wt = dict(work.named_modules(remove_duplicate=False))
    kernel_rule = "grad" if rule == "grad" else "snip"
    for name in chosen:
        _Scorer(kernel_rule).attach(wt[name])
    batches_done = 0
    if rule in ("magnitude", "movement"):
        for name in chosen:
            w = wt[name].weight.detach()
            sc = w.abs() if rule == "magnitude" else (w.reshape(before[name].shape) - before[name]).abs().reshape(-1)
            wt[name].scores.copy_(sc.reshape(-1))
    else:
        work.train()
        for p in work.parameters():
            p.grad = None
        if rule == "saliency":
            source = tqdm(held_out, desc="pme.search saliency (held-out)", leave=False, disable=not progress)
        else:
            source = tqdm(
                (next(it) for _ in range(num_batches)),
                total=num_batches,
                leave=False,
                desc=f"pme.search scoring ({rule})",
                disable=not progress,
            )
        for b in source:
            b = batch_to(b, device)
            note(b)
            loss_fn(work, b).backward()
            batches_done += 1
        if batches_done == 0:
            raise ValueError("pme.search: no scoring batch (held_out was empty?)")
        for p in work.parameters():
            p.grad = None
    scores = {}
    for name in chosen:
        m = wt[name]
        scores[name] = m.scores.reshape(m.num_embeddings, m.embedding_dim).detach().float()
        _check_finite_nonnegative(  # a NaN would decide sizes silently
            scores[name],
            f"pme.search: the {rule} scores of table {name!r}",
            nonnegative=False,
            hint=" (the table's weights or gradients are not finite: a diverged training run?)",
        )
    if not any(bool(t.any()) for t in touched.values()):
        touched = None  # no batch seen (a trained model scored by magnitude): every row counts
    return _result(
        scores,
        budget,
        t0,
        rule,
        steps,
        batches_done,
        counts,
        shrink,
        normalize,
        touched,
        per_table,
        quantum,
        min_size,
        dtype,
    )


def _result(
    scores, budget, t0, rule, steps, batches, counts, shrink, normalize, touched, per_table, quantum, min_size, dtype
):
    """Shrinks, normalises and cuts ``scores`` at ``budget``: the ``SearchResult``."""
    if counts is not None:
        scores = shrink_scores(scores, counts, shrink)
    scores = normalize_scores(scores, normalize, touched)
    sizes, thr = sizes_for_budget(scores, budget, per_table, quantum, min_size)
    dense = sum(s.numel() for s in scores.values())
    stats = {
        n: {
            "rows": int(s.numel()),
            "mean_size": float(s.double().mean()) if s.numel() else 0.0,
            "min": int(s.min()) if s.numel() else 0,
            "max": int(s.max()) if s.numel() else 0,
        }
        for n, s in sizes.items()
    }
    return SearchResult(
        {n: s.cpu() for n, s in sizes.items()},
        {n: s.cpu() for n, s in scores.items()},
        int(budget * dense),
        _total(sizes),
        dense,
        thr,
        time.perf_counter() - t0,
        rule,
        steps,
        batches,
        stats,
        normalize,
        shrink if counts is not None else None,
        bool(per_table),
        dtype,
    )


def from_scores(
    scores: dict,
    budget: float = 0.2,
    *,
    counts: dict | None = None,
    shrink: float = 1.0,
    normalize: str = "none",
    per_table: bool = False,
    quantum: int | None = None,
    min_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    rule: str = "given",
) -> SearchResult:
    """PME's sizes from entry scores you already have (e.g. ``TrainingScores.scores()``): the
    same shrinkage, normalisation and budget cut as :func:`search`, with no model.

    Args:
        scores: ``{table name: [V, D]}`` finite entry scores (higher: keep; non-negative where
            ``counts`` shrink them).
        budget, counts, shrink, normalize, per_table, quantum, min_size: as in :func:`search`
            (``normalize="field"`` averages over every row here).
        dtype: the tables' dtype, for the default quantum (16 bytes' worth of it).
        rule: what the scores are, recorded in the result.

    Returns:
        ``SearchResult`` (``result.for_budget(b)`` cuts the same scores at another budget).
    """
    _check_cut(budget, normalize, shrink)
    if not scores:
        raise ValueError("from_scores: no tables in scores")
    for n, sc in scores.items():
        if not isinstance(sc, torch.Tensor) or sc.dim() != 2 or sc.shape[1] < 1:
            raise ValueError(
                f"from_scores: scores[{n!r}] must be a [V, D] tensor, got {getattr(sc, 'shape', type(sc))}"
            )
        if not sc.is_floating_point():
            raise TypeError(f"from_scores: scores[{n!r}] must be floating point, got {sc.dtype}")
        _check_finite_nonnegative(sc.detach(), f"from_scores: scores[{n!r}]", nonnegative=False)
    t0 = time.perf_counter()
    quantum, min_size = _grid(budget, min(int(sc.shape[1]) for sc in scores.values()), dtype, quantum, min_size)
    scores = {n: sc.detach().float() for n, sc in scores.items()}
    return _result(scores, budget, t0, rule, 0, 0, counts, shrink, normalize, None, per_table, quantum, min_size, dtype)


def batch_to(batch, device, non_blocking: bool = False):
    """``batch`` with every tensor moved to ``device`` (dicts, lists and tuples walked; other values
    kept); ``device=None`` returns it as it is. The one batch mover of pme (``pme.recsys.data`` uses it)."""
    if device is None or batch is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: batch_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device, non_blocking) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------
# Baselines at equal budget. Rounding rule (all methods): the total is floor(budget * V * D) or
# up to one quantum below it: first the largest sizes that fit, then one more quantum for the
# rows of highest priority (uniform: evenly spread rows; popularity / random: the largest
# rounding remainders; PME: the best next entry) until the next quantum would overshoot.
# ---------------------------------------------------------------------------------------------
def _fit_total(make, target: int, lo: float, hi: float, iters: int = 60):
    """Bisection on a scalar knob so that ``make(knob)`` (sizes dict) totals <= target, as close as
    possible. Returns ``(sizes, knob)``."""
    best = (make(lo), lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = make(mid)
        if _total(s) <= target:
            best, lo = (s, mid), mid
        else:
            hi = mid
    return best


def uniform_sizes(shapes: dict, budget: float, quantum: int = 1, min_size: int = 0) -> dict:
    """The same size for every row of every table (``shapes``: ``{name: (V, D)}``), mixing two
    adjacent sizes so the total meets the budget: every row gets the largest multiple ``s`` of
    ``quantum`` that fits, and evenly spread rows get ``s + quantum`` until the next quantum
    would overshoot ``floor(budget * sum(V * D))``. Clamped to ``[min_size, D]``."""
    _check_budget(budget)
    ops.as_int(quantum, "quantum", 1)
    rows = sum(V for V, _ in shapes.values())
    target = int(budget * sum(V * D for V, D in shapes.values()))
    s = int(target // max(rows, 1)) // quantum * quantum
    sizes = {n: torch.full((V,), min(max(s, min_size), D), dtype=torch.int64) for n, (V, D) in shapes.items()}
    # evenly spread: priority = -(position modulo the spacing)
    gen_pri, start = {}, 0
    for n, (V, _) in shapes.items():
        idx = torch.arange(start, start + V, dtype=torch.float64)
        gen_pri[n] = -_spread_rank(idx, rows)
        start += V
    return _top_up(sizes, gen_pri, {n: D for n, (_, D) in shapes.items()}, target, quantum)


def _spread_rank(idx: torch.Tensor, n: int) -> torch.Tensor:
    """A low-discrepancy rank of each of ``n`` positions (golden-ratio sequence): the first k
    positions by this rank are spread evenly over ``[0, n)``."""
    phi = 0.6180339887498949
    return torch.remainder(idx * phi, 1.0)


def _check_finite_nonnegative(t: torch.Tensor, what: str, nonnegative: bool = True, hint: str = "") -> None:
    """Token counts are finite and >= 0, scores finite (a NaN from a diverged run would silently
    decide sizes; a score only ranks, so its sign is the caller's)."""
    bad = ~torch.isfinite(t.double())
    if nonnegative:
        bad |= t.double() < 0
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        where = f"row {at[0]}" if len(at) == 1 else f"row {at[0]}, column {at[1]}"
        rule = "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"{what} must be {rule}; {where} holds {t[at].item()}{hint}")


def popularity_sizes(
    counts: dict, dims: dict, budget: float, alpha: float = 0.3, quantum: int = 1, min_size: int = 0
) -> dict:
    """MDE's power rule per token: ``size ∝ count**alpha``, scaled to meet the budget.

    ``counts``: ``{name: [V] token frequencies}``; ``dims``: ``{name: D}``.
    """
    _check_budget(budget)
    ops.as_int(quantum, "quantum", 1)
    counts = {n: torch.as_tensor(c).reshape(-1) for n, c in counts.items()}
    for n, c in counts.items():
        _check_finite_nonnegative(c, f"counts[{n!r}]")
    dense = sum(c.numel() * dims[n] for n, c in counts.items())
    target = int(budget * dense)
    base = {n: (c.double().clamp(min=0) + 1) ** alpha for n, c in counts.items()}
    top = max((float(b.max()) for b in base.values() if b.numel()), default=1.0)
    sizes, lam = _fit_total(
        lambda lam: {n: _round_sizes((lam * b).round().long(), dims[n], quantum, min_size) for n, b in base.items()},
        target,
        0.0,
        2.0 * max(dims.values()) / top * 1e3,
    )
    return _top_up(sizes, lambda cur: {n: lam * b - cur[n].double() for n, b in base.items()}, dims, target, quantum)


def random_sizes(shapes: dict, budget: float, quantum: int = 1, min_size: int = 0, seed: int = 0) -> dict:
    """Sizes drawn uniformly at random per row, then scaled to meet the budget."""
    _check_budget(budget)
    ops.as_int(quantum, "quantum", 1)
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.rand(V, generator=gen, dtype=torch.float64) for n, (V, D) in shapes.items()}
    dense = sum(V * D for V, D in shapes.values())
    dims = {n: D for n, (_, D) in shapes.items()}
    sizes, lam = _fit_total(
        lambda lam: {
            n: _round_sizes((lam * b * dims[n]).round().long(), dims[n], quantum, min_size) for n, b in base.items()
        },
        int(budget * dense),
        0.0,
        1e6,
    )
    return _top_up(
        sizes,
        lambda cur: {n: lam * b * dims[n] - cur[n].double() for n, b in base.items()},
        dims,
        int(budget * dense),
        quantum,
    )


# ---------------------------------------------------------------------------------------------
# Grouped layout: sizes snapped to power-of-two classes, one learned [s, D] projection per class,
# shared by every table of the same width D (so many small tables pay for it once)
# ---------------------------------------------------------------------------------------------
def grouped_classes(D: int, quantum: int) -> list:
    """Size classes of the grouped layout: powers of two times the quantum up to D (and D)."""
    c, out = quantum, []
    while c < D:
        out.append(c)
        c *= 2
    return out + [D]


def _snap_down(sizes: torch.Tensor, classes: list) -> torch.Tensor:
    cls = torch.tensor(classes, dtype=torch.int64)
    idx = torch.searchsorted(cls, sizes, right=True) - 1
    return torch.where(idx >= 0, cls[idx.clamp(min=0)], torch.zeros_like(sizes))


def projection_entries(sizes: dict, dims: dict) -> int:
    """Entries of the shared per-size projections: for each width D, ``sum(classes used) * D``
    over the union of the classes its tables use."""
    used = {}
    for n, s in sizes.items():
        used.setdefault(dims[n], set()).update(int(c) for c in torch.unique(s).tolist() if c > 0)
    return sum(sum(cs) * D for D, cs in used.items())


def grouped_sizes(result: SearchResult, budget: float, quantum: int = 4):
    """PME sizes snapped down to the grouped layout's classes, with the shared per-size
    projections counted in the budget, then the budget that snapping left unused spent on
    promoting the best-scored rows to their next class: ``{name: [V]}``, or None when even the
    smallest classes leave no room (then the padded layout is the one to use).

    The classes are powers of two times ``quantum`` (times 1 when the budget leaves fewer than two
    quanta a token, as ``default_granularity``). A class of size ``s`` costs an ``[s, D]``
    projection, so at small budgets the largest classes are left out, largest first, until the
    projections and every token's smallest class fit: on census adult's 13 tables (520 tokens) at
    width 64, 10% of the entries (a budget of 3,328) leaves fewer than two quanta of 4 a token, so
    the classes are powers of two from 1, and all of them (1 to 64) would cost 8,128 projection
    entries, more than the whole budget: the largest go first (a run kept classes 1 to 16)."""
    _check_budget(budget)
    ops.as_int(quantum, "quantum", 1)
    dims = {n: int(s.shape[1]) for n, s in result.scores.items()}
    q, _ = default_granularity(budget, min(dims.values()), quantum)
    # the quantum's classes first; then classes from 1, whose small projections may fit a budget
    # that the quantum's smallest class (a [quantum, D] projection) does not
    for grid in dict.fromkeys((q, 1)):
        caps = sorted({c for D in set(dims.values()) for c in grouped_classes(D, grid)}, reverse=True)
        for cap in caps:
            sizes = _grouped_fit(result, budget, grid, cap, dims)
            if sizes is not None:
                return sizes
    return None


def _grouped_fit(result: SearchResult, budget: float, quantum: int, cap: int, dims: dict):
    """``grouped_sizes`` with the classes up to ``cap``: None when they do not fit the budget."""
    dense = result.dense_entries
    target = int(budget * dense)
    classes = {n: [c for c in grouped_classes(D, quantum) if c <= cap] for n, D in dims.items()}
    floor = min(cs[0] for cs in classes.values())
    proj = 0
    sizes = None
    for _ in range(6):
        b = (target - proj) / dense
        if b <= 0:
            return None
        try:  # every token keeps at least the smallest class (snapping down must not zero it)
            cut = result.for_budget(b, quantum=1, min_size=floor)
        except ValueError:
            return None
        sizes = {n: _snap_down(s.clamp(max=cap), classes[n]) for n, s in cut.sizes.items()}
        used = projection_entries(sizes, dims)
        if used <= proj:
            break
        proj = used
    if sizes is None or _total(sizes) + projection_entries(sizes, dims) > target:
        return None
    return _grouped_top_up(sizes, result.scores, dims, target - projection_entries(sizes, dims))


def _grouped_top_up(sizes: dict, scores: dict, dims: dict, room: int) -> dict:
    """Snapping down leaves budget unused (at 50% on census adult, a third of it). Spend it:
    rounds of promoting rows to their next class, best gain first, where a row's gain is the mean
    score of the entries the promotion adds; only into classes its width already uses (the
    shared projections stay as counted). Stops when no promotion fits in ``room - added``."""
    names = list(sizes)
    used = {}
    for n in names:
        used.setdefault(dims[n], set()).update(int(c) for c in torch.unique(sizes[n]).tolist() if c > 0)
    # the classes a row may move to, with D + 1 standing for "none above"
    classes = {D: torch.tensor(sorted(cs) + [D + 1], dtype=torch.int64) for D, cs in used.items()}
    csum = {}  # per row, the cumulative sums of its scores in descending order, a 0 column first
    for n in names:
        srt = torch.sort(scores[n].detach().float().cpu(), dim=1, descending=True).values.double()
        csum[n] = torch.cat([torch.zeros(srt.shape[0], 1, dtype=torch.float64), srt.cumsum(1)], dim=1)
    left = room - _total(sizes)
    while True:  # every round promotes at least one row or stops, and sizes are bounded by D
        nxt, cost, gain = {}, [], []
        for n in names:
            cls = classes[dims[n]]
            up = cls[torch.searchsorted(cls, sizes[n], right=True)]  # the next used class
            ok = up <= dims[n]
            up = torch.where(ok, up, sizes[n])
            c = up - sizes[n]
            g = (csum[n].gather(1, up[:, None]) - csum[n].gather(1, sizes[n][:, None])).squeeze(1)
            nxt[n] = up
            cost.append(torch.where(ok & (c <= left), c, torch.zeros_like(c)))
            gain.append(torch.where(ok & (c <= left), g / c.clamp(min=1), torch.full_like(g, -1.0)))
        cost, gain = torch.cat(cost), torch.cat(gain)
        order = torch.argsort(gain, descending=True, stable=True)
        order = order[gain[order] >= 0]
        take = order[torch.cumsum(cost[order], 0) <= left]
        if take.numel() == 0:
            break
        pick = torch.zeros(cost.numel(), dtype=torch.bool)
        pick[take] = True
        sizes = {n: torch.where(p, nxt[n], sizes[n]) for n, p in _per_table(pick, sizes).items()}
        left -= int(cost[take].sum())
    return sizes


def convert_grouped(model: nn.Module, sizes: dict, share: bool = True) -> nn.Module:
    """Converts the tables to the grouped layout with a learned projection (output ``[B, D]``),
    in place; with ``share=True`` every table of the same width uses one projection (the union of
    the classes present), as ``grouped_sizes`` counts it. Returns ``model``."""
    if sizes is None:
        raise ValueError(
            "convert_grouped: sizes is None: sizes_at_budget('grouped', ...) found no set of size classes "
            "whose projections fit the budget; use the padded layout (pme.convert) at this budget"
        )
    if not isinstance(sizes, Mapping):
        raise TypeError(f"convert_grouped: sizes must be a dict {{table name: sizes}}, got {type(sizes).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [n for n in sizes if not isinstance(modules.get(n), (nn.EmbeddingBag, nn.Embedding))]
    if unknown:
        raise KeyError(f"convert_grouped: {unknown} are not nn.EmbeddingBag / nn.Embedding tables of the model")
    sizes = {n: parse_sizes(s, modules[n].num_embeddings, modules[n].embedding_dim) for n, s in sizes.items()}
    dims = {n: int(modules[n].embedding_dim) for n in sizes}
    classes = {}
    for n, s in sizes.items():
        classes.setdefault(dims[n], set()).update(int(c) for c in torch.unique(s).tolist() if c > 0)
    for D in set(dims.values()):
        group = {n: s for n, s in sizes.items() if dims[n] == D}
        kw = {"size_classes": sorted(classes[D])} if share else {}
        convert(model, group, init="fresh", layout="grouped", project=True, **kw)
    if share:
        modules = dict(model.named_modules(remove_duplicate=False))
        groups = {}
        for n in sizes:  # one projection per width (and dtype: a matmul takes one)
            groups.setdefault((modules[n].embedding_dim, modules[n].weight.dtype), []).append(n)
        groups = list(groups.values())
        _tie_projections(groups, model)
        # a load of other sizes or classes gives each table a projection of its own: tie them again
        model.register_load_state_dict_post_hook(functools.partial(_tie_projections, groups))
    return model


def _tie_projections(groups: list, model: nn.Module, _keys=None) -> None:
    """Every table of a group (module names) uses the first one's projection, where the shapes
    agree (also a ``load_state_dict`` post-hook: the tables saved one shared projection under each
    name, so the first's loaded values are every table's)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for names in groups:
        first = modules[names[0]].projection
        for n in names[1:]:
            if modules[n].projection.shape == first.shape:
                modules[n].projection = first


# ---------------------------------------------------------------------------------------------
# One entry point for sizes at equal budget
# ---------------------------------------------------------------------------------------------
def sizes_at_budget(
    method: str,
    budget: float,
    *,
    model: nn.Module | None = None,
    result: SearchResult | None = None,
    data=None,
    counts: dict | None = None,
    tables=None,
    seed: int = 0,
    quantum: int | None = None,
    min_size: int | None = None,
    alpha: float = 0.3,
) -> dict | None:
    """Sizes for ``budget`` (a fraction of the dense ``V * D`` entries), keyed by table name.

    Args:
        method: ``"pme"`` (needs ``result``, a ``SearchResult``; cut at ``budget`` with no new
            scoring), ``"uniform"``, ``"popularity"`` (MDE's power rule ``count**alpha``; needs
            ``data``, a ``CTRDataset``, or ``counts``), ``"random"`` (``seed``), or ``"grouped"``
            (PME sizes snapped to power-of-two classes, the per-size projections shared by
            tables of the same width and counted in the budget; use ``convert_grouped``; returns
            None when no set of classes, with their projections, fits the budget).
        model: the model with full-size tables (``uniform``/``popularity``/``random``; table names
            and shapes come from it); ``result`` serves for ``pme``/``grouped``.
        quantum, min_size: the size grid and floor (default: ``default_granularity``;
            ``uniform`` uses steps of 1 with a floor of 1; ``grouped`` ignores both: its classes
            follow :func:`grouped_sizes`).

    Every method's total is ``floor(budget * entries)`` or at most one quantum below it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_budget(budget)
    if method in ("pme", "grouped"):
        if result is None:
            raise ValueError(f"method {method!r} needs result=<pme.search(...) result>")
        shapes = {n: tuple(s.shape) for n, s in result.scores.items()}
        dtype = result.dtype
    else:
        if model is None:
            raise ValueError(f"method {method!r} needs model=<the model with full-size tables>")
        found = _searchable(model, tables, who="sizes_at_budget", needs_grad=False)
        shapes = {n: (int(m.num_embeddings), int(m.embedding_dim)) for n, m in found.items()}
        dtype = _tables_dtype(found.values())  # the quantum of the tables' dtype, as pme.search's
    q, floor = _grid(budget, min(D for _, D in shapes.values()), dtype, quantum, min_size)
    if method == "pme":
        return result.for_budget(budget, quantum=quantum, min_size=min_size).sizes
    if method == "grouped":
        return grouped_sizes(result, budget, quantum=alignment_quantum(dtype))
    if method == "uniform":
        return uniform_sizes(shapes, budget, 1 if quantum is None else q, 1 if min_size is None else floor)
    if method == "random":
        return random_sizes(shapes, budget, q, floor, seed=seed)
    if counts is None:
        if data is None:
            raise ValueError("method 'popularity' needs data=<CTRDataset> or counts={table: [V] counts}")
        counts = token_counts(model, data, tables)
    missing = [n for n in shapes if n not in counts]
    if missing:
        raise KeyError(f"counts lack tables {missing}")
    counts = {n: torch.as_tensor(counts[n]) for n in shapes}
    for n, (V, _) in shapes.items():
        if counts[n].numel() != V:
            raise ValueError(f"counts[{n!r}] has {counts[n].numel()} entries but the table has {V} rows")
    return popularity_sizes(
        counts,
        {n: D for n, (_, D) in shapes.items()},
        budget,
        alpha=alpha,
        quantum=q,
        min_size=floor,
    )


class _CallableModule(types.ModuleType):
    """``pme.search`` is this module and its main function at once: ``pme.search(model, loader,
    budget)`` calls :func:`search` however the module was imported (``from pme.search import ...``
    or ``import pme.recsys.experiment`` used to leave the module, not callable, in its place)."""

    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
