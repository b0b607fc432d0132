"""Pilot: PEP-style learned soft thresholds (Liu et al., ICLR 2021) as the size search's scores
(the issue's optional third mode; pilot seeds 100+, not the study's 0-9).

The full-size model is trained with every table reparametrised as PEP does,
``w_used = sign(v) * relu(|v| - sigmoid(s_r))``, one learnable threshold ``s_r`` per row (PEP's
"feature-wise" granularity), trained with the model by the same Adam at the same learning rate,
``s_r`` starting at ``--s0``. An entry's score is ``|v| - sigmoid(s_r)`` (PEP keeps the entries
where it is positive); the scores are cut at each budget exactly as ``pme``'s are, and the sizes
retrained from the full-size model's initial values, next to ``pme`` (the default) and the
baselines. Also printed: how far the thresholds moved and what share of the entries PEP itself
zeroed.

Run: python benchmarks/pilot_pep.py movielens 100 [--s0 -15 -6] [--budgets 0.2 0.05]
"""

import argparse
import json
import os

import torch
import torch.nn.utils.parametrize as P

from pme.modules import convert
from pme.recsys import data
from pme.recsys.experiment import DEFAULT_VARIANTS, ExperimentConfig, _make_model, _train_eval, run_search
from pme.search import from_scores, sizes_at_budget


class SoftThreshold(torch.nn.Module):
    """PEP's reparametrisation of a ``[V, D]`` table: one threshold ``sigmoid(s_r)`` per row."""

    def __init__(self, rows: int, s0: float):
        super().__init__()
        self.s = torch.nn.Parameter(torch.full((rows, 1), float(s0)))

    def forward(self, v):
        return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(self.s))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", choices=["movielens", "adult"])
    p.add_argument("seed", type=int)
    p.add_argument("--s0", type=float, nargs="+", default=[-15.0, -6.0], help="initial thresholds (logits)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.05])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = data.DATASETS[a.data]()
    train, val, test = ds.split(seed=a.seed)
    cfg = ExperimentConfig(budgets=tuple(a.budgets), seeds=(a.seed,), progress=False, methods=("pme",))
    full = _make_model(cfg, train, a.seed)
    res = _train_eval(cfg, full, train, val, test, a.seed)
    out = {"full": res["auc"]}
    print(f"{a.data} {a.seed} full {res['auc']:.4f}", flush=True)
    found, _ = run_search(cfg, DEFAULT_VARIANTS["pme"], full, train, val, a.seed)
    sizes = {}
    for b in a.budgets:
        sizes[(b, "pme")] = sizes_at_budget("pme", b, result=found)
        sizes[(b, "uniform")] = sizes_at_budget("uniform", b, model=full)
        sizes[(b, "popularity")] = sizes_at_budget("popularity", b, model=full, data=train)
    for s0 in a.s0:
        pep = _make_model(cfg, train, a.seed)  # the same initial values as `full`
        names = [n for n, m in pep.named_modules() if isinstance(m, torch.nn.EmbeddingBag)]
        mods = dict(pep.named_modules())
        for n in names:
            P.register_parametrization(mods[n], "weight", SoftThreshold(mods[n].num_embeddings, s0))
        r = _train_eval(cfg, pep, train, val, test, a.seed)
        scores, zeroed, total, moved = {}, 0, 0, []
        with torch.no_grad():
            for n in names:
                v = mods[n].parametrizations.weight.original
                g = torch.sigmoid(mods[n].parametrizations.weight[0].s)
                scores[n] = (v.abs() - g).float()
                zeroed += int((v.abs() <= g).sum())
                total += v.numel()
                moved.append(float((g - torch.sigmoid(torch.tensor(s0))).abs().max()))
        out[f"pep{s0:g}:full"] = r["auc"]
        print(
            f"{a.data} {a.seed} pep s0={s0:g}: AUC of the PEP-trained full model {r['auc']:.4f}, PEP zeroed "
            f"{zeroed / total:.1%} of the entries, thresholds moved at most {max(moved):.2e} "
            f"(start {torch.sigmoid(torch.tensor(s0)):.2e})",
            flush=True,
        )
        result = from_scores(scores, max(a.budgets), counts=None, rule="pep")
        for b in a.budgets:
            sizes[(b, f"pep{s0:g}")] = sizes_at_budget("pme", b, result=result)
    for (b, m), sz in sizes.items():
        model = _make_model(cfg, train, a.seed)
        convert(model, sz, init="kept")
        r = _train_eval(cfg, model, train, val, test, a.seed)
        out[f"{b}:{m}"] = r["auc"]
        print(f"{a.data} {a.seed} {b} {m} {r['auc']:.4f} {r['auc'] - res['auc']:+.4f}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pilot_pep_{a.data}_{a.seed}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
