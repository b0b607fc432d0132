#!/usr/bin/env bash
# Installs a built pme wheel into a fresh virtual environment and runs the test suite against the
# installed copy (not the source tree). See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/check_wheel.sh [--help] WHEEL [TORCH_VERSION|system] [-- PYTEST_ARGS...]

Creates a fresh venv (no compiler needed), installs torch TORCH_VERSION and then WHEEL, copies only
tests/ (and the pytest settings) to a temporary folder and runs pytest there, so `import pme` can
only find the installed copy. PME_REQUIRE_COMPILED=1 always (the run fails on the pure-PyTorch
fallback); for a CUDA wheel on a machine with a GPU also PME_REQUIRE_CUDA=1 (CUDA tests may not skip).

  TORCH_VERSION   default by flavour: +cpu 2.13.0, +cu13x 2.14.1, +cu12x 2.10.0
  system          use the torch (and pytest) of $PYTHON as it is: no venv; WHEEL and the missing
                  test dependencies go to a --target folder put on PYTHONPATH (the GPU machine:
                  torch 2.11.0 installed, no network; give PME_FIND_LINKS)

Environment:
  PYTHON              interpreter for the venv (default python3)
  PME_FIND_LINKS      folder of wheels to install from instead of an index (offline: --no-index);
                      must hold the test deps that are not installed (hypothesis, sortedcontainers, attrs)
  PME_TORCH_INDEX_URL extra index for torch (e.g. https://download.pytorch.org/whl/cu126)
  PME_CHECK_DIR       where the venv and the copied tests go (default: a new temporary folder; kept)
  PME_TESTS_DIR       the tests/ folder to copy (default: the one next to this script)
EOF
}

[ "${1:-}" = -h ] || [ "${1:-}" = --help ] && { usage; exit 0; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
WHEEL="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
[ -f "$WHEEL" ] || { echo "check_wheel: no such wheel: $WHEEL" >&2; exit 2; }
TORCH=""
if [ $# -ge 1 ] && [ "$1" != -- ]; then TORCH="$1"; shift; fi
[ "${1:-}" = -- ] && shift

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TESTS="${PME_TESTS_DIR:-$ROOT/tests}"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # survives the cd below
NAME="$(basename "$WHEEL")"
LOCAL="$(echo "$NAME" | sed -n 's/^pme-[^-+]*+\([^-]*\)-.*/\1/p')"
if [ -z "$TORCH" ]; then
  case "$LOCAL" in
    cpu) TORCH=2.13.0 ;;
    cu13*) TORCH=2.14.1 ;;
    cu12*) TORCH=2.10.0 ;;
    *) TORCH=2.13.0 ;;
  esac
fi
WORK="${PME_CHECK_DIR:-$(mktemp -d /tmp/pme-check.XXXXXX)}"
mkdir -p "$WORK"
log() { echo "check_wheel: $*" >&2; }
PIPOPT=(-q --disable-pip-version-check)
[ -n "${PME_FIND_LINKS:-}" ] && PIPOPT+=(--no-index --find-links "$PME_FIND_LINKS")
[ -n "${PME_TORCH_INDEX_URL:-}" ] && PIPOPT+=(--extra-index-url "$PME_TORCH_INDEX_URL")
pipi() {
  local rc=0 out; out="$(mktemp)"
  "$VPY" -m pip install "${PIPOPT[@]}" "$@" > "$out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || grep -v -e "^WARNING: Location" "$out" >&2 || true
  rm -f "$out"; return "$rc"
}

log "wheel $NAME (flavour ${LOCAL:-none}), torch $TORCH, work dir $WORK"
rm -rf "$WORK/venv" "$WORK/site"
if [ "$TORCH" = system ]; then
  # no venv: the wheel (and missing test deps) go to a --target folder on PYTHONPATH, so any python
  # with torch works (system, --user, venv or conda installs) and nothing of it is modified
  "$PY" -c 'import torch' || { echo "check_wheel: 'system' but $PY cannot import torch" >&2; exit 2; }
  VPY="$PY"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  TARGET=(--target "$WORK/site")
else
  "$PY" -m venv "$WORK/venv"
  VPY="$WORK/venv/bin/python"
  TARGET=()
  pipi "torch==$TORCH"
fi
# test dependencies: only those missing (offline machines carry them as wheels in PME_FIND_LINKS);
# recbole (MovieLens-100K files, --no-deps) is optional
for dep in pytest hypothesis tqdm; do
  "$VPY" -c "import $dep" 2>/dev/null || pipi "${TARGET[@]}" "$dep"
done
"$VPY" -c "import recbole" 2>/dev/null || pipi "${TARGET[@]}" --no-deps recbole 2>/dev/null || true
# the wheel itself: --no-deps so that pip never swaps the chosen torch; its deps are checked below
pipi "${TARGET[@]}" --no-deps "$WHEEL"
if [ "$TORCH" != system ]; then
  "$VPY" -m pip check 2>&1 | grep -i "^pme " && { echo "check_wheel: pme's requirements are not met" >&2; exit 1; } || true
fi

# only the tests and the pytest settings travel; the source tree stays out of sys.path
RUN="$WORK/run"; rm -rf "$RUN"; mkdir -p "$RUN"
cp -r "$TESTS" "$RUN/tests"
find "$RUN/tests" -name __pycache__ -prune -exec rm -rf {} +
cat > "$RUN/pytest.ini" <<'EOF'
[pytest]
testpaths = tests
addopts = -ra -p no:cacheprovider
markers =
    cuda: needs a CUDA device
    slow: longer end-to-end checks
EOF
cd "$RUN"
if [ "$TORCH" = system ]; then export PME_CHECK_INSTALL="$WORK/site"; else export PME_CHECK_INSTALL="$WORK/venv"; fi
export PME_REQUIRE_COMPILED=1
unset PME_REQUIRE_CUDA
HAS_GPU="$("$VPY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null | tail -1 || true)"
case "$LOCAL" in cu*) [ "$HAS_GPU" = 1 ] && export PME_REQUIRE_CUDA=1 ;; esac
"$VPY" - <<'EOF'
import os, sys, pme, torch
where = os.path.dirname(os.path.realpath(pme.__file__))
inst = os.environ["PME_CHECK_INSTALL"]
assert where.startswith(os.path.realpath(inst)), f"pme imported from {where}, not from {inst}"
i = pme.info()
print("check_wheel: pme imported from", where)
for k in ("version", "flavour", "backend", "built_cuda", "built_archs", "torch", "torch_cuda", "cuda_available",
          "device", "python", "load_error"):
    print(f"check_wheel:   {k:<14} {i[k]}")
assert i["backend"] == "compiled", f"pme runs on the reference: {i['load_error']}"
EOF
"$VPY" -m pme info > /dev/null  # the CLI entry point (python -m pme == pme)
log "pytest (PME_REQUIRE_COMPILED=1${PME_REQUIRE_CUDA:+ PME_REQUIRE_CUDA=1}) in $RUN"
exec "$VPY" -m pytest -q -p no:logging "$@"
