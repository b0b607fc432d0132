"""The ``pme`` command line: ``info``, ``demo``, ``search``, ``bench`` (``pme.bench``, options passed through)."""

from __future__ import annotations

import argparse
import json
import time


def _info(args):
    import pme

    i = pme.info()
    if args.json:
        print(json.dumps(i, indent=1))
    else:
        width = max(map(len, i))
        for k, v in i.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _load_movielens(seed):
    from .recsys import data

    ds = data.load_movielens_100k()
    return ds.split(seed=seed)


def _demo(args):
    import torch

    from .recsys.experiment import ExperimentConfig, markdown_table, run_experiment, write_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = {
        "pme": {
            "mode": args.mode,
            "rule": args.rule,
            "normalize": args.normalize,
            "num_batches": args.search_batches,
            "shrink": args.shrink or None,
        },
        "pme_cheap": {
            "mode": "warmup",
            "rule": args.rule if args.rule != "saliency" else "magnitude",
            "normalize": args.normalize,
            "warmup_share": args.warmup_share,
        },
    }
    cfg = ExperimentConfig(
        model=args.model,
        dim=args.dim,
        budgets=tuple(args.budgets),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        device=device,
        search_batches=args.search_batches,
        variants=variants,
    )
    cfg.methods = ("pme", "pme_cheap", "uniform", "popularity", "random")  # grouped: see benchmarks/quality.py
    if args.fast:
        cfg.budgets, cfg.epochs, cfg.methods = (0.2,), 1, ("pme", "uniform")
    print(
        f"pme demo: MovieLens-100K, {cfg.model}, width {cfg.dim}, budgets {list(cfg.budgets)}, "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    train, val, test = _load_movielens(cfg.seeds[0])
    print(f"data: {len(train):,} train / {len(val):,} validation / {len(test):,} test rows, fields {train.field_names}")
    rows = run_experiment(cfg, train, val, test)
    out = write_report(args.out, cfg, rows, train, title="pme demo: MovieLens-100K", seconds=time.perf_counter() - t0)
    print()
    print(markdown_table(out["summary"]))
    print(
        f"\nwrote {args.out}/report.md, results.json and {len(out['plots'])} plots in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def _search(args):
    from .recsys.experiment import ExperimentConfig, run_search

    train, val, _ = _load_movielens(args.seed)
    variant = {"mode": "warmup", "rule": args.rule, "normalize": args.normalize, "num_batches": args.batches}
    variant.update(per_table=args.per_table, warmup_epochs=1, shrink=args.shrink or None)  # warm-up: one epoch
    if args.warmup_steps is not None:
        variant["warmup_steps"] = args.warmup_steps
    cfg = ExperimentConfig(model=args.model, dim=args.dim, budgets=(args.budget,), methods=("pme",))
    r, _ = run_search(cfg, variant, None, train, val, args.seed)
    print(r)
    for name, s in r.sizes.items():
        print(
            f"  {name:<24} rows {s.numel():>6}  mean size {s.double().mean():6.1f}  min {int(s.min()):3d}  "
            f"max {int(s.max()):3d}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "budget": args.budget,
                    "rule": r.rule,
                    "kept": r.kept_entries,
                    "dense": r.dense_entries,
                    "seconds": r.seconds,
                    "sizes": {n: s.tolist() for n, s in r.sizes.items()},
                },
                f,
            )
        print(f"wrote {args.out}")
    return 0


def _bench(args):
    from . import bench

    bench.main(args.rest)
    return 0


RULES = ("magnitude", "movement", "taylor", "saliency", "snip", "grad")  # pme.search.RULES, without importing torch


def _add_shrink(q):
    q.add_argument(
        "--shrink",
        type=float,
        default=1.0,
        help="shrink rows toward their table's average by their tokens' training counts: a row seen n times keeps "
        "the weight n / (n + SHRINK * D) on its own scores (default 1.0; 0 turns it off)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pme",
        description=(
            "pme: multi-size embedding tables for PyTorch (flat storage, fused CPU/CUDA kernels) and the PME size "
            "search (pruning-based multi-size embedding, our reconstruction)."
        ),
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("info", help="version, flavour, CUDA/archs of the binary, torch, live backend")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_info)

    q = sub.add_parser(
        "demo",
        help="the end-to-end PME run on MovieLens-100K (a few minutes on 2 CPU cores)",
        description=(
            "Train a full-size model, search sizes with PME, retrain at several budgets next to the "
            "uniform, popularity (MDE power rule) and random baselines, and write a Markdown report, "
            "JSON and PNG plots. Needs the MovieLens-100K files of the recbole wheel "
            "(pip install --no-deps recbole)."
        ),
    )
    q.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    q.add_argument("--model", choices=["fm", "deepfm"], default="deepfm")
    q.add_argument("--dim", type=int, default=64, help="embedding width D (default 64)")
    q.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.1, 0.2, 0.5],
        help="fractions of the dense embedding parameters to keep (default 0.1 0.2 0.5)",
    )
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q.add_argument("--epochs", type=int, default=4)
    q.add_argument(
        "--rule",
        choices=list(RULES),
        default="magnitude",
        help="entry score (default magnitude |w|; see pme.search.search)",
    )
    q.add_argument(
        "--normalize", choices=["none", "field"], default="none", help="per-field score normalisation (default none)"
    )
    q.add_argument(
        "--mode",
        choices=["trained", "warmup", "init"],
        default="trained",
        help="score the trained full-size model (default), a warmed-up copy, or the initial one",
    )
    q.add_argument(
        "--warmup-share",
        type=float,
        default=0.08,
        help="pme_cheap's warm-up as a share of one training run (default 0.08)",
    )
    _add_shrink(q)
    q.add_argument("--search-batches", type=int, default=4, help="scoring mini-batches of taylor/snip/grad (default 4)")
    q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    q.add_argument("--fast", action="store_true", help="one budget, one epoch, two methods (a smoke test)")
    q.set_defaults(func=_demo)

    q = sub.add_parser("search", help="PME search on MovieLens-100K: print (and save) the sizes per table")
    q.add_argument("--budget", type=float, default=0.2, help="fraction of dense entries to keep (0, 1]")
    q.add_argument("--model", choices=["fm", "deepfm"], default="deepfm")
    q.add_argument("--dim", type=int, default=64)
    q.add_argument("--rule", choices=list(RULES), default="magnitude", help="entry score (default magnitude)")
    q.add_argument("--normalize", choices=["none", "field"], default="none")
    q.add_argument("--batches", type=int, default=8, help="scoring batches of taylor/snip/grad")
    q.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="Adam steps on the copy before scoring (default: one epoch; scores need a trained model)",
    )
    _add_shrink(q)
    q.add_argument("--per-table", action="store_true", help="apply the budget to each table")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="JSON file for the sizes")
    q.set_defaults(func=_search)

    q = sub.add_parser(
        "bench",
        add_help=False,
        help="lookup and fused-update microbenchmark (pme.bench); `pme bench --help` for its options",
    )
    q.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.cmd == "bench":
        args.rest = rest  # every option is the benchmark's (pme.bench.parse_args)
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)
