"""PME size search: score every entry of full-size tables, prune to a global budget, read sizes.

Our reconstruction of PME (Pruning-based Multi-size Embedding, Liu et al., Frontiers in Big
Data 2023; only the abstract is public, so the details below are ours):

1. Copy the model; every searched table becomes a full-width ``MultiSizeEmbeddingBag`` whose
   backward feeds the fused score accumulation (no gradient the size of the table is built).
2. Optionally warm up the copy for a few steps (the scores at initialisation mostly reflect
   token frequency; a few steps let the entries that matter grow).
3. Score every entry over a few mini-batches: connection sensitivity ``|w * dL/dw|`` (SNIP,
   default), ``g^2`` (``grad``) or ``|w|`` (``magnitude``), summed over batches.
4. Keep the top entries under a budget (a fraction of all ``V * D`` entries, global across
   tables or per table); a token's size is its number of surviving entries ("capacity
   transfer"), rounded to the alignment quantum and clamped to ``[min_size, D]``. The threshold
   is found by radix select on the device (``pme.ops.topk_threshold``), then adjusted by
   bisection so that the rounded sizes meet the budget.

Also here: the baselines at equal budget (uniform, popularity by MDE's power rule, random).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .modules import MultiSizeEmbedding, MultiSizeEmbeddingBag, convert

__all__ = ["search", "SearchResult", "sizes_for_budget", "default_granularity", "uniform_sizes", "popularity_sizes",
           "random_sizes", "alignment_quantum", "batch_to"]

RULES = ("snip", "grad", "magnitude")


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
        return [ops.StateBuffer("scores", (module.weight.numel(),))]

    def consume(self, module, rows):
        ops.accumulate_scores_(module.scores, rows.grad_out, module.weight, module.offsets, rows.indices,
                               rows.bag_offsets, col_of_size=module.col_of_size, argmax=rows.argmax, mode=rows.mode,
                               per_sample_weights=rows.per_sample_weights, padding_idx=rows.padding_idx,
                               rule=self.rule)


@dataclass
class SearchResult:
    """What ``pme.search`` found.

    Attributes:
        sizes: ``{table name: [V] int64}`` sizes in ``[min_size, D]``, multiples of ``quantum``.
        scores: ``{table name: [V, D] float32}`` the accumulated entry scores.
        budget_entries: the entries the budget allows; ``kept_entries``: what the sizes use.
        dense_entries: ``sum(V * D)`` over the searched tables.
        threshold: the score threshold of the global budget (per table: a dict).
        seconds: wall time of warm-up + scoring + thresholding; ``steps``: warm-up steps,
            ``batches``: scoring batches.
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

    @property
    def fraction(self) -> float:
        """Kept entries / dense entries."""
        return self.kept_entries / max(1, self.dense_entries)

    def __repr__(self):
        return (f"SearchResult(rule={self.rule!r}, tables={len(self.sizes)}, kept={self.kept_entries:,} of "
                f"{self.dense_entries:,} entries ({100 * self.fraction:.1f}%), seconds={self.seconds:.2f})")

    def for_budget(self, budget: float, per_table: bool = False, quantum: int = 1, min_size: int = 0):
        """The same scores cut at another budget (no new scoring): a new ``SearchResult``."""
        t0 = time.perf_counter()
        sizes, thr = sizes_for_budget(self.scores, budget, per_table=per_table, quantum=quantum, min_size=min_size)
        kept = sum(int(s.sum()) for s in sizes.values())
        return SearchResult(sizes, self.scores, int(budget * self.dense_entries), kept, self.dense_entries, thr,
                            self.seconds + time.perf_counter() - t0, self.rule, self.steps, self.batches)

    def convert(self, model: nn.Module, init: str = "fresh", **kwargs) -> nn.Module:
        """``pme.convert(model, self.sizes, ...)``; ``init="kept"`` keeps each row's best entries."""
        return convert(model, self.sizes, init=init, scores=self.scores if init == "kept" else None, **kwargs)


def default_granularity(budget: float, dim: int, quantum: int) -> tuple:
    """``(quantum, min_size)`` for a budget: the alignment quantum and a floor of one quantum per
    token; when the budget leaves fewer than two quanta a token on average, that grid is too
    coarse (most tokens would sit on the floor), so sizes go entry by entry with a floor of 1."""
    return (quantum, quantum) if budget * dim >= 2 * quantum else (1, 1)


