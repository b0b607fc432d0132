#!/usr/bin/env bash
# Tests of pme's collections against TorchRec and FBGEMM (tests/test_collection_torchrec.py) and of
# their sharding under TorchRec's DistributedModelParallel (tests/test_sharding.py: 2 and 4 spawned
# CPU processes over gloo, about 2 minutes on 2 cores).
# Creates .venv-torchrec/ (torch 2.14.1 + torchrec 1.9.2 + the CPU fbgemm-gpu 1.9.0, as
# /work/shared/MACHINES.md records), skipping installs already satisfied, builds pme's CPU kernels
# into it (PME_CPU_ONLY=1) and runs pytest on those files (extra arguments go to pytest).
# Env: PME_REBUILD=1 forces a clean build of the extension. PME_TORCHREC_INPLACE=1 skips that build
# and tests the source tree with the in-place binary scripts/test.sh built under .venv's torch
# (the stable ABI lets it run under torch 2.14.1): what CI does right after scripts/test.sh.
# Only needs what pip finds locally.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv-torchrec/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-torchrec
fi
VPY="$ROOT/.venv-torchrec/bin/python"
quiet() { grep -v "^WARNING: Location" || true; }
# torchrec's own dependency is the CUDA fbgemm-gpu, whose library does not load without a GPU
# driver; it is swapped for the CPU build after torchrec is in.
if ! "$VPY" -c "import torch, torchrec, fbgemm_gpu, pytest, hypothesis, numpy, ninja; assert torch.__version__.startswith('2.14.1')" \
    >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | quiet
  "$VPY" -m pip install -q torch==2.14.1 numpy pytest hypothesis ninja setuptools tensordict torchmetrics 2>&1 | quiet
  "$VPY" -m pip install -q torchrec==1.9.2 2>&1 | quiet
  "$VPY" -m pip uninstall -q -y fbgemm-gpu fbgemm-gpu-cpu 2>&1 | quiet
  "$VPY" -m pip install -q --no-deps fbgemm-gpu-cpu==1.9.0 2>&1 | quiet
fi
if [ "${PME_TORCHREC_INPLACE:-0}" = "1" ]; then
  if ! ls pme/_C*.so >/dev/null 2>&1; then
    echo "test_torchrec: PME_TORCHREC_INPLACE=1 but there is no in-place pme/_C*.so (run scripts/test.sh first)" >&2
    exit 1
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  LIB="$ROOT/build/torchrec-lib"
  if [ "${PME_REBUILD:-0}" = "1" ]; then
    rm -rf "$ROOT/build/torchrec-tmp" "$LIB"
  fi
  # Built out of place (build/torchrec-*), so that the in-place pme/_C*.so of .venv (torch 2.13)
  # stays untouched; incremental: only changed sources are recompiled.
  START=$(date +%s)
  LOG="$ROOT/build/torchrec-build.log"
  mkdir -p "$ROOT/build"
  if ! PME_CPU_ONLY=1 PME_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-1}" "$VPY" setup.py -q build_ext \
      --build-temp "$ROOT/build/torchrec-tmp" --build-lib "$LIB" >"$LOG" 2>&1; then
    cat "$LOG"
    echo "test_torchrec: building the extension failed (log above, also in $LOG)" >&2
    exit 1
  fi
  cp pme/*.py "$LIB/pme/"
  echo "test_torchrec: extension ready in $(( $(date +%s) - START )) s"
  export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$ROOT/tests"  # so that `import pme` is the build above, not the source tree
"$VPY" -c "import pme, torchrec, fbgemm_gpu; i = pme.info(); print('pme', i['version'], i['backend'], '| torch', i['torch'], '| fbgemm_gpu', fbgemm_gpu.__version__)"
PME_REQUIRE_COMPILED=1 exec "$VPY" -m pytest -q -p no:cacheprovider -p no:logging --rootdir "$ROOT" \
  -c "$ROOT/pyproject.toml" "$ROOT/tests/test_collection_torchrec.py" "$ROOT/tests/test_sharding.py" "$@"
