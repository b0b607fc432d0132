"""The PME experiment shared by ``pme demo`` and ``benchmarks/quality.py``.

Train a CTR model with full-size tables, search sizes with PME, retrain with those sizes and
with the baselines at equal budget (uniform, popularity by MDE's power rule, random), and
report parameters, bytes, AUC, log loss, search and training time; plus Markdown, JSON and
PNG plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from ..modules import MultiSizeEmbeddingBag, convert
from ..search import (
    TrainingScores,
    convert_grouped,
    from_scores,
    grouped_classes,
    search,
    sizes_at_budget,
    token_counts,
)
from . import models

__all__ = [
    "ExperimentConfig",
    "run_experiment",
    "run_search",
    "write_report",
    "METHODS",
    "grouped_classes",
    "DEFAULT_VARIANTS",
    "paired_differences",
    "plot_auc_curves",
]

BASELINES = ("uniform", "popularity", "random")
METHODS = (
    "pme",
    "pme_raw",
    "pme_cheap",
    "pme_taylor",
    "pme_grouped",
    "pme_rewound",
    "uniform",
    "popularity",
    "random",
)

# The PME variants the experiment knows. ``mode="trained"``: score the full-size model trained for
# the "full" baseline (search cost: that training run, which a full-size baseline needs anyway,
# plus seconds); ``mode="warmup"``: score a fresh model after ``warmup_epochs`` epochs of Adam
# inside the search (the cheap mode); ``mode="init"``: score at initialisation (the old way).
# The default (magnitude, no per-field normalisation) won the pilot on both data sets
# (benchmarks/pilot_modes.py; results/quality/pilot_*.log); with ``shrink`` the rows' scores are
# shrunk toward their table's profile by the tokens' training counts (search.shrink_scores; the
# within-field pilot, results/quality/pilot_within_field/); ``pme_raw`` is the default before that.
# The cheap mode warms up for 8% of one training run so that its whole search stays within 10% of one.
# ``mode="accumulated"``: |w * g| summed during the last ``score_share`` of the full-size run itself
# (search.TrainingScores; the hooks only read, so that run and its AUC are unchanged).
DEFAULT_VARIANTS = {
    "pme": {"mode": "trained", "rule": "magnitude", "normalize": "none", "shrink": 1.0},
    "pme_raw": {"mode": "trained", "rule": "magnitude", "normalize": "none"},
    "pme_cheap": {"mode": "warmup", "rule": "magnitude", "normalize": "none", "warmup_share": 0.08},
    "pme_taylor": {"mode": "accumulated", "rule": "taylor", "normalize": "none", "shrink": 1.0, "score_share": 0.25},
}


@dataclass
class ExperimentConfig:
    """Knobs of one experiment (defaults: the demo).

    ``methods`` names PME variants (keys of ``variants``; ``pme_grouped`` and ``pme_rewound`` reuse
    the ``pme`` variant's scores) and baselines (``uniform``, ``popularity``, ``random``).
    """

    model: str = "deepfm"  # "fm" or "deepfm"
    dim: int = 64
    budgets: tuple = (0.1, 0.2, 0.5)
    methods: tuple = ("pme", "pme_cheap", "pme_grouped", "uniform", "popularity", "random")
    seeds: tuple = (0,)
    epochs: int = 4
    batch_size: int = 2048
    lr: float = 1e-3
    search_batches: int = 4
    # "kept": every method's tables start from the full-size model's initial values, each row
    # keeping its first entries, so the methods of a seed differ only in their sizes (a fresh
    # draw per method adds about 0.001 AUC of noise to every paired difference on MovieLens-100K);
    # "fresh": new values with the same standard deviation.
    init: str = "kept"
    variants: dict = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.variants is None:
            self.variants = {k: dict(v) for k, v in DEFAULT_VARIANTS.items()}
        for m in self.methods:
            if m not in self.variants and m not in BASELINES and m not in ("pme_grouped", "pme_rewound"):
                raise ValueError(
                    f"unknown method {m!r}: not a baseline {BASELINES} nor a variant {list(self.variants)}"
                )
        if self.init not in ("kept", "fresh"):
            raise ValueError(f"init must be 'kept' or 'fresh', got {self.init!r}")


def _embedding_stats(model) -> dict:
    params = nbytes = dense = 0
    seen = set()  # a projection shared by several tables counts once
    for m in model.embeddings.values():
        if isinstance(m, MultiSizeEmbeddingBag):
            params += m.weight.numel()
            nbytes += m.nbytes()
            if m.projection is not None:
                if id(m.projection) in seen:
                    nbytes -= m.projection.numel() * m.projection.element_size()
                else:
                    params += m.projection.numel()
                    seen.add(id(m.projection))
        else:
            params += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
        dense += m.num_embeddings * m.embedding_dim
    return {"params": params, "bytes": nbytes, "dense_params": dense}


def _make_model(cfg, train, seed):
    torch.manual_seed(seed)
    cls = {"fm": models.FM, "deepfm": models.DeepFM}[cfg.model]
    return cls.from_dataset(train, embedding_dim=cfg.dim)


def _fit(cfg, model, train, val, seed):
    """Trains ``model`` on ``train`` as every run of the study is trained (``cfg``'s epochs, batch,
    learning rate, device); returns the training history."""
    return models.train_model(
        model,
        train,
        val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        progress=cfg.progress,
        seed=seed,
        device=cfg.device,
    )


def train_full_model(cfg, train, val, seed):
    """The full-size model of ``cfg`` with ``seed``'s initial values, trained as the study trains
    it (what the default search mode scores; ``pme search`` uses it)."""
    model = _make_model(cfg, train, seed)
    _fit(cfg, model, train, val, seed)
    return model


def _train_eval(cfg, model, train, val, test, seed):
    t0 = time.perf_counter()
    hist = _fit(cfg, model, train, val, seed)
    secs = time.perf_counter() - t0
    ev = models.evaluate(model, test, device=cfg.device)
    return {"auc": ev["auc"], "logloss": ev["logloss"], "val_auc": hist["val_auc"][-1], "train_seconds": secs}


def run_search(cfg, variant, full_model, train, val, seed, full_seconds=0.0, scores=None):
    """One PME search of ``variant`` (a dict: ``mode``, ``rule``, ``normalize``, ``num_batches``,
    ``warmup_epochs`` / ``warmup_share`` / ``warmup_steps``, ``per_table``, ``shrink``: the
    strength of the shrinkage by the tokens' counts in ``train``, none when absent) on the ``train`` split,
    at ``max(cfg.budgets)``; returns (SearchResult, cost in seconds). ``full_model`` (the trained
    full-size model, ``full_seconds`` its training time) is what ``mode="trained"`` scores; the
    other modes score a fresh model of ``cfg`` (warmed up by the search); ``mode="accumulated"`` cuts
    ``scores`` (what ``TrainingScores`` summed during the full-size run)."""
    mode = variant.get("mode", "trained")
    if mode == "accumulated":
        if scores is None:
            raise ValueError("mode='accumulated' needs the scores summed during the full-size run (scores=)")
        counts = token_counts(full_model, train) if variant.get("shrink") is not None else None
        found = from_scores(
            scores,
            max(cfg.budgets),
            counts=counts,
            shrink=float(variant.get("shrink") or 0.0),
            normalize=variant.get("normalize", "none"),
            per_table=variant.get("per_table", False),
            rule=variant.get("rule", "taylor"),
        )
        return found, full_seconds + found.seconds
    gen = torch.Generator().manual_seed(seed)
    loader = train.batches(cfg.batch_size, shuffle=True, generator=gen)
    kw = dict(
        rule=variant.get("rule", "magnitude"),
        normalize=variant.get("normalize", "none"),
        num_batches=variant.get("num_batches", cfg.search_batches),
        device=cfg.device,
        progress=cfg.progress,
        budget=max(cfg.budgets),
        per_table=variant.get("per_table", False),
    )
    if kw["rule"] == "saliency":
        kw["held_out"] = list(val.batches(8192))
    model = full_model if mode == "trained" else _make_model(cfg, train, seed)
    if variant.get("shrink") is not None:
        kw["counts"] = token_counts(model, train)
        kw["shrink"] = float(variant["shrink"])
    if mode == "trained":
        found = search(model, loader, warmup_steps=0, **kw)
        return found, full_seconds + found.seconds
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    epochs = variant["warmup_epochs"] if "warmup_epochs" in variant else variant.get("warmup_share", 0.08) * cfg.epochs
    warm = 0 if mode == "init" else variant.get("warmup_steps", max(1, round(epochs * steps_per_epoch)))
    found = search(model, loader, warmup_steps=warm, warmup_lr=cfg.lr, **kw)
    return found, found.seconds


def run_experiment(cfg: ExperimentConfig, train, val, test, log=print) -> list:
    """Runs every (seed, budget, method) and the full-size baseline; returns one dict per run.

    Each row: seed, budget, method, emb. params/bytes, test AUC and log loss, training seconds,
    ``search_seconds`` (the search's cost; for ``mode="trained"`` it includes the full-size
    training run it scores) and ``search_share`` (that cost / this seed's full-size training
    time). Infeasible runs (grouped layout whose projections exceed the budget) are rows with
    ``"infeasible"`` set and no AUC.
    """
    rows = []
    total = len(cfg.seeds) * (1 + len(cfg.budgets) * len(cfg.methods))
    done = 0

    def note(msg):
        nonlocal done
        done += 1
        log(f"[{done}/{total}] {msg}")

    accumulated = [m for m in cfg.methods if cfg.variants.get(m, {}).get("mode") == "accumulated"]
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    for seed in cfg.seeds:
        full = _make_model(cfg, train, seed)
        with contextlib.ExitStack() as hooks:  # |w * g| over the last part of the full-size run (read only)
            scorers = {}
            for m in accumulated:
                v = cfg.variants[m]
                start = round((1 - v.get("score_share", 0.25)) * cfg.epochs * steps_per_epoch)
                scorers[m] = hooks.enter_context(TrainingScores(full, rule=v.get("rule", "taylor"), start_step=start))
            res = _train_eval(cfg, full, train, val, test, seed)
            summed = {m: sc.scores() for m, sc in scorers.items()}
        rows.append(
            {
                "seed": seed,
                "budget": 1.0,
                "method": "full",
                **_embedding_stats(full),
                **res,
                "search_seconds": 0.0,
                "search_share": 0.0,
            }
        )
        note(f"seed {seed} full size: AUC {res['auc']:.4f} ({res['train_seconds']:.1f} s)")
        full_secs = res["train_seconds"]
        # One search per variant serves every budget: only the threshold changes.
        found = {}
        for v in [m for m in cfg.methods if m in cfg.variants] + (
            ["pme"] if any(m in cfg.methods for m in ("pme_grouped", "pme_rewound")) else []
        ):
            if v not in found:
                found[v] = run_search(cfg, cfg.variants[v], full, train, val, seed, full_secs, summed.get(v))
        for budget in cfg.budgets:
            for method in cfg.methods:
                base = "pme" if method in ("pme_grouped", "pme_rewound") else method
                why = "no set of size classes fits the budget with its shared projections"
                try:
                    if base in found:
                        r, cost = found[base]
                        kind = {"pme_grouped": "grouped"}.get(method, "pme")
                        sizes = sizes_at_budget(kind, budget, result=r)
                    else:
                        cost = 0.0
                        sizes = sizes_at_budget(method, budget, model=full, data=train, seed=seed)
                except ValueError as e:  # a floor of one entry a row exceeds the budget
                    sizes, why = None, str(e)
                if sizes is None:
                    rows.append({"seed": seed, "budget": budget, "method": method, "infeasible": why})
                    note(f"seed {seed} budget {budget:.0%} {method}: not feasible ({why})")
                    continue
                model = _make_model(cfg, train, seed)  # same seed: the same initial values as `full` had
                if method == "pme_grouped":
                    convert_grouped(model, sizes)
                elif method == "pme_rewound":
                    convert(model, sizes, init="kept", scores=found["pme"][0].scores)
                else:
                    convert(model, sizes, init=cfg.init)
                res = _train_eval(cfg, model, train, val, test, seed)
                st = _embedding_stats(model)
                rows.append(
                    {
                        "seed": seed,
                        "budget": budget,
                        "method": method,
                        **st,
                        **res,
                        "search_seconds": cost,
                        "search_share": cost / max(full_secs, 1e-9),
                        "sizes": {n: s.tolist() for n, s in sizes.items()} if seed == cfg.seeds[0] else None,
                    }
                )
                note(
                    f"seed {seed} budget {budget:.0%} {method}: {st['params'] / st['dense_params']:.1%} of the "
                    f"dense parameters, AUC {res['auc']:.4f} ({res['train_seconds']:.1f} s)"
                )
    return rows


def paired_differences(rows: list, method: str = "pme", against=BASELINES + ("full",), key: str = "auc") -> list:
    """Per budget and baseline, the per-seed differences ``key(method) - key(baseline)`` on the
    same seed (same split, same initial values): mean, std, wins and seeds. ``key="auc"``: wins
    are diff > 0; ``key="logloss"`` (lower is better): wins are diff < 0."""
    sign = -1.0 if key == "logloss" else 1.0
    auc = {(r["seed"], r["budget"], r["method"]): r[key] for r in rows if key in r}
    out = []
    for budget in sorted({r["budget"] for r in rows if r["budget"] < 1.0}, reverse=True):
        for b in against:
            d = [
                auc[(s, budget, method)] - auc[(s, 1.0 if b == "full" else budget, b)]
                for s in sorted({r["seed"] for r in rows})
                if (s, budget, method) in auc and (s, 1.0 if b == "full" else budget, b) in auc
            ]
            if not d:
                continue
            t = torch.tensor(d, dtype=torch.float64)
            out.append(
                {
                    "budget": budget,
                    "method": method,
                    "against": b,
                    "key": key,
                    "mean": float(t.mean()),
                    "std": float(t.std()) if t.numel() > 1 else 0.0,
                    "wins": int((sign * t > 0).sum()),
                    "seeds": len(d),
                }
            )
    return out


def summarize(rows: list) -> list:
    """Mean and std over seeds per (budget, method)."""
    groups = {}
    for r in rows:
        if "auc" not in r:  # infeasible
            continue
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in sorted(
        groups.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]) if kv[0][1] in METHODS else -1)
    ):

        def stat(key, rs=rs):
            v = torch.tensor([float(r[key]) for r in rs], dtype=torch.float64)
            return float(v.mean()), (float(v.std()) if v.numel() > 1 else 0.0)

        out.append(
            {
                "budget": budget,
                "method": method,
                "seeds": len(rs),
                "params": int(sum(r["params"] for r in rs) / len(rs)),
                "param_fraction": sum(r["params"] / r["dense_params"] for r in rs) / len(rs),
                "bytes": int(sum(r["bytes"] for r in rs) / len(rs)),
                "auc": stat("auc"),
                "logloss": stat("logloss"),
                "search_seconds": stat("search_seconds")[0],
                "train_seconds": stat("train_seconds")[0],
            }
        )
    return out


def markdown_table(summary: list) -> str:
    """The results table in Markdown."""
    lines = [
        "| budget | method | emb. params | % of dense | bytes | test AUC | log loss | search s | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        auc, ll = s["auc"], s["logloss"]

        def pm(v, s=s):
            return f"{v[0]:.4f}" + (f" ± {v[1]:.4f}" if s["seeds"] > 1 else "")

        b = "full" if s["budget"] == 1.0 else f"{s['budget']:.0%}"
        lines.append(
            f"| {b} | {s['method']} | {s['params']:,} | "
            f"{100 * s['param_fraction']:.1f}% | {s['bytes']:,} | {pm(auc)} | {pm(ll)} | "
            f"{s['search_seconds']:.2f} | {s['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


_EXPLAIN = {
    "full": "every table at full width D (the reference)",
    "pme": "PME, default: sizes from the magnitudes |w| of the trained full-size model, each row's scores "
    "shrunk toward its table's average the fewer times its token occurs in the training data, then the model "
    "retrained with them from its initial values (search cost: that full-size training run plus seconds)",
    "pme_raw": "PME as `pme` without the shrinkage by token counts (the default before it)",
    "pme_cheap": "PME, cheap mode: the same scores after a short warm-up inside the search instead of a full "
    "training run",
    "pme_taylor": "PME with |w * g| summed over the last quarter of the full-size training run (while it trains), "
    "shrunk by token counts as `pme`",
    "pme_grouped": "PME's sizes snapped to power-of-two classes, grouped layout with one learned projection per "
    "class shared by all tables of the same width (counted in the budget)",
    "pme_rewound": "PME's sizes, retrained from the full-size model's initial values of the surviving entries",
    "uniform": "the same size for every token (two adjacent sizes mixed to meet the budget exactly)",
    "popularity": "MDE's power rule: size proportional to count^0.3",
    "random": "sizes drawn at random, scaled to the budget",
}


def explain(cfg: ExperimentConfig, rows: list, seconds: float | None = None) -> str:
    """The report's prose: what was compared, the result in words, the seed noise, infeasible runs."""
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    md = [
        "## What was compared",
        "",
        f"A {cfg.model} CTR model with embedding width {cfg.dim}, trained {cfg.epochs} "
        f"epoch{'s' * (cfg.epochs != 1)} with Adam (lr "
        f"{cfg.lr}, batch {cfg.batch_size}) on the training split, scored by test AUC (higher is better) and log "
        f"loss. At each budget (a share of the full-width embedding parameters) every method below got the same "
        f"number of embedding parameters and was retrained from the same initial values (seed "
        f"{', '.join(map(str, seeds))}):",
        "",
    ]
    md += [f"- `{m}`: {_EXPLAIN.get(m, m)}" for m in ("full",) + tuple(cfg.methods)]
    md += ["", "## Result in words", ""]
    full = next((s for s in summary if s["method"] == "full"), None)
    for b in sorted({s["budget"] for s in summary if s["budget"] < 1.0}, reverse=True):
        at = {s["method"]: s for s in summary if s["budget"] == b}
        best = max(at, key=lambda m: at[m]["auc"][0])
        line = f"- {b:.0%}: best `{best}` ({at[best]['auc'][0]:.4f})"
        if "pme" in at:
            diffs = [
                f"{at['pme']['auc'][0] - at[m]['auc'][0]:+.4f} vs {m}"
                for m in ("uniform", "popularity", "random")
                if m in at
            ]
            line += f"; `pme` {at['pme']['auc'][0]:.4f}" + (f" ({', '.join(diffs)})" if diffs else "")
            if full:
                line += f", {at['pme']['auc'][0] - full['auc'][0]:+.4f} vs full size"
        md.append(line + ".")
    md += ["", "## How large is the noise", ""]
    if full and len(seeds) > 1:
        md.append(
            f"Over {len(seeds)} seeds the full-size model's test AUC varies by ± {full['auc'][1]:.4f} (std); "
            "differences between methods smaller than that are not evidence unless they hold seed by seed "
            "(the quality study, `benchmarks/quality.py`, reports paired per-seed differences)."
        )
    else:
        md.append(
            "One seed: the spread between seeds cannot be measured here. On MovieLens-100K it is about "
            "± 0.004 AUC for the full-size DeepFM at width 64 after 4 epochs (the quality study, "
            "`benchmarks/results/quality/report.md`, 10 seeds), larger than most differences between "
            "methods in a single run, so read a one-seed "
            "ranking as anecdote; the study's paired per-seed differences are the evidence. To measure "
            "it on this data, run several seeds (`pme demo --seeds 0 1 2 3 4`, or `benchmarks/quality.py`)."
        )
    bad = sorted({(r["budget"], r["method"], r["infeasible"]) for r in rows if "infeasible" in r})
    md += ["", "## Infeasible runs", ""]
    md += [f"- `{m}` at {b:.0%}: {why}" for b, m, why in bad] if bad else ["None: every method fit every budget."]
    if seconds is not None:
        import torch

        md += ["", f"Wall time: {seconds:.0f} s ({torch.get_num_threads()} torch threads)."]
    return "\n".join(md)


def write_report(
    out_dir: str,
    cfg: ExperimentConfig,
    rows: list,
    train,
    title: str = "pme demo",
    extra_md: str = "",
    seconds: float | None = None,
) -> dict:
    """Writes results.json, report.md (with prose that explains it: ``explain``) and the PNG plots
    to ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(
            {
                "config": asdict(cfg),
                "summary": summary,
                "seconds": seconds,
                "runs": [{k: v for k, v in r.items() if k != "sizes"} for r in rows],
            },
            f,
            indent=1,
        )
    plots = _plots(out_dir, summary, rows, train, cfg)
    md = [
        f"# {title}",
        "",
        explain(cfg, rows, seconds),
        "",
        "## Table",
        "",
        "Means over seeds (± std when there are several); `emb. params` counts the flat buffers plus shared "
        "projections; `search s` is the search's own time (for `pme` add the full-size training it scores).",
        "",
        markdown_table(summary),
        "",
        f"PME variants: `{cfg.variants}`.",
        "",
    ]
    md += [f"![{p}]({p})" for p in plots]
    if extra_md:
        md += ["", extra_md]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return {"summary": summary, "plots": plots}


def plot_auc_curves(ax, summary: list, methods, x_of, full_label) -> dict | None:
    """Draws test AUC (mean ± std over seeds) against ``x_of(summary row)`` for each of
    ``methods``, the full-size AUC as a dashed line labelled ``full_label(full row)`` and, with
    several seeds, its ± 1 std band (the seed noise). Returns the full-size summary row (None if
    the summary has none)."""
    for method in methods:
        pts = sorted((x_of(s), s["auc"][0], s["auc"][1]) for s in summary if s["method"] == method)
        if pts:
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=method, capsize=3
            )
    full = next((s for s in summary if s["method"] == "full"), None)
    if full is not None:
        ax.axhline(full["auc"][0], color="k", ls="--", lw=1, label=full_label(full))
        if full["seeds"] > 1:
            lo, hi = full["auc"][0] - full["auc"][1], full["auc"][0] + full["auc"][1]
            ax.axhspan(lo, hi, color="k", alpha=0.08, label="full ± 1 std over seeds (seed noise)")
    return full


def _plots(out_dir, summary, rows, train, cfg) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    # AUC vs parameters, one line per method
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    f0 = plot_auc_curves(
        ax,
        summary,
        METHODS,
        lambda s: s["params"],
        lambda f: f"full width (D={cfg.dim}, {f['params']:,} params)",
    )
    if f0 is not None:
        for b in sorted({s["budget"] for s in summary if s["budget"] < 1}):
            ax.axvline(b * f0["params"], color="grey", lw=0.5, ls=":")
            ax.text(b * f0["params"], ax.get_ylim()[0], f" {b:.0%}", fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (dotted: the budgets, as shares of full width)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"{cfg.model}: AUC vs embedding parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "auc_vs_params.png"), dpi=120)
    plt.close(fig)
    files.append("auc_vs_params.png")
    # size distribution per field and size vs frequency, for PME at the middle budget
    pme_rows = [r for r in rows if r["method"] == "pme" and r.get("sizes")]
    if pme_rows:
        mid = sorted({r["budget"] for r in pme_rows})[len({r["budget"] for r in pme_rows}) // 2]
        r = next(r for r in pme_rows if r["budget"] == mid)
        names = list(r["sizes"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.boxplot([r["sizes"][n] for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), [n.split(".")[-1] for n in names], rotation=30)
        ax.set_ylabel("size (entries)")
        ax.set_title(f"PME sizes per field at {mid:.0%} of the dense parameters")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sizes_per_field.png"), dpi=120)
        plt.close(fig)
        files.append("sizes_per_field.png")
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for n in names:
            f = n.split(".")[-1]
            cnt = train.token_counts(f).double()
            s = torch.tensor(r["sizes"][n], dtype=torch.float64)
            ax.scatter((cnt + 1).numpy(), s.numpy(), s=6, alpha=0.5, label=f)
        ax.set_xscale("log")
        ax.set_xlabel("token frequency in the training split (+1)")
        ax.set_ylabel("PME size")
        ax.set_title("size vs token frequency")
        ax.legend(fontsize=7, markerscale=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "size_vs_frequency.png"), dpi=120)
        plt.close(fig)
        files.append("size_vs_frequency.png")
    return files
