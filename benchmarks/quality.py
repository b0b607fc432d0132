"""The PME quality study (longer than the demo).

1. MovieLens-100K, FM and DeepFM, width 64, budgets 5/10/20/50% of the dense embedding
   parameters, 5 seeds: PME (padded; grouped + per-size projection) vs uniform, popularity
   (MDE power rule) and random sizes at equal budget, and the full-size model. Mean and std.
2. Synthetic data with planted sizes (pme.data.make_planted): Spearman rank correlation between
   the sizes the search finds and the true ones, next to the popularity rule's.

Writes benchmarks/results/quality/{results_<model>.json, report.md, *.png}.
Run:  python benchmarks/quality.py [--seeds 0 1 2 3 4] [--models fm deepfm] [--out DIR]
"""

import argparse
import json
import os
import time

import torch

from pme import data, models
from pme.experiment import ExperimentConfig, markdown_table, run_experiment, write_report
from pme.search import popularity_sizes, search


def spearman(a, b):
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def planted_study(seed=0, jitter=0.3, warmup_steps=200, budget=None):
    """Search on the planted teacher; rank correlation of found vs true sizes per field."""
    ds, true = data.make_planted(num_rows=100_000, vocab=200, dim=16, size_jitter=jitter, seed=seed)
    train, val, test = ds.split(seed=seed)
    torch.manual_seed(seed)
    model = models.FM.from_dataset(train, embedding_dim=16)
    frac = budget or float(sum(int(t.sum()) for t in true.values())) / sum(t.numel() * 16 for t in true.values())
    gen = torch.Generator().manual_seed(seed)
    r = search(model, list(train.batches(1024, shuffle=True, generator=gen)), budget=frac, num_batches=20,
               warmup_steps=warmup_steps, warmup_lr=1e-2, quantum=1, min_size=0, progress=False)
    counts = {f"embeddings.{f}": train.token_counts(f) for f in train.field_names}
    pop = popularity_sizes(counts, {n: 16 for n in counts}, frac)
    out = {}
    for f in train.field_names:
        n = f"embeddings.{f}"
        seen = counts[n] > 0
        out[f] = {"pme": spearman(r.sizes[n][seen], true[f][seen]),
                  "popularity": spearman(pop[n][seen].double() + 1e-6 * torch.rand(int(seen.sum())), true[f][seen])}
    return out, frac, r.seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--models", nargs="+", default=["deepfm", "fm"], choices=["fm", "deepfm"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quality"))
    args = p.parse_args()
    t0 = time.perf_counter()
    md = []
    for model in args.models:
        cfg = ExperimentConfig(model=model, budgets=tuple(args.budgets), seeds=tuple(args.seeds), epochs=args.epochs,
                               progress=False)
        rows = []
        for seed in args.seeds:  # each seed has its own split
            train, val, test = data.load_movielens_100k().split(seed=seed)
            cfg1 = ExperimentConfig(**{**cfg.__dict__, "seeds": (seed,)})
            rows += run_experiment(cfg1, train, val, test)
        sub = os.path.join(args.out, model)
        rep = write_report(sub, cfg, rows, train, title=f"PME quality study: MovieLens-100K, {model}")
        md += [f"## {model}", "", markdown_table(rep["summary"]), "", f"Plots: {model}/auc_vs_params.png", ""]
    planted = {}
    for seed in args.seeds[:3]:
        corr, frac, secs = planted_study(seed)
        planted[seed] = {"correlation": corr, "budget": frac, "search_seconds": secs}
    md += ["## Planted sizes (synthetic teacher)", "", "| seed | field | Spearman(PME, true) | Spearman(popularity, true) |",
           "| --- | --- | --- | --- |"]
    for seed, r in planted.items():
        for f, c in r["correlation"].items():
            md.append(f"| {seed} | {f} | {c['pme']:.3f} | {c['popularity']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "planted.json"), "w") as f:
        json.dump(planted, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("# PME quality study\n\n" + "\n".join(md) + f"\n\nTotal time {time.perf_counter() - t0:.0f} s.\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