def _round_sizes(counts: torch.Tensor, D: int, quantum: int, min_size: int) -> torch.Tensor:
    q = quantum
    s = torch.div(counts + q // 2, q, rounding_mode="floor") * q
    return s.clamp(min=min_size, max=D)


def sizes_for_budget(scores: dict, budget: float, per_table: bool = False, quantum: int = 1, min_size: int = 0):
    """Sizes that keep the best-scored entries within ``budget`` (a fraction of all entries).

    The k-th largest score (radix select) gives a first threshold; a bisection over k then makes
    the rounded, clamped sizes meet the budget. Returns ``(sizes dict, threshold)``.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
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
        sizes = {name: _round_sizes(ops.prune_counts(sc.float(), t), sc.shape[1], quantum, min_size)
                 for name, sc in scores.items()}
        return sizes, float(t)

    lo, hi = 1, n  # find the largest k whose rounded total fits the target
    best = None
    sizes, t = sizes_at(target)
    if sum(int(s.sum()) for s in sizes.values()) <= target:
        best, lo = (sizes, t), target
    else:
        hi = target
    for _ in range(40):
        if hi - lo <= max(1, n // 100000):
            break
        mid = (lo + hi) // 2
        sizes, t = sizes_at(mid)
        if sum(int(s.sum()) for s in sizes.values()) <= target:
            best, lo = (sizes, t), mid
        else:
            hi = mid
    if best is None:
        raise ValueError(f"budget {budget} is below what min_size={min_size} allows for every row; "
                         "lower min_size (0 lets tokens be pruned away) or raise the budget")
    return best


def _default_loss(model, batch):
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TypeError("pme.search: batches are not dicts with 'labels'; pass loss_fn(model, batch) -> loss")
    return F.binary_cross_entropy_with_logits(model(batch), batch["labels"])


def _searchable(model, tables):
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.EmbeddingBag, nn.Embedding, MultiSizeEmbeddingBag, MultiSizeEmbedding))}
    if tables is None:
        chosen = {n: m for n, m in found.items() if getattr(m, "embedding_dim", 0) > 1}
    else:
        missing = [t for t in tables if t not in found]
        if missing:
            raise KeyError(f"pme.search: {missing} are not embedding tables of the model (tables: {sorted(found)})")
        chosen = {t: found[t] for t in tables}
    if not chosen:
        raise ValueError("pme.search: the model has no embedding tables to search")
    for n, m in chosen.items():
        w = m.weight
        if not w.requires_grad:
            raise ValueError(f"pme.search: table {n!r} does not require gradients (frozen?); the score needs them")
        if isinstance(m, (MultiSizeEmbeddingBag, MultiSizeEmbedding)) and int(m.sizes.min()) != m.embedding_dim:
            raise ValueError(f"pme.search: table {n!r} is already multi-size; search from full-size tables")
    return chosen


def search(model: nn.Module, loader, budget: float = 0.2, *, tables=None, rule: str = "snip",
           num_batches: int = 8, warmup_steps: int = 0, warmup_lr: float = 1e-3, loss_fn=None,
           per_table: bool = False, quantum: int | None = None, min_size: int | None = None,
           device=None, progress: bool = True) -> SearchResult:
    """Finds a size for every row of the model's embedding tables by pruning (PME).

    Args:
        model: a model with full-size tables (``nn.EmbeddingBag``, ``nn.Embedding``, or pme
            tables of full width). It is not modified: the search works on a copy.
        loader: an iterable of batches (re-iterated if shorter than warm-up + scoring).
        budget: fraction of the dense embedding entries to keep, in (0, 1].
        tables: names of the tables to search (default: every table wider than 1).
        rule: ``"snip"`` (|w * g|, default), ``"grad"`` (g^2) or ``"magnitude"`` (|w|).
        num_batches: scoring batches; ``warmup_steps``: Adam steps on the copy before scoring.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default BCE-with-logits of
            ``model(batch)`` against ``batch["labels"]``.
        per_table: the budget applies to each table instead of across all of them.
        quantum: sizes are multiples of it (default: 16 bytes' worth of the table's dtype, or 1
            when the budget is under two such quanta a token: see ``default_granularity``);
        min_size: smallest size (default: one quantum; 0 lets a token be pruned away).

    Returns:
        ``SearchResult`` with ``sizes`` per table name (use ``result.convert(model)``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if num_batches < 1 and rule != "magnitude":
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    loss_fn = loss_fn or _default_loss
    t0 = time.perf_counter()
    chosen = _searchable(model, tables)
    dtype = next(iter(chosen.values())).weight.dtype
    dim = min(m.embedding_dim for m in chosen.values())
    q_default, floor_default = default_granularity(budget, dim, alignment_quantum(dtype))
    quantum = q_default if quantum is None else int(quantum)
    min_size = min(floor_default, quantum) if min_size is None else int(min_size)
    work = copy.deepcopy(model)
    if device is not None:
        work = work.to(device)
    wt = dict(work.named_modules())

    def batches():
        n = 0
        while True:
            got = False
            for b in loader:
                got = True
                yield b
                n += 1
            if not got and n == 0:
                raise ValueError("pme.search: the loader yielded no batch")
            if not got:
                raise ValueError(f"pme.search: the loader ran out after {n} batches; warm-up + scoring need "
                                 f"{warmup_steps + num_batches}: pass a re-iterable loader (a list, a DataLoader)")

    it = batches()
    steps = 0
    if warmup_steps > 0:
        opt = torch.optim.Adam([p for p in work.parameters() if p.requires_grad], lr=warmup_lr)
        work.train()
        for _ in tqdm(range(warmup_steps), desc="pme.search warm-up", leave=False, disable=not progress):
            opt.zero_grad(set_to_none=True)
            loss_fn(work, batch_to(next(it), device)).backward()
            opt.step()
            steps += 1
    # Full-width pme tables that accumulate scores in their backward.
    full = {}
    for name in chosen:
        m = wt[name]
        if isinstance(m, (MultiSizeEmbeddingBag, MultiSizeEmbedding)):
            full[name] = m
            continue
        D = m.embedding_dim
        full[name] = D
    convert(work, {n: s for n, s in full.items() if isinstance(s, int)}, init="kept")
    wt = dict(work.named_modules())
    for name in chosen:
        _Scorer(rule if rule != "magnitude" else "snip").attach(wt[name])
    batches_done = 0
    if rule == "magnitude":
        for name in chosen:
            wt[name].scores.copy_(wt[name].weight.detach().abs())
    else:
        work.train()
        for p in work.parameters():
            p.grad = None
        for _ in tqdm(range(num_batches), desc=f"pme.search scoring ({rule})", leave=False, disable=not progress):
            loss = loss_fn(work, batch_to(next(it), device))
            loss.backward()
            batches_done += 1
        for p in work.parameters():
            p.grad = None
    scores = {}
    for name in chosen:
        m = wt[name]
        scores[name] = m.scores.reshape(m.num_embeddings, m.embedding_dim).detach().float()
    sizes, thr = sizes_for_budget(scores, budget, per_table, quantum, min_size)
    dense = sum(s.numel() for s in scores.values())
    kept = sum(int(s.sum()) for s in sizes.values())
    seconds = time.perf_counter() - t0
    stats = {n: {"rows": int(s.numel()), "mean_size": float(s.double().mean()), "min": int(s.min()),
                 "max": int(s.max())} for n, s in sizes.items()}
    return SearchResult({n: s.cpu() for n, s in sizes.items()}, {n: s.cpu() for n, s in scores.items()},
                        int(budget * dense), kept, dense, thr, seconds, rule, steps, batches_done, stats)


def batch_to(batch, device, non_blocking: bool = False):
    """``batch`` with every tensor moved to ``device`` (dicts, lists and tuples walked; other values
    kept); ``device=None`` returns it as it is. The one batch mover of pme (``pme.data`` uses it)."""
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
# Baselines at equal budget
# ---------------------------------------------------------------------------------------------
def _fit_total(make, target: int, lo: float, hi: float, iters: int = 60):
    """Bisection on a scalar knob so that ``make(knob)`` (sizes dict) totals <= target, as close as possible."""
    best = make(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = make(mid)
        if sum(int(v.sum()) for v in s.values()) <= target:
            best, lo = s, mid
        else:
            hi = mid
    return best


def uniform_sizes(shapes: dict, budget: float, quantum: int = 1, min_size: int = 0) -> dict:
    """The same size for every row of every table (``shapes``: ``{name: (V, D)}``): the largest
    multiple of ``quantum`` within the budget, clamped to ``[min_size, D]``."""
    rows = sum(V for V, _ in shapes.values())
    target = budget * sum(V * D for V, D in shapes.values())
    s = int(target // max(rows, 1)) // quantum * quantum
    return {n: torch.full((V,), min(max(s, min_size), D), dtype=torch.int64) for n, (V, D) in shapes.items()}


def popularity_sizes(counts: dict, dims: dict, budget: float, alpha: float = 0.3, quantum: int = 1,
                     min_size: int = 0) -> dict:
    """MDE's power rule per token: ``size ∝ count**alpha``, scaled to meet the budget.

    ``counts``: ``{name: [V] token frequencies}``; ``dims``: ``{name: D}``.
    """
    dense = sum(c.numel() * dims[n] for n, c in counts.items())
    target = int(budget * dense)
    base = {n: (c.double().clamp(min=0) + 1) ** alpha for n, c in counts.items()}
    top = max(float(b.max()) for b in base.values())
    return _fit_total(lambda lam: {n: _round_sizes((lam * b).round().long(), dims[n], quantum, min_size)
                                   for n, b in base.items()},
                      target, 0.0, 2.0 * max(dims.values()) / top * 1e3)


def random_sizes(shapes: dict, budget: float, quantum: int = 1, min_size: int = 0, seed: int = 0) -> dict:
    """Sizes drawn uniformly at random per row, then scaled to meet the budget."""
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.rand(V, generator=gen, dtype=torch.float64) for n, (V, D) in shapes.items()}
    dense = sum(V * D for V, D in shapes.values())
    return _fit_total(lambda lam: {n: _round_sizes((lam * b * shapes[n][1]).round().long(), shapes[n][1], quantum,
                                                   min_size) for n, b in base.items()},
                      int(budget * dense), 0.0, 1e6)
