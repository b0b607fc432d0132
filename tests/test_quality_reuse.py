"""benchmarks/quality.py --reuse: an earlier run's rows of the methods not re-run are merged,
renamed or dropped as asked; a seed whose full-size AUC differs stops the merge."""

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality.py")


def _quality():
    spec = importlib.util.spec_from_file_location("quality_script", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(seed, budget, method, auc):
    return {"seed": seed, "budget": budget, "method": method, "auc": auc}


def test_reuse_merges_renames_drops_and_checks_the_full_runs(tmp_path):
    q = _quality()
    old = [
        _row(0, 1.0, "full", 0.80),
        _row(0, 0.2, "pme", 0.70),  # -> pme_raw
        _row(0, 0.2, "pme_rewound", 0.71),  # dropped
        _row(0, 0.2, "uniform", 0.72),  # kept as is
        _row(0, 0.2, "pme_grouped", 0.60),  # re-run now: this run's row wins
    ]
    (tmp_path / "results_partial_adult.json").write_text(json.dumps({"rows": old}))
    new = [_row(0, 1.0, "full", 0.80), _row(0, 0.2, "pme", 0.75), _row(0, 0.2, "pme_grouped", 0.74)]
    args = SimpleNamespace(
        reuse=str(tmp_path), rename=["pme=pme_raw", "pme_rewound="], methods=["pme", "pme_rewound", "pme_grouped"]
    )
    merged = q.reuse_rows(new, "adult", args)
    assert len(merged) == 5  # one row per (seed, budget, method): the old full-size row not twice
    got = {(r["budget"], r["method"]): r["auc"] for r in merged}
    assert got == {
        (1.0, "full"): 0.80,
        (0.2, "pme"): 0.75,
        (0.2, "pme_raw"): 0.70,
        (0.2, "uniform"): 0.72,
        (0.2, "pme_grouped"): 0.74,
    }
    with pytest.raises(SystemExit, match="seed 0: full-size AUC 0.81 here, 0.8 in"):
        q.reuse_rows([_row(0, 1.0, "full", 0.81)], "adult", args)
    with pytest.raises(SystemExit, match="--rename takes OLD=NEW"):
        q.reuse_rows(new, "adult", SimpleNamespace(reuse=str(tmp_path), rename=["pme"], methods=["pme"]))
