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
- ``bins<k>`` (``--bins``): the same shrinkage, but toward the mean profile of the rows seen about as
  often (count bins ``floor(log2(n + 1))`` of the table, backed off to the table's mean by 10 rows'
  weight) instead of the whole table's: tried after the study, not adopted (benchmarks/README.md);
- ``--tries`` (after the second study, none adopted; benchmarks/README.md, "A third round"):
  ``movement`` (|w_T - w_0| of the full-size run, shrunk as ``pme``), ``popfloor`` (half the
  budget spread by MDE's count^0.3 as a floor, the rest to PME's best entries above it),
  ``wprof`` (the shrinkage toward the profile of the table's rows weighted by their own weights
  ``n / (n + D)``, so the rarely seen rows do not set it), ``zero`` (the shrinkage toward zero:
  scores times ``n / (n + D)``), ``rarity`` (MDE's power rule upside down, count^-0.3);
- ``--tries evidence evidence_zero`` (a fourth round, one seed, not adopted; benchmarks/README.md):
  the shrinkage with each row's weight taken from its gradients during the full-size run instead
  of its count (``GradientEvidence.reliability``: ``1 - sum g^2 / (sum g)^2`` over the row's
  entries, the share of the summed gradient a consistent direction explains), toward the table's
  profile or toward zero;
- ``--by-count``: print each table's mean trained magnitude and movement per count bin
  (``floor(log2(n + 1))``): the diagnosis of the third round (rare rows' magnitudes under Adam);
- ``--truncated``: also the validation AUC of the trained full-size model with the entries outside
  each variant's sizes zeroed, no retraining (does it predict the retrained ranking?);
- ``uniform``, ``popularity``: the baselines.

Prints one line per run (AUC and its difference to full size) and writes
``<out>/pilot_within_field_<data>_<seed>.json``.

Run: python benchmarks/pilot_within_field.py movielens 100 [--budgets 0.2 0.05] [--shrink 0.25 1 4]
     [--parts] [--bins 1 4] [--tries movement popfloor wprof zero rarity evidence evidence_zero]
     [--truncated]
     (--parts adds the field/within-field variants, --bins the count-bin shrinkage at the given
     strengths)
"""

import argparse
import copy
import json
import os

import torch

from pme.modules import convert
from pme.recsys import data, models
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


def _rank(sc: torch.Tensor) -> torch.Tensor:
    """``[V, D]`` each entry's place in its row, best score first (ties by position)."""
    V, D = sc.shape
    rank = torch.empty(V, D, dtype=torch.int64)
    return rank.scatter_(1, torch.argsort(sc, dim=1, descending=True, stable=True), torch.arange(D).expand(V, D))


def shrink_to_bins(scores: dict, counts: dict, strength: float, backoff: float = 10.0) -> dict:
    """``shrink_scores`` with each row pulled toward the mean sorted profile of its count bin
    (``floor(log2(n + 1))``; a bin of ``m`` rows gets ``m / (m + backoff)`` of its own mean and the
    rest from the whole table's), so that rare rows borrow from rows about as rare."""
    out = {}
    for name, sc in scores.items():
        V, D = sc.shape
        n = torch.as_tensor(counts[name]).reshape(-1).double()
        srt = torch.sort(sc.double(), dim=1, descending=True, stable=True).values
        b = torch.floor(torch.log2(n + 1)).long()
        nb = int(b.max()) + 1
        sums = torch.zeros(nb, D, dtype=torch.float64).index_add_(0, b, srt)
        m = torch.bincount(b, minlength=nb).double().unsqueeze(1)
        profile = (sums + backoff * srt.mean(0)) / (m + backoff)
        lam = (n / (n + strength * D)).unsqueeze(1)
        out[name] = (lam * sc.double() + (1 - lam) * profile[b].gather(1, _rank(sc))).float()
    return out


def shrink_toward(scores: dict, counts: dict, prior: str) -> dict:
    """``shrink_scores`` at strength 1 with another prior: ``"weighted"``, the mean sorted profile
    of the table's rows weighted by their own weights ``n / (n + D)``; ``"zero"``, nothing."""
    out = {}
    for name, sc in scores.items():
        D = sc.shape[1]
        lam = torch.as_tensor(counts[name]).reshape(-1).double()
        lam = (lam / (lam + D)).unsqueeze(1)
        if prior == "zero":
            out[name] = (lam * sc.double()).float()
            continue
        srt = torch.sort(sc.double(), dim=1, descending=True, stable=True).values
        profile = (lam * srt).sum(0) / lam.sum().clamp(min=1e-12)
        out[name] = (lam * sc.double() + (1 - lam) * profile[_rank(sc)]).float()
    return out


class GradientEvidence:
    """Sums each embedding entry's gradients and squared gradients over a training run (hooks after
    each accumulation), for :meth:`reliability`."""

    def __init__(self, model):
        self.s1, self.s2, self.handles = {}, {}, []
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.EmbeddingBag):
                self.s1[n] = torch.zeros_like(m.weight, dtype=torch.float64)
                self.s2[n] = torch.zeros_like(m.weight, dtype=torch.float64)
                self.handles.append(m.weight.register_post_accumulate_grad_hook(self._hook(n)))

    def _hook(self, n):
        def add(p):
            g = p.grad.detach().double()
            self.s1[n].add_(g)
            self.s2[n].add_(g * g)

        return add

    def remove(self):
        for h in self.handles:
            h.remove()

    def seen(self) -> dict:
        """``[V]`` bool per row: some gradient reached it."""
        return {n: self.s2[n].sum(1) > 0 for n in self.s2}

    def reliability(self) -> dict:
        """``[V]`` per row: ``1 - sum(S2) / sum(S1^2)`` over its entries, clamped to [0, 1]: the share
        of the summed gradient's square that a consistent direction explains (0 for a row never
        seen or seen once, or whose gradients point every way; towards 1 when they agree)."""
        out = {}
        for n in self.s1:
            a, b = (self.s1[n] ** 2).sum(1), self.s2[n].sum(1)
            out[n] = torch.where(a > 0, 1 - b / a.clamp(min=1e-300), torch.zeros_like(a)).clamp(0, 1)
        return out


def shrink_by(scores: dict, lam: dict, prior: str, seen: dict) -> dict:
    """Each row's scores kept with its weight ``lam[name][r]`` in [0, 1], the rest from the mean
    sorted score profile of the table's ``seen`` rows (``"profile"``, as ``shrink_scores``) or from
    nothing (``"zero"``)."""
    out = {}
    for name, sc in scores.items():
        w = lam[name].double().unsqueeze(1)
        if prior == "zero":
            out[name] = (w * sc.double()).float()
            continue
        srt = torch.sort(sc.double(), dim=1, descending=True, stable=True).values
        rows = seen[name] if bool(seen[name].any()) else torch.ones_like(seen[name])
        out[name] = (w * sc.double() + (1 - w) * srt[rows].mean(0)[_rank(sc)]).float()
    return out


def floored(scores: dict, floor: dict) -> dict:
    """Scores whose ``floor[name][r]`` best entries of each row always survive the threshold."""
    out = {}
    for name, sc in scores.items():
        out[name] = torch.where(_rank(sc) < floor[name].unsqueeze(1), torch.full_like(sc, 1e6), sc)
    return out


def truncated_auc(full, scores: dict, sizes: dict, val) -> float:
    """Validation AUC of ``full`` with each row's entries past its size (by ``scores``) zeroed."""
    model = copy.deepcopy(full)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, sc in scores.items():
            mods[name].weight.mul_((_rank(sc) < sizes[name].unsqueeze(1)).to(mods[name].weight.dtype))
    return models.evaluate(model, val)["auc"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", choices=["movielens", "adult"])
    p.add_argument("seed", type=int)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.2, 0.05], help="none: no retraining")
    p.add_argument("--shrink", type=float, nargs="*", default=[0.25, 1.0, 4.0], help="strengths k to try")
    p.add_argument("--parts", action="store_true", help="add pmefield_even, pmefield_pop, pme_pertable")
    p.add_argument("--bins", type=float, nargs="*", default=[], help="strengths k of the count-bin shrinkage to try")
    p.add_argument(
        "--tries",
        nargs="*",
        default=[],
        choices=["movement", "popfloor", "wprof", "zero", "rarity", "evidence", "evidence_zero"],
        help="the third round's variants (see above)",
    )
    p.add_argument("--by-count", action="store_true", help="print |w_T| and |w_T - w_0| per count bin")
    p.add_argument("--truncated", action="store_true", help="print each variant's truncated full-model val AUC")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = {"movielens": data.load_movielens_100k, "adult": data.load_adult}[a.data]()
    train, val, test = ds.split(seed=a.seed)
    cfg = ExperimentConfig(budgets=tuple(a.budgets) or (0.2,), seeds=(a.seed,), progress=False, methods=("pme",))
    full = _make_model(cfg, train, a.seed)
    w0 = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, torch.nn.EmbeddingBag)}
    evid = GradientEvidence(full) if any(t.startswith("evidence") for t in a.tries) else None
    res = _train_eval(cfg, full, train, val, test, a.seed)
    if evid is not None:
        evid.remove()
    out = {"full": res["auc"]}
    found, _ = run_search(cfg, DEFAULT_VARIANTS["pme_raw"], full, train, val, a.seed)
    counts = token_counts(full, train)
    shapes = {n: tuple(s.shape) for n, s in found.scores.items()}
    shrunk = {f"shrink{k:g}": shrink_scores(found.scores, counts, k) for k in a.shrink}
    shrunk.update({f"bins{k:g}": shrink_to_bins(found.scores, counts, k) for k in a.bins})
    mods = dict(full.named_modules())
    if a.by_count:
        for n in shapes:
            wt, bins = mods[n].weight.detach(), torch.floor(torch.log2(counts[n].double() + 1)).long()
            for k in range(int(bins.max()) + 1):
                rows = bins == k
                if int(rows.sum()) >= 3:
                    mag, move = float(wt[rows].abs().mean()), float((wt - w0[n])[rows].abs().mean())
                    rel = f" reliability {float(evid.reliability()[n][rows].mean()):.2f}" if evid else ""
                    print(
                        f"{a.data} {a.seed} by-count {n} n>={2**k - 1} rows {int(rows.sum())} "
                        f"|w| {mag:.4f} move {move:.4f}{rel}"
                    )
    tries = {
        "movement": lambda: shrink_scores({n: (mods[n].weight.detach() - w0[n]).abs() for n in shapes}, counts, 1.0),
        "wprof": lambda: shrink_toward(found.scores, counts, "weighted"),
        "zero": lambda: shrink_toward(found.scores, counts, "zero"),
        "evidence": lambda: shrink_by(found.scores, evid.reliability(), "profile", evid.seen()),
        "evidence_zero": lambda: shrink_by(found.scores, evid.reliability(), "zero", evid.seen()),
    }
    shrunk.update({k: tries[k]() for k in a.tries if k in tries})
    default = shrink_scores(found.scores, counts, 1.0)  # the default's scores, for popfloor
    for b in a.budgets:
        sizes = {"pme": sizes_at_budget("pme", b, result=found)}
        if a.parts:
            totals = {n: int(s.sum()) for n, s in sizes["pme"].items()}
            sizes["pmefield_even"] = spread(totals, shapes)
            sizes["pmefield_pop"] = spread(totals, shapes, counts)
            sizes["pme_pertable"] = found.for_budget(b, per_table=True, quantum=1, min_size=1).sizes
        for k, sc in shrunk.items():
            r = type(found)({}, sc, 0, 0, found.dense_entries, 0.0, 0.0, found.rule)
            sizes[k] = sizes_at_budget("pme", b, result=r)
        if "popfloor" in a.tries:
            floor = popularity_sizes(counts, {n: D for n, (_, D) in shapes.items()}, b / 2, quantum=1, min_size=1)
            r = type(found)({}, floored(default, floor), 0, 0, found.dense_entries, 0.0, 0.0, found.rule)
            sizes["popfloor"] = sizes_at_budget("pme", b, result=r)
        if "rarity" in a.tries:
            sizes["rarity"] = sizes_at_budget("popularity", b, model=full, data=train, alpha=-0.3)
        sizes["uniform"] = sizes_at_budget("uniform", b, model=full)
        sizes["popularity"] = sizes_at_budget("popularity", b, model=full, data=train)
        for m, sz in sizes.items():
            if a.truncated:
                # each row keeps its best entries by the variant's scores (the default's for baselines)
                t = truncated_auc(full, shrunk.get(m, default), sz, val)
                print(f"{a.data} {a.seed} {b} {m} truncated-val-auc {t:.4f}", flush=True)
            model = _make_model(cfg, train, a.seed)  # the full model's initial values
            convert(model, sz, init="kept")
            r = _train_eval(cfg, model, train, val, test, a.seed)
            out[f"{b}:{m}"] = r["auc"]
            mean = " ".join(f"{n.rpartition('.')[2]}:{float(s.double().mean()):.1f}" for n, s in sz.items())
            print(
                f"{a.data} {a.seed} {b} {m} {r['auc']:.4f} {r['auc'] - res['auc']:+.4f}  mean sizes {mean}", flush=True
            )
    os.makedirs(a.out, exist_ok=True)
    tag = "_bins" if a.bins else "_tries" if a.tries else ""
    with open(os.path.join(a.out, f"pilot_within_field_{a.data}_{a.seed}{tag}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
