"""The PME experiment shared by ``pme demo`` and ``benchmarks/quality.py``.

Train a CTR model with full-size tables, search sizes with PME, retrain with those sizes and
with the baselines at equal budget (uniform, popularity by MDE's power rule, random), and
report parameters, bytes, AUC, log loss, search and training time; plus Markdown, JSON and
PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from . import models
from .modules import MultiSizeEmbeddingBag, convert
from .search import (alignment_quantum, default_granularity, popularity_sizes, random_sizes, search,
                     uniform_sizes)

__all__ = ["ExperimentConfig", "run_experiment", "write_report", "METHODS", "grouped_classes"]

METHODS = ("pme", "pme_grouped", "uniform", "popularity", "random")


@dataclass
class ExperimentConfig:
    """Knobs of one experiment (defaults: the demo)."""

    model: str = "deepfm"  # "fm" or "deepfm"
    dim: int = 64
    budgets: tuple = (0.1, 0.2, 0.5)
    methods: tuple = METHODS
    seeds: tuple = (0,)
    epochs: int = 4
    batch_size: int = 2048
    lr: float = 1e-3
    search_batches: int = 4
    warmup_steps: int = 0
    rule: str = "snip"
    device: str = "cpu"
    progress: bool = True


def grouped_classes(D: int, quantum: int) -> list:
    """Size classes of the grouped layout: powers of two from the quantum up to D (and D)."""
    c, out = quantum, []
    while c < D:
        out.append(c)
        c *= 2
    return out + [D]


def _snap_down(sizes: torch.Tensor, classes: list) -> torch.Tensor:
    cls = torch.tensor(classes, dtype=torch.int64)
    idx = torch.searchsorted(cls, sizes, right=True) - 1
    return torch.where(idx >= 0, cls[idx.clamp(min=0)], torch.zeros_like(sizes))


def _grouped_sizes(found, budget, D, quantum):
    """PME sizes snapped down to the grouped layout's classes, with the per-size projections
    ([s, D] for each class s a table uses) counted in the budget. None if they alone exceed it."""
    classes = grouped_classes(D, quantum)
    dense = found.dense_entries
    proj = 0
    for _ in range(4):
        b = budget - proj / dense
        if b <= 0:
            return None
        try:  # every token keeps at least the smallest class (snapping down must not zero it)
            cut = found.for_budget(b, quantum=1, min_size=classes[0])
        except ValueError:
            return None
        sizes = {n: _snap_down(s, classes) for n, s in cut.sizes.items()}
        used = sum(sum(set(s.tolist()) - {0}) * D for s in sizes.values())
        if used <= proj:
            return sizes
        proj = used
    return sizes if sum(int(s.sum()) for s in sizes.values()) + proj <= budget * dense else None


def _embedding_stats(model) -> dict:
    params = nbytes = dense = 0
    for m in model.embeddings.values():
        if isinstance(m, MultiSizeEmbeddingBag):
            params += m.weight.numel() + (m.projection.numel() if m.projection is not None else 0)
            nbytes += m.nbytes()
        else:
            params += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
        dense += m.num_embeddings * m.embedding_dim
    return {"params": params, "bytes": nbytes, "dense_params": dense}


def _make_model(cfg, train, seed):
    torch.manual_seed(seed)
    cls = {"fm": models.FM, "deepfm": models.DeepFM}[cfg.model]
    return cls.from_dataset(train, embedding_dim=cfg.dim)


def _train_eval(cfg, model, train, val, test, seed):
    t0 = time.perf_counter()
    hist = models.train_model(model, train, val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              progress=cfg.progress, seed=seed, device=cfg.device)
    secs = time.perf_counter() - t0
    ev = models.evaluate(model, test, device=cfg.device)
    return {"auc": ev["auc"], "logloss": ev["logloss"], "val_auc": hist["val_auc"][-1], "train_seconds": secs}


def run_experiment(cfg: ExperimentConfig, train, val, test, log=print) -> list:
    """Runs every (seed, budget, method) and the full-size baseline; returns one dict per run."""
    rows = []
    total = len(cfg.seeds) * (1 + len(cfg.budgets) * len(cfg.methods))
    done = 0

    def note(msg):
        nonlocal done
        done += 1
        log(f"[{done}/{total}] {msg}")

    quantum = alignment_quantum(torch.float32)
    for seed in cfg.seeds:
        full = _make_model(cfg, train, seed)
        res = _train_eval(cfg, full, train, val, test, seed)
        rows.append({"seed": seed, "budget": 1.0, "method": "full", **_embedding_stats(full), **res,
                     "search_seconds": 0.0})
        note(f"seed {seed} full size: AUC {res['auc']:.4f} ({res['train_seconds']:.1f} s)")
        # One scoring pass serves every budget: only the threshold changes.
        fresh = _make_model(cfg, train, seed)
        gen = torch.Generator().manual_seed(seed)
        found = search(fresh, train.batches(cfg.batch_size, shuffle=True, generator=gen), budget=cfg.budgets[0],
                       rule=cfg.rule, num_batches=cfg.search_batches, warmup_steps=cfg.warmup_steps,
                       device=cfg.device, progress=cfg.progress)
        shapes = {n: (s.numel(), cfg.dim) for n, s in found.sizes.items()}
        counts = {f"embeddings.{f}": train.token_counts(f) for f in train.field_names}
        counts = {n: counts[n] for n in shapes}
        for budget in cfg.budgets:
            q, floor = default_granularity(budget, cfg.dim, quantum)
            pme_res = found.for_budget(budget, quantum=q, min_size=floor)
            sizes_of = {
                "pme": lambda: pme_res.sizes,
                "pme_grouped": lambda: _grouped_sizes(found, budget, cfg.dim, quantum),
                "uniform": lambda: uniform_sizes(shapes, budget, 1, 1),
                "popularity": lambda: popularity_sizes(counts, {n: cfg.dim for n in shapes}, budget,
                                                       quantum=q, min_size=floor),
                "random": lambda: random_sizes(shapes, budget, q, floor, seed=seed),
            }
            for method in cfg.methods:
                sizes = sizes_of[method]()
                if sizes is None:
                    note(f"seed {seed} budget {budget:.0%} {method}: not feasible (projections alone exceed it)")
                    continue
                model = _make_model(cfg, train, seed)
                kw = {}
                if method == "pme_grouped":
                    kw = {"layout": "grouped", "project": True}  # classes: the sizes present
                convert(model, sizes, init="fresh", **kw)
                res = _train_eval(cfg, model, train, val, test, seed)
                st = _embedding_stats(model)
                rows.append({"seed": seed, "budget": budget, "method": method, **st, **res,
                             "search_seconds": pme_res.seconds if method.startswith("pme") else 0.0,
                             "sizes": {n: s.tolist() for n, s in sizes.items()} if seed == cfg.seeds[0] else None})
                note(f"seed {seed} budget {budget:.0%} {method}: {st['params'] / st['dense_params']:.1%} of the "
                     f"dense parameters, AUC {res['auc']:.4f} ({res['train_seconds']:.1f} s)")
    return rows


def summarize(rows: list) -> list:
    """Mean and std over seeds per (budget, method)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1])
                                                                      if kv[0][1] in METHODS else -1)):
        def stat(key):
            v = torch.tensor([float(r[key]) for r in rs], dtype=torch.float64)
            return float(v.mean()), (float(v.std()) if v.numel() > 1 else 0.0)

        out.append({"budget": budget, "method": method, "seeds": len(rs),
                    "params": int(sum(r["params"] for r in rs) / len(rs)),
                    "param_fraction": sum(r["params"] / r["dense_params"] for r in rs) / len(rs),
                    "bytes": int(sum(r["bytes"] for r in rs) / len(rs)),
                    "auc": stat("auc"), "logloss": stat("logloss"),
                    "search_seconds": stat("search_seconds")[0], "train_seconds": stat("train_seconds")[0]})
    return out


