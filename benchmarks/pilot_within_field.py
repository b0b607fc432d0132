"""Pilot that found why PME lost to uniform sizes on MovieLens-100K and chose the shrinkage by
token counts (run once, before the study; pilot seeds 100+, not the study's 0-9).

For one seed: train the full-size DeepFM (width 64, 4 epochs), score it (magnitude), then retrain
at each budget with sizes that take apart PME's two decisions, how much each field gets and how a
field's share is spread over its tokens:

- ``pme``: PME as it was (raw trained magnitudes under the global budget);
- ``pmefield_even``: each field's total from PME, spread evenly over its tokens;
- ``pmefield_pop``: each field's total from PME, spread by MDE's count^0.3 inside the field;
- ``pme_pertable``: every field gets the budget's share, spread by PME's scores inside it;
- ``shrink<k>``: PME's scores shrunk by token counts (``pme.search.shrink_scores``, strength k);
- ``uniform``, ``popularity``: the baselines.

Prints one line per run (AUC and its difference to full size) and writes
``<out>/pilot_within_field_<data>_<seed>.json``.

Run: python benchmarks/pilot_within_field.py movielens 100 [--budgets 0.2 0.05] [--shrink 0.25 1 4]
     [--parts] (--parts adds the field/within-field variants)
"""

import argparse
import json
import os

import torch

from pme.modules import convert
from pme.recsys import data
from pme.recsys.experiment import DEFAULT_VARIANTS, ExperimentConfig, _make_model, _train_eval, run_search
from pme.search import popularity_sizes, shrink_scores, sizes_at_budget, token_counts, uniform_sizes


def spread(totals: dict, shapes: dict, counts=None) -> dict:
    """Each table's total entries spread over its rows: evenly, or by count^0.3 with ``counts``."""
    out = {}
    for n, (V, D) in shapes.items():
        b = min(1.0, totals[n] / (V * D))
        if counts is None:
            out.update(uniform_sizes({n: (V, D)}, b, 1, 1))
        else:
            out.update(popularity_sizes({n: counts[n]}, {n: D}, b, quantum=1, min_size=1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", choices=["movielens", "adult"])
    p.add_argument("seed", type=int)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.05])
    p.add_argument("--shrink", type=float, nargs="*", default=[0.25, 1.0, 4.0], help="strengths k to try")
    p.add_argument("--parts", action="store_true", help="add pmefield_even, pmefield_pop, pme_pertable")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = {"movielens": data.load_movielens_100k, "adult": data.load_adult}[a.data]()
    train, val, test = ds.split(seed=a.seed)
    cfg = ExperimentConfig(budgets=tuple(a.budgets), seeds=(a.seed,), progress=False, methods=("pme",))
    full = _make_model(cfg, train, a.seed)
    res = _train_eval(cfg, full, train, val, test, a.seed)
    out = {"full": res["auc"]}
    found, _ = run_search(cfg, DEFAULT_VARIANTS["pme_raw"], full, train, val, a.seed)
    counts = token_counts(full, train)
    shapes = {n: tuple(s.shape) for n, s in found.scores.items()}
    shrunk = {k: shrink_scores(found.scores, counts, k) for k in a.shrink}
    for b in a.budgets:
        sizes = {"pme": sizes_at_budget("pme", b, result=found)}
        if a.parts:
            totals = {n: int(s.sum()) for n, s in sizes["pme"].items()}
            sizes["pmefield_even"] = spread(totals, shapes)
            sizes["pmefield_pop"] = spread(totals, shapes, counts)
            sizes["pme_pertable"] = found.for_budget(b, per_table=True, quantum=1, min_size=1).sizes
        for k, sc in shrunk.items():
            r = type(found)({}, sc, 0, 0, found.dense_entries, 0.0, 0.0, found.rule)
            sizes[f"shrink{k:g}"] = sizes_at_budget("pme", b, result=r)
        sizes["uniform"] = sizes_at_budget("uniform", b, model=full)
        sizes["popularity"] = sizes_at_budget("popularity", b, model=full, data=train)
        for m, sz in sizes.items():
            model = _make_model(cfg, train, a.seed)  # the full model's initial values
            convert(model, sz, init="kept")
            r = _train_eval(cfg, model, train, val, test, a.seed)
            out[f"{b}:{m}"] = r["auc"]
            mean = " ".join(f"{n.rpartition('.')[2]}:{float(s.double().mean()):.1f}" for n, s in sz.items())
            print(
                f"{a.data} {a.seed} {b} {m} {r['auc']:.4f} {r['auc'] - res['auc']:+.4f}  mean sizes {mean}", flush=True
            )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pilot_within_field_{a.data}_{a.seed}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
