"""The `pme` command's library side (`pme bench`, `pme info`, `pme --version`, `python -m pme`) and
the benchmark scripts' argument checks: a bad value is one line and exit status 2, before any
work, never a traceback. (`pme search` / `pme demo`: tests/recsys/test_cli_search_demo.py.)"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import pme
from pme.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a run that gets past the argument checks is tiny and prints nothing to a file
TINY = ["--quick", "--dry-run", "--no-save", "--rows", "1000", "--bags", "4", "--methods", "pme"]


def _refused(capsys, argv, says):
    """``main(argv)`` stops with status 2 and one error line containing ``says``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    assert says in err and "Traceback" not in err, err
    return out, err


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--rows", "0"], "argument --rows: 0 is below 1"),  # was an IndexError from the Zipf table
        (["--bags", "-1"], "argument --bags: -1 is below 1"),
        (["--pooling-factor", "0"], "argument --pooling-factor: 0 is below 1"),  # was a RuntimeError
        (["--repeats", "0"], "argument --repeats: 0 is below 1"),  # was a StatisticsError after the run
        (["--warmup", "-1"], "argument --warmup: -1 is below 0"),
        (["--threads", "0"], "argument --threads: 0 is below 1"),  # was silently ignored
        (["--threads", "-2"], "argument --threads: -2 is below 1"),  # was torch's RuntimeError
        (["--max-seconds", "0"], "argument --max-seconds: 0 is not a finite number > 0"),
        (["--mem-limit-gb", "0"], "argument --mem-limit-gb: 0 is not a finite number > 0"),  # was ignored
        (["--copy-mb", "0"], "argument --copy-mb: 0 is below 1"),  # was ignored
        (["--zipf-alpha", "nan"], "argument --zipf-alpha: nan is not a finite number >= 0"),
        (["--seed", "-1"], "argument --seed: -1 is not a seed"),
        (["--device", "nope"], "argument --device: 'nope' is not a device: give cpu, cuda or cuda:N"),
    ],
)
def test_bench_refuses_bad_numbers_when_parsing(capsys, bad, says):
    _refused(capsys, ["bench", *TINY, *bad], f"pme bench: error: {says}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_and_search_refuse_cuda_where_there_is_none(capsys):
    _refused(capsys, ["bench", *TINY, "--device", "cuda"], "argument --device: cuda: CUDA is not available here")
    _refused(capsys, ["search", "--device", "cuda:0"], "argument --device: cuda:0: CUDA is not available here")


def test_bench_replot_of_a_missing_or_foreign_file(tmp_path, capsys):
    _refused(capsys, ["bench", "--replot", str(tmp_path / "none.json")], "none.json: No such file or directory")
    (tmp_path / "other.json").write_text(json.dumps({"x": 1}))
    _refused(capsys, ["bench", "--replot", str(tmp_path / "other.json")], "is not a result file of pme bench")
    (tmp_path / "text.json").write_text("not json")
    _refused(capsys, ["bench", "--replot", str(tmp_path / "text.json")], "is not a result file of pme bench")


def test_bench_checks_where_its_json_goes_before_timing(tmp_path, capsys):
    """--out a folder, or below a file: refused before the copy bandwidth or any method is timed
    (the JSON used to be written only after the first configuration had run)."""
    run = ["bench", "--quick", "--rows", "1000", "--bags", "4", "--methods", "pme", "--repeats", "3", "--copy-mb", "16"]
    out, _ = _refused(capsys, [*run, "--out", str(tmp_path)], f"--out {tmp_path} is a folder; give a file name")
    assert "copy bandwidth" not in out
    (tmp_path / "f").write_text("")
    out, _ = _refused(
        capsys, [*run, "--out", str(tmp_path / "f" / "b.json")], f"{tmp_path / 'f'} is a file, not a folder"
    )
    assert "copy bandwidth" not in out
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):  # nothing can be made in /proc, even by root
        out, _ = _refused(capsys, [*run, "--out", "/proc/pme-test/b.json"], "cannot write in /proc")
        assert "copy bandwidth" not in out