def markdown_table(summary: list) -> str:
    """The results table in Markdown."""
    lines = ["| budget | method | emb. params | % of dense | bytes | test AUC | log loss | search s | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        auc, ll = s["auc"], s["logloss"]
        pm = lambda v: f"{v[0]:.4f}" + (f" ± {v[1]:.4f}" if s["seeds"] > 1 else "")
        b = "full" if s["budget"] == 1.0 else f"{s['budget']:.0%}"
        lines.append(f"| {b} | {s['method']} | {s['params']:,} | "
                     f"{100 * s['param_fraction']:.1f}% | {s['bytes']:,} | {pm(auc)} | {pm(ll)} | "
                     f"{s['search_seconds']:.2f} | {s['train_seconds']:.1f} |")
    return "\n".join(lines)


def write_report(out_dir: str, cfg: ExperimentConfig, rows: list, train, title: str = "pme demo",
                 extra_md: str = "") -> dict:
    """Writes results.json, report.md and the PNG plots to ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "summary": summary,
                   "runs": [{k: v for k, v in r.items() if k != "sizes"} for r in rows]}, f, indent=1)
    plots = _plots(out_dir, summary, rows, train, cfg)
    md = [f"# {title}", "", f"Model {cfg.model}, embedding width {cfg.dim}, {cfg.epochs} epochs, seeds "
          f"{list(cfg.seeds)}, score rule {cfg.rule}, {cfg.search_batches} scoring batches, "
          f"{cfg.warmup_steps} warm-up steps.", "", markdown_table(summary), ""]
    md += [f"![{p}]({p})" for p in plots]
    if extra_md:
        md += ["", extra_md]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return {"summary": summary, "plots": plots}


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
    full = [s for s in summary if s["method"] == "full"]
    for method in METHODS:
        pts = sorted((s["params"], s["auc"][0], s["auc"][1]) for s in summary if s["method"] == method)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=method,
                        capsize=3)
    if full:
        ax.axhline(full[0]["auc"][0], color="k", ls="--", lw=1, label="full size")
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters")
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
