"""Pilot: prune the trained full-size model and fine-tune it, instead of retraining from scratch
(pilot seeds 100+, not the study's 0-9).

The study retrains every size rule from the full-size model's *initial* values. The classic
pruning recipe keeps the *trained* values of the surviving entries and trains on for a while.
This pilot asks, per seed and budget, whether that changes (a) how close a pruned model gets to
full size and (b) which size rule wins. Every method is treated alike: a copy of the trained
full-size model, each row keeping its best entries by trained magnitude |w| (PME's sizes or a
baseline's), then ``--epochs`` more epochs of Adam (fresh optimizer state, the study's learning
rate). ``ft0`` rows are the same models before fine-tuning (pruned, not trained further);
``scratch`` rows retrain PME's and uniform sizes from the initial values as the study does;
``full+`` trains the full-size model on for the same epochs (does the extra training alone move
the full-size AUC?).

``--rewind R`` (late rewinding, as in the lottery-ticket studies) replaces the fine-tuned rows: each
method starts from the full-size model as it was after R of its epochs (the same run: the same
seed gives the same first R epochs), keeps each row's best entries by the *final* trained |w|,
and trains the remaining epochs of the schedule (fresh Adam state), so the pruned model is
trained as long as the study's retrained ones (``rw`` rows).

Prints one line per run and writes ``<out>/pilot_finetune_<data>_<seed>.json`` (``_rw<R>`` with
``--rewind``).

Run: python benchmarks/pilot_finetune.py movielens 100 101 102 [--budgets 0.5 0.2 0.1 0.05] [--epochs 1]
     [--rewind 1]
"""

import argparse
import copy
import json
import os
import time

import torch

from pme.modules import convert
from pme.recsys import data, models
from pme.recsys.experiment import DEFAULT_VARIANTS, ExperimentConfig, _make_model, _train_eval, run_search
from pme.search import sizes_at_budget

BASELINES = ("uniform", "popularity", "random")


def fine_tuned(cfg, full, sizes, scores, train, val, test, seed, epochs, lr=None):
    """A copy of ``full`` with each row's best ``sizes`` entries by ``scores`` kept at their trained
    values; returns (test AUC before, test AUC after ``epochs`` epochs of Adam)."""
    model = copy.deepcopy(full)
    convert(model, sizes, init="kept", scores=scores)
    before = models.evaluate(model, test)["auc"]
    if epochs == 0:
        return before, before
    c = copy.copy(cfg)
    c.epochs, c.lr = epochs, lr or cfg.lr
    return before, _train_eval(c, model, train, val, test, seed + 1000)["auc"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", choices=["movielens", "adult"])
    p.add_argument("seeds", type=int, nargs="+")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after pruning")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the study's)")
    p.add_argument("--no-scratch", action="store_true", help="skip the retrained-from-scratch rows")
    p.add_argument("--rewind", type=int, default=0, help="late rewinding to this epoch instead of fine-tuning")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = {"movielens": data.load_movielens_100k, "adult": data.load_adult}[a.data]()
    os.makedirs(a.out, exist_ok=True)
    for seed in a.seeds:
        t0 = time.perf_counter()
        train, val, test = ds.split(seed=seed)
        cfg = ExperimentConfig(budgets=tuple(a.budgets), seeds=(seed,), progress=False, methods=("pme",))
        full = _make_model(cfg, train, seed)
        res = _train_eval(cfg, full, train, val, test, seed)
        out = {"full": res["auc"], "full_seconds": res["train_seconds"]}
        print(f"{a.data} {seed} full {res['auc']:.4f} ({res['train_seconds']:.1f} s)", flush=True)
        if a.rewind:
            snap = _make_model(cfg, train, seed)  # the full-size run again, stopped after `rewind` epochs
            kw = dict(batch_size=cfg.batch_size, lr=cfg.lr, progress=False, seed=seed, device=cfg.device)
            models.train_model(snap, train, val, epochs=a.rewind, **kw)
            again = _make_model(cfg, train, seed)
            models.train_model(again, train, val, epochs=cfg.epochs, **kw)
            assert all(torch.equal(x, y) for x, y in zip(again.parameters(), full.parameters())), "not reproducible"
        more = copy.deepcopy(full)
        c = copy.copy(cfg)
        c.epochs, c.lr = a.epochs, a.lr or cfg.lr
        out["full+"] = _train_eval(c, more, train, val, test, seed + 1000)["auc"]
        print(f"{a.data} {seed} full+ {out['full+']:.4f} {out['full+'] - res['auc']:+.4f}", flush=True)
        found, _ = run_search(cfg, DEFAULT_VARIANTS["pme"], full, train, val, seed)
        mods = dict(full.named_modules())
        magnitude = {n: mods[n].weight.detach().abs() for n in found.scores}
        for b in a.budgets:
            sizes = {"pme": sizes_at_budget("pme", b, result=found)}
            sizes["uniform"] = sizes_at_budget("uniform", b, model=full)
            sizes["popularity"] = sizes_at_budget("popularity", b, model=full, data=train)
            sizes["random"] = sizes_at_budget("random", b, model=full, data=train, seed=seed)
            for m, sz in sizes.items():
                if a.rewind:
                    left = cfg.epochs - a.rewind
                    _, after = fine_tuned(cfg, snap, sz, magnitude, train, val, test, seed, left, a.lr)
                    out[f"{b}:{m}:rw"] = after
                    print(f"{a.data} {seed} {b} {m} rw{a.rewind} {after:.4f} {after - res['auc']:+.4f}", flush=True)
                else:
                    before, after = fine_tuned(cfg, full, sz, magnitude, train, val, test, seed, a.epochs, a.lr)
                    out[f"{b}:{m}:ft0"], out[f"{b}:{m}:ft"] = before, after
                    print(
                        f"{a.data} {seed} {b} {m} ft0 {before:.4f} ft {after:.4f} {after - res['auc']:+.4f}", flush=True
                    )
                if not a.no_scratch and m in ("pme", "uniform"):
                    model = _make_model(cfg, train, seed)
                    convert(model, sz, init="kept")
                    r = _train_eval(cfg, model, train, val, test, seed)
                    out[f"{b}:{m}:scratch"] = r["auc"]
                    print(f"{a.data} {seed} {b} {m} scratch {r['auc']:.4f} {r['auc'] - res['auc']:+.4f}", flush=True)
        out["seconds"] = time.perf_counter() - t0
        tag = f"_rw{a.rewind}" if a.rewind else ""
        with open(os.path.join(a.out, f"pilot_finetune_{a.data}_{seed}{tag}.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
