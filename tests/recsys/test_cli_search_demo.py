"""`pme search` / `pme demo` refuse bad options with one line and exit status 2 before they train
(or, for what only the search can tell, instead of a traceback after it), and `pme demo --fast`
keeps the --budgets / --epochs it is given. Tiny data: a 400-row CSV, width 8."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from pme.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def clicks(tmp_path):
    """``--data FILE --label clicked`` of a 400-row click log (30 users, 10 items)."""
    rnd = random.Random(0)
    path = tmp_path / "clicks.csv"
    with open(path, "w") as f:
        f.write("user,item,clicked\n")
        for _ in range(400):
            u, it = rnd.randrange(30), rnd.randrange(10)
            f.write(f"u{u},i{it},{int((u + it) % 2 == 0)}\n")
    return ["--data", str(path), "--label", "clicked", "--dim", "8", "--batch-size", "64", "--epochs", "1"]


def _fails(capsys, argv, says, code=2):
    """``main(argv)`` returns or exits with ``code``, one error line with ``says``, nothing trained."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == code, (rc, err)
    assert says in err and "Traceback" not in err, err
    assert "training" not in out and "epoch 1/" not in out + err and "train /" not in out, out
    return err


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--budget", "20"], "argument --budget: 20 is not in (0, 1] (a fraction: 0.2 for 20%)"),
        (["--seed", "-1"], "argument --seed: -1 is not a seed in [0, 2**63)"),
        (["--seed", str(2**64)], "is not a seed in [0, 2**63)"),  # was torch's overflow error
        (["--device", "nope"], "argument --device: 'nope' is not a device"),  # was a traceback
        (["--device", "mps"], "argument --device: 'mps': pme runs on cpu or cuda"),
        (["--min-count", "0"], "argument --min-count: 0 is below 1"),
    ],
)
def test_search_refuses_bad_options_when_parsing(capsys, clicks, bad, says):
    _fails(capsys, ["search", *clicks, *bad], says)


def test_demo_refuses_bad_options_when_parsing(capsys, clicks, tmp_path):
    demo = ["demo", "--fast", *clicks, "--out", str(tmp_path / "demo")]  # never out/demo, whatever happens
    _fails(capsys, [*demo, "--budgets", "50"], "(a fraction: 0.5 for 50%)")
    _fails(capsys, [*demo, "--seeds", "0", "-2"], "argument --seeds: -2 is not a seed")
    _fails(capsys, [*demo, "--device", "gpu"], "argument --device: 'gpu' is not a device")


def test_search_budget_below_one_entry_a_row(capsys, clicks):
    """budget x width < 1 cannot leave every row its one entry: said before training (it was a
    ValueError traceback from pme.search after the full-size model had trained)."""
    err = _fails(capsys, ["search", *clicks, "--budget", "0.1"], "--budget 0.1 of --dim 8 is 0.8 entries a row")
    assert "raise --budget or --dim" in err


def test_search_out_that_cannot_be_written(capsys, clicks, tmp_path):
    """--out is checked by trying, before training (root passes every permission check, so
    os.access said yes to a folder under /proc and the JSON write failed after the search)."""
    (tmp_path / "f").write_text("")
    _fails(capsys, ["search", *clicks, "--out", str(tmp_path / "f" / "s.json")], "is a file, not a folder")
    _fails(capsys, ["search", *clicks, "--out", str(tmp_path / "no" / "s.json")], "does not exist")
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):  # nothing can be made in /proc
        _fails(capsys, ["search", *clicks, "--out", "/proc/pme-test.json"], "cannot write in /proc")
    assert not os.path.exists(tmp_path / "no")


def test_demo_out_that_cannot_be_written(capsys, clicks, tmp_path):
    """The demo's --out folder is checked before the runs (it failed in write_report, after them)."""
    (tmp_path / "f").write_text("")
    _fails(capsys, ["demo", "--fast", *clicks, "--out", str(tmp_path / "f")], "is a file; give a folder")
    _fails(capsys, ["demo", "--fast", *clicks, "--out", str(tmp_path / "f" / "sub")], "is a file, not a folder")
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        _fails(capsys, ["demo", "--fast", *clicks, "--out", "/proc/pme-test/demo"], "cannot write in /proc")


def test_search_writes_the_sizes_json_the_readme_describes(clicks, tmp_path):
    """`--out` holds {"sizes": {"embeddings.<column>": [one size per token id]}, "budget", "kept",
    "dense", ...} and pme.convert applies it to the toolkit's model of that data."""
    import pme
    from pme.recsys import data, models

    f = tmp_path / "sizes.json"
    assert main(["search", *clicks, "--budget", "0.5", "--out", str(f)]) == 0
    got = json.loads(f.read_text())
    assert {"sizes", "budget", "kept", "dense", "data", "mode", "rule", "seconds"} <= set(got)
    ds = data.from_csv(clicks[1], "clicked")
    assert got["budget"] == 0.5 and got["dense"] == 8 * sum(ds.cardinality.values())
    assert 0 < got["kept"] <= got["dense"] // 2
    assert sum(map(sum, got["sizes"].values())) == got["kept"]
    model = models.DeepFM.from_dataset(ds, embedding_dim=8)
    pme.convert(model, {n: torch.tensor(s) for n, s in got["sizes"].items()})
    assert all(torch.equal(model.get_submodule(n).sizes.cpu(), torch.tensor(s)) for n, s in got["sizes"].items())


def test_demo_fast_keeps_the_budgets_and_epochs_given(clicks, tmp_path):
    """--fast used to replace --budgets / --epochs silently with 0.2 and 1."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    argv = ["demo", "--fast", *clicks, "--budgets", "0.5", "--out", str(out)]
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["budgets"] == [0.5] and cfg["epochs"] == 2 and cfg["methods"] == ["pme", "uniform"]


def test_search_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    opts = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert "--out" in opts and "--budget" in opts
    for line in text.splitlines():
        if line.startswith("  --") and len(line.split()) <= 2:  # option and metavar alone: help on the next line
            nxt = text.splitlines()[text.splitlines().index(line) + 1]
            assert nxt.startswith(" " * 10), f"no help for {line.strip()}"


def test_quality_script_checks_its_options_before_training(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "quality.py")
    for bad, says in (
        (["--budgets", "20"], "argument --budgets: 20 is not in (0, 1]"),
        (["--methods", "pmee"], "argument --methods: invalid choice: 'pmee'"),
        (["--rename", "pme", "--report-only"], "--rename takes OLD=NEW"),  # was checked after the runs
        (["--report-only"], "--report-only: no "),
    ):
        r = subprocess.run(
            [sys.executable, script, "--data", "adult", "--out", str(tmp_path / "q"), *bad],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