def test_bench_makes_a_missing_result_folder(tmp_path, capsys):
    """A missing folder of --out is made (the check above does not refuse it)."""
    out = tmp_path / "new" / "deeper" / "b.json"
    run = ["bench", "--quick", "--rows", "1000", "--bags", "4", "--methods", "pme", "--repeats", "3", "--copy-mb", "16"]
    main([*run, "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["configs"][0]["config"]["rows"] == 1000


def test_bench_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--rows", "--bags", "--pooling-factor", "--threads", "--seed", "--device", "--out", "--replot"):
        line = next(x for x in text.splitlines() if x.strip().startswith(opt))
        assert len(line.split(None, 2)) >= 2, f"{opt} has no help: {line!r}"
    assert "Output:" in text and "configurations:" in text


def test_version_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "pme", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"pme {pme.info()['version']}", (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "pme"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "required: {info,demo,search,bench}" in r.stderr, r.stderr


def test_info_on_the_reference_backend(tmp_path):
    """`pme info` where the compiled extension is missing (a copy of the package without its binary,
    imported without the site hooks of an editable install): exit 0, the backend and the reason."""
    site = sysconfig.get_paths()["purelib"]
    if not os.path.isdir(os.path.join(site, "torch")):
        pytest.skip("torch is not in this interpreter's site-packages")
    shutil.copytree(
        os.path.dirname(pme.__file__),
        tmp_path / "pme",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), site]))
    env.pop("PME_REQUIRE_COMPILED", None)
    r = subprocess.run(
        [sys.executable, "-S", "-m", "pme", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["backend"] == "reference" and "no compiled extension" in got["load_error"]
    assert "could not be loaded" in r.stderr  # the one warning, on stderr


@pytest.mark.parametrize(
    "script, bad, says",
    [
        ("bench_sparse.py", ["--quick", "--dims", "12"], "argument --dims: must be a positive multiple of 8"),
        ("bench_sparse.py", ["--quick", "--threads", "0"], "argument --threads: 0 is below 1"),
        ("bench_overhead.py", ["--calls", "0"], "argument --calls: 0 is below 1"),
        ("bench_validation.py", ["--repeats", "0"], "argument --repeats: 0 is below 1"),
        ("bench_compile.py", ["--rows", "0"], "argument --rows: 0 is below 1"),
        ("bench_collection.py", ["--scale", "0"], "argument --scale: 0 is not a finite number > 0"),
        ("bench_huge_pages.py", ["--threads", "0"], "argument --threads: 0 is below 1"),
        ("bench_lookup.py", ["--rows", "-5"], "argument --rows: -5 is below 1"),
    ],
)
def test_benchmark_scripts_refuse_bad_numbers(tmp_path, script, bad, says):
    out = ["--out", str(tmp_path / ("results" if script == "bench_huge_pages.py" else "r.json"))]  # never the repo's
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *bad, *out],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bench_exits_non_zero_when_every_method_failed(tmp_path, monkeypatch):
    """A run in which no method could be timed is a failure (exit status, not 0), with the JSON
    recording each error; one method that runs is enough for a result."""
    from pme import bench

    def broken(c, timer):
        raise RuntimeError("kaputt")

    out = tmp_path / "b.json"
    run = ["bench", "--quick", "--rows", "1000", "--bags", "4", "--methods", "pme", "--repeats", "3", "--copy-mb", "16"]
    monkeypatch.setitem(bench.RUNNERS, "pme", broken)
    with pytest.raises(SystemExit, match="every method failed \\(RuntimeError: kaputt\\)"):
        main([*run, "--out", str(out)])
    assert json.loads(out.read_text())["configs"][0]["results"][0]["error"] == "RuntimeError: kaputt"


def test_bench_inputs_beyond_the_memory_are_one_error_line(capsys):
    """--rows far beyond the memory: the inputs cannot be built; one line naming the config, not a
    traceback."""
    with pytest.raises(SystemExit, match=r"cannot build the inputs of quick \(rows 10,000,000,000,000"):
        main(["bench", "--quick", "--rows", str(10**13), "--bags", "4", "--methods", "pme", "--no-save"])
