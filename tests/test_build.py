"""Unit tests of setup.py's helpers: the default CUDA arch list, MAX_JOBS, the toolkit root, the
local version label and the source distribution's files. Skipped where setup.py is not next to
tests/ (scripts/check_wheel.sh runs the suite from a copy of tests/ against an installed wheel)."""

import importlib.util
import os
import stat
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"
pytestmark = pytest.mark.skipif(not SETUP.exists(), reason="no setup.py next to tests/ (installed-wheel run)")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("pme_setup", SETUP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # guarded by `if __name__ == "__main__"`: builds nothing
    return mod


@pytest.mark.parametrize(
    "nvcc, expected",
    [
        ((11, 7), "8.0;8.6+PTX"),
        ((11, 8), "8.0;8.6;8.9;9.0+PTX"),
        ((12, 6), "8.0;8.6;8.9;9.0+PTX"),
        ((12, 8), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((12, 9), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ((13, 0), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ],
)
def test_default_arch_list_by_version(setup_py, nvcc, expected):
    assert setup_py.default_arch_list(nvcc) == expected


def test_default_arch_list_from_nvcc_list(setup_py):
    # what `nvcc --list-gpu-code` says wins over the version table
    cuda124 = {"5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"}
    assert setup_py.default_arch_list((12, 4), cuda124) == "8.0;8.6;8.9;9.0+PTX"
    cuda130 = {"7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"}
    assert setup_py.default_arch_list((13, 0), cuda130) == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    # a future nvcc that dropped sm_80 still gets a list, PTX on its newest
    assert setup_py.default_arch_list((14, 0), {"9.0", "10.0", "12.0", "13.0"}) == "9.0;10.0;12.0+PTX"
    with pytest.raises(ValueError):
        setup_py.default_arch_list((10, 2), {"5.0", "7.0"})


@pytest.mark.parametrize(
    "cores, mem, expected",
    [
        (2, 24.0, 2),  # this machine: cores bound
        (16, 24.0, 12),  # memory bound: 2 GiB a job
        (16, 3.9, 1),  # little memory: one job
        (4, 0.5, 1),  # never zero
        (64, 128.0, 64),
    ],
)
def test_default_max_jobs(setup_py, cores, mem, expected):
    assert setup_py.default_max_jobs(cores=cores, mem_gib=mem) == expected


def test_default_max_jobs_reads_this_machine(setup_py):
    n = setup_py.default_max_jobs()
    assert 1 <= n <= (os.cpu_count() or 1)


def _fake_nvcc(path: Path, here: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '#$ _HERE_={here}' >&2\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_resolve_cuda_home_follows_a_wrapper(setup_py, tmp_path):
    real = tmp_path / "cuda-12.4"
    (real / "include").mkdir(parents=True)
    (real / "include" / "cuda_runtime.h").write_text("")
    _fake_nvcc(real / "bin" / "nvcc", real / "bin")
    wrapper_root = tmp_path / "usr-local"  # like /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc
    _fake_nvcc(wrapper_root / "bin" / "nvcc", real / "bin")
    assert setup_py.resolve_cuda_home(str(wrapper_root)) == str(real)
    assert setup_py.resolve_cuda_home(str(real)) == str(real)  # already a toolkit root
    assert setup_py.resolve_cuda_home(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")
    assert setup_py._nvcc_version(str(real)) == (12, 4)


def test_local_version(setup_py, monkeypatch):
    monkeypatch.delenv("PME_LOCAL_VERSION", raising=False)
    base = setup_py._version()
    assert "+" not in base
    monkeypatch.setenv("PME_LOCAL_VERSION", "cu130")
    assert setup_py._version() == base + "+cu130"
    monkeypatch.setenv("PME_LOCAL_VERSION", "+cpu")
    assert setup_py._version() == base + "+cpu"


def test_sdist_carries_the_sources_tests_and_scripts(tmp_path):
    # MANIFEST.in: every file under csrc/ (CUDA too), the tests and the build scripts, no binaries
    import subprocess
    import sys
    import tarfile

    root = SETUP.parent
    env = dict(os.environ, PME_NO_EXTENSION="1")
    subprocess.run(
        [sys.executable, str(SETUP), "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    (tarball,) = tmp_path.glob("pme-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {
        str(p.relative_to(root)) for p in (root / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert sources and sources <= names, sources - names
    assert {"tests/conftest.py", "scripts/setup.sh", "setup.py", "pme/ops.py", "MANIFEST.in"} <= names
    # the demo's toolkit (pme/recsys) and its tests travel too
    toolkit = {str(p.relative_to(root)) for d in ("pme/recsys", "tests/recsys") for p in (root / d).glob("*.py")}
    assert {"pme/recsys/__init__.py", "pme/recsys/data.py", "tests/recsys/test_data.py"} <= toolkit <= names, (
        toolkit - names
    )
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def test_compiler_probe(setup_py):
    assert not setup_py._compiler_works("/bin/false")
    assert not setup_py._compiler_works("/nonexistent/c++")


def test_archs_label_has_no_semicolon(setup_py):
    # the build-info string is "key=value;..." (pme.ops._load splits on ';')
    assert setup_py.archs_label("8.0;8.6;8.9;9.0+PTX") == "8.0,8.6,8.9,9.0+PTX"
    assert setup_py.archs_label("8.0 9.0+PTX") == "8.0,9.0+PTX"
    assert setup_py.archs_label("9.0") == "9.0"
