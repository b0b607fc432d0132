#!/usr/bin/env bash
# Compile-only check of the CUDA kernels on a machine without a GPU (CI): builds pme._C with
# FORCE_CUDA=1 against torch 2.14.1 (the CUDA 13.0 build) and nvcc 13.0 into a scratch folder,
# then imports it and checks that every operator has a CUDA kernel registered.
# Env: PME_CUDA_ARCHS (default 9.0: one arch keeps it to a few minutes on 2 cores).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  echo "check_cuda_build: no nvcc on PATH; skipping the CUDA compile check" >&2
  exit 0
fi
export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
if [ ! -x .venv-cu/bin/python ]; then
  python3 -m venv .venv-cu
fi
VPY="$ROOT/.venv-cu/bin/python"
# pip's exit status kept (pipefail); grep -v exits 1 when it has nothing to print
"$VPY" -m pip install -q torch==2.14.1 numpy setuptools wheel ninja 2>&1 | { grep -v "^WARNING: Location" || [ $? -eq 1 ]; }
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
OUT="$(mktemp -d)"
START=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${PME_CUDA_ARCHS:-9.0}" "$VPY" setup.py -q build_ext \
  --build-temp "$OUT/tmp" --build-lib "$OUT/lib"
echo "check_cuda_build: compiled in $(( $(date +%s) - START )) s"
cp -r pme/*.py "$OUT/lib/pme/"
cd "$OUT/lib"
"$VPY" - <<'PY'
import torch, pme
info = pme.info()
assert info["backend"] == "compiled", info
assert info["built_cuda"] not in (None, "none"), info
ops = ["bag_forward", "bag_backward", "bag_backward_sparse", "embedding_forward", "embedding_backward",
       "sparse_update_", "accumulate_scores_", "topk_threshold", "prune_counts", "prune_pack",
       "collection_forward", "collection_backward", "collection_update_", "sparse_adam_"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pme::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"check_cuda_build: ok: CUDA {info['built_cuda']}, archs {info['built_archs']}, {len(ops)} operators "
      f"with CUDA kernels (torch {info['torch']}, no GPU needed)")
PY
rm -rf "$OUT"
