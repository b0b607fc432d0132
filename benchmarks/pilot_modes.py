"""Pilot that chose the default search mode (run once, before the study; small on purpose).

Both data sets (MovieLens-100K, census adult), DeepFM width 64, 2 epochs, seeds 100 and 101
(not the study's seeds 0-9), budgets 20% and 5%: PME variants (score rule x normalisation x
trained / cheap warm-up) against uniform and popularity. Writes
benchmarks/results/quality/pilot_<data><tag>.json. Run: python benchmarks/pilot_modes.py [--data ml|adult]
[--seeds ...] [--epochs 2] [--budgets 0.2 0.05] [--variants ...] [--tag _name]
"""

import argparse
import json
import os
import time

import torch

from pme.recsys import data
from pme.recsys.experiment import ExperimentConfig, paired_differences, run_experiment

VARIANTS = {
    "mag_field": {"mode": "trained", "rule": "magnitude", "normalize": "field"},
    "mag_none": {"mode": "trained", "rule": "magnitude", "normalize": "none"},
    "sal_field": {"mode": "trained", "rule": "saliency", "normalize": "field"},
    "taylor_none": {"mode": "trained", "rule": "taylor", "normalize": "none"},
    "taylor_field": {"mode": "trained", "rule": "taylor", "normalize": "field"},
    "cheap_mag_field": {"mode": "warmup", "rule": "magnitude", "normalize": "field", "warmup_epochs": 0.2},
    "cheap_move_field": {"mode": "warmup", "rule": "movement", "normalize": "field", "warmup_epochs": 0.2},
    # the cheap mode's default (8% of the run's steps) and the rules tried against it after the study
    "cheap_mag": {"mode": "warmup", "rule": "magnitude", "normalize": "none", "warmup_share": 0.08},
    "cheap_move": {"mode": "warmup", "rule": "movement", "normalize": "none", "warmup_share": 0.08},
    "cheap_taylor": {"mode": "warmup", "rule": "taylor", "normalize": "none", "warmup_share": 0.08, "num_batches": 8},
    "cheap_mag_shrink": {
        "mode": "warmup",
        "rule": "magnitude",
        "normalize": "none",
        "warmup_share": 0.08,
        "shrink": 1.0,
    },
    # after the fifth round: movement (which removes the initial values' noise from the cheap
    # scores) with the default's shrinkage by counts (which fixed rare rows on MovieLens-100K)
    "cheap_move_shrink": {
        "mode": "warmup",
        "rule": "movement",
        "normalize": "none",
        "warmup_share": 0.08,
        "shrink": 1.0,
    },
    # after the fourth round: the cheap scores only spread each table's share of the budget (the
    # tables' totals as uniform sizes give them), since across tables they mostly measure counts
    "cheap_mag_pertable": {
        "mode": "warmup",
        "rule": "magnitude",
        "normalize": "none",
        "warmup_share": 0.08,
        "per_table": True,
    },
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", choices=["ml", "adult"], default="ml")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.05])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tag", default="", help="suffix of the JSON file name (pilot_<data><tag>.json)")
    a = p.parse_args()
    variants = {v: VARIANTS[v] for v in a.variants}
    torch.set_num_threads(1)
    ds = data.load_movielens_100k() if a.data == "ml" else data.load_adult()
    rows = []
    t0 = time.time()
    for seed in a.seeds:
        tr, va, te = ds.split(seed=seed)
        cfg = ExperimentConfig(
            dim=64,
            epochs=a.epochs,
            budgets=tuple(a.budgets),
            seeds=(seed,),
            progress=False,
            variants=variants,
            methods=tuple(variants) + ("uniform", "popularity", "random"),
        )
        rows += run_experiment(cfg, tr, va, te, log=lambda m: print(f"{time.time() - t0:.0f}s {m}", flush=True))
    out = {"rows": [{k: v for k, v in r.items() if k != "sizes"} for r in rows]}
    out["paired"] = {v: paired_differences(rows, v, ("uniform", "popularity", "random", "full")) for v in variants}
    os.makedirs("benchmarks/results/quality", exist_ok=True)
    with open(f"benchmarks/results/quality/pilot_{a.data}{a.tag}.json", "w") as f:
        json.dump(out, f, indent=1)
    for v, ps in out["paired"].items():
        for q in ps:
            print(
                f"{v:18s} {q['budget']:.0%} vs {q['against']:10s} {q['mean']:+.4f} ± {q['std']:.4f} "
                f"wins {q['wins']}/{q['seeds']}"
            )


if __name__ == "__main__":
    main()
