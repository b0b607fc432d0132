#!/usr/bin/env bash
# The GPU checks of issues 3, 4 and 6 (issue 10), in stages; the most important ones fit one call
# of the GPU machine of about 8 minutes (a task is lent 15 minutes of device time in all, the
# machine's start included). See --help.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/gpu_session.sh [--within SECONDS] STAGE [STAGE...]

--within SECONDS: a deadline for the whole call. Each stage's long command runs under `timeout`
with the smaller of its own cap and the time left, and a stage that finds under 10 s left is
skipped (reported as rc=124), so a call always ends in time to bring its logs back.

Here (no GPU):
  prep       download the test/benchmark dependencies for the GPU machine's Python (3.12) into
             wheelhouse/gpu-deps and build the +cu130 wheel into wheelhouse/ (about 6 minutes on
             2 cores; PME_PREP_WHEEL=0 skips the wheel). Then carry "wheelhouse" to the GPU machine.

On the GPU machine (torch 2.11.0+cu130, Python 3.12, no network), in this order:
  deps       install wheelhouse/gpu-deps into a --target folder (nothing of the system is changed)
  wheel      issue 6: install the carried +cu130 wheel (built against torch 2.14.1), show `pme info`
             and run the CUDA variants of the test suite (pytest -k cuda) against the installed copy
             under the machine's torch (PME_REQUIRE_CUDA=1; cap 240 s); the installed copy then
             serves the later stages
  suite      the rest of the test suite (pytest -k "not cuda") against the installed copy: with
             `wheel`, the whole suite
  build      build pme._C in place from this tree (sm_90 only, all cores) and use it for the later
             stages (instead of, or after, `wheel` when the kernels changed)
  selfcheck  scripts/selfcheck_cuda.py --quick (every CUDA operator against the CPU one)
  tests      the test suite from this tree with PME_REQUIRE_CUDA=1 (needs `build`)
  sanitize   compute-sanitizer memcheck and racecheck over a small selfcheck (cap 100 s each)
  bench1     benchmarks/bench_lookup.py on the headline configuration only (10M x 128, 16384 x 32,
             Zipf): pme, nn.EmbeddingBag dense / per size, the fused row-wise Adagrad step against
             sparse nn.EmbeddingBag + Adagrad, and the copy bandwidth (cap 150 s)
  bench      benchmarks/bench_lookup.py --configs gpu (PME_CUDA_VALIDATE=0): every method, the
             issue's five configurations; JSON + PNG into benchmarks/results/ and $OUT/results
  graph      the same for the headline, bf16 and latency configurations, forward timed as CUDA-graph
             replays (kernel time without launch overhead)
  profile    Nsight Compute (ncu.txt) on pme's forward, forward + backward and fused row-wise Adagrad
             step of the headline configuration
  compile    benchmarks/bench_compile.py on the GPU (1M and 10M rows, 16384 bags x 32): eager against
             torch.compile, torch.export, a module built in inference mode and a traced pme.ops call
             that scans its table (cap 150 s; $OUT/results/compile_cuda.json)

One call, most important first (carry "wheelhouse"; logs as they go: <stage>.log under $OUT, and
summary.txt; run with the device's timeout_s at about 540):
  bash scripts/gpu_session.sh --within 480 deps wheel bench1 sanitize suite
    wheel: issue 6's proof and every CUDA kernel against the oracle; bench1: the figures of the
    issue 3 and 4 targets; sanitize: memcheck and racecheck; suite: the CPU rest of the suite.
Later calls, if time is left: `--within 480 bench graph`, `--within 480 profile compile`. After a kernel
fix: `build tests` instead of `wheel suite`.
A failing stage is reported and the next one still runs; the exit status is that of the
first failure. State kept between calls on a warm machine: $PME_GPU_STATE (default /tmp/pme-gpu).
Env: PYTHON (default python3), OUT (default out/gpu), PME_GPU_PYVER (prep: the GPU machine's
Python, default 3.12), PME_GPU_WHEEL (wheel: the wheel to check, default wheelhouse/pme-*+cu13*),
TORCH_CUDA_ARCH_LIST / MAX_JOBS (build: default 9.0 / all cores).
EOF
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
DEADLINE=0
if [ "$1" = --within ]; then
  [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "--within takes a number of seconds, got '${2:-}'" >&2; exit 2; }
  DEADLINE=$(( $(date +%s) + $2 )); shift 2
fi
[ $# -ge 1 ] || { usage >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STATE="${PME_GPU_STATE:-/tmp/pme-gpu}"
OUT="${OUT:-$ROOT/out/gpu}"
mkdir -p "$STATE" "$OUT"
DEPS="$STATE/deps"
# which copy of pme the GPU stages use: the installed wheel or this tree (set by `wheel` / `build`)
live_path() { cat "$STATE/live" 2>/dev/null || echo "$ROOT"; }
use_pme() { export PYTHONPATH="$(live_path):$DEPS${PYTHONPATH:+:$PYTHONPATH}"; }
say() { echo "[gpu_session $(date +%H:%M:%S)] $*"; }
left() { if [ "$DEADLINE" -gt 0 ]; then echo $(( DEADLINE - $(date +%s) )); else echo 1000000; fi; }
# capped CAP CMD...: CMD under timeout, at most CAP seconds and never past the deadline
capped() {
  local cap=$1 l; shift
  l=$(left)
  [ "$l" -lt "$cap" ] && cap=$l
  if [ "$cap" -lt 10 ]; then say "no time left for: $*"; return 124; fi
  timeout "$cap" "$@"
}

stage_prep() {
  local VPY="$ROOT/.venv/bin/python"
  [ -x "$VPY" ] || VPY="$PY"
  rm -rf wheelhouse/gpu-deps && mkdir -p wheelhouse/gpu-deps
  # pure-Python or cp312 manylinux wheels; numpy, pytest and torch are on the GPU machine already
  "$VPY" -m pip download -q -d wheelhouse/gpu-deps --only-binary=:all: --python-version "${PME_GPU_PYVER:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any hypothesis sortedcontainers attrs tqdm matplotlib 2>&1 | grep -v "^WARNING: Location"
  "$VPY" -m pip download -q -d wheelhouse/gpu-deps --no-deps recbole 2>&1 | grep -v "^WARNING: Location"
  rm -f wheelhouse/gpu-deps/numpy-*.whl
  if [ "${PME_PREP_WHEEL:-1}" = 1 ]; then  # the release wheel (default arch list), as users get it
    rm -f wheelhouse/pme-*+cu13*.whl
    bash scripts/build_wheel.sh cu130 || return 1
  fi
  ls -la wheelhouse wheelhouse/gpu-deps
  du -sh wheelhouse
}

stage_deps() {
  rm -rf "$DEPS"
  "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" wheelhouse/gpu-deps/*.whl || return 1
  PYTHONPATH="$DEPS" "$PY" -c "import hypothesis, matplotlib, tqdm; print('deps ok: hypothesis', hypothesis.__version__)"
}

stage_wheel() {
  local whl
  whl="${PME_GPU_WHEEL:-$(ls wheelhouse/pme-*+cu13*-abi3-*.whl 2>/dev/null | head -1)}"
  [ -n "$whl" ] || { say "no +cu13x wheel in wheelhouse/ (run the prep stage here and carry wheelhouse)"; return 1; }
  rm -rf "$STATE/wheel"
  PME_FIND_LINKS="$ROOT/wheelhouse/gpu-deps" PME_CHECK_DIR="$STATE/wheel" PYTHON="$PY" \
    capped 240 bash scripts/check_wheel.sh "$whl" system -- -q -p no:logging -k cuda --junitxml="$OUT/wheel-junit.xml"
  local rc=$?
  [ -d "$STATE/wheel/site/pme" ] && echo "$STATE/wheel/site" > "$STATE/live"
  return $rc
}

stage_suite() {  # the tests `wheel` left out, in the folder check_wheel.sh copied them to
  [ -d "$STATE/wheel/run/tests" ] || { say "suite: run the wheel stage first"; return 1; }
  (
    cd "$STATE/wheel/run" || exit 1
    export PYTHONPATH="$STATE/wheel/site:$DEPS" PME_CHECK_INSTALL="$STATE/wheel/site"
    PME_REQUIRE_COMPILED=1 PME_REQUIRE_CUDA=1 capped 100000 "$PY" -m pytest -q -p no:logging -k "not cuda" \
      --junitxml="$OUT/suite-junit.xml"
  )
}

stage_build() {
  rm -rf build pme/_C*.so
  FORCE_CUDA=1 PME_REQUIRE_EXTENSION=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace || return 1
  echo "$ROOT" > "$STATE/live"
}

pme_info() {
  use_pme
  "$PY" -c "import pme, json; print(json.dumps(pme.info(), indent=1))"
}

stage_selfcheck() {
  use_pme
  pme_info && capped 200 "$PY" scripts/selfcheck_cuda.py --quick
}

stage_tests() {
  [ "$(live_path)" = "$ROOT" ] || { say "tests: this tree is not built (run the build stage)"; return 1; }
  use_pme
  PME_REQUIRE_COMPILED=1 PME_REQUIRE_CUDA=1 capped 100000 "$PY" -m pytest -q -p no:logging --junitxml="$OUT/tests-junit.xml"
}

stage_sanitize() {
  use_pme
  local cs
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  [ -n "$cs" ] || { say "no compute-sanitizer found"; return 1; }
  local rc=0
  for tool in memcheck racecheck; do
    say "compute-sanitizer --tool $tool"
    capped "${PME_SANITIZE_TIMEOUT:-100}" "$cs" --tool "$tool" --error-exitcode 9 --target-processes all \
      "$PY" scripts/selfcheck_cuda.py --quick || rc=1
  done
  return $rc
}

bench_run() {  # bench_lookup.py with the sync-free kernels; copies the new result files to $OUT
  use_pme
  mkdir -p "$OUT/results"
  touch "$STATE/bench.marker"
  # stop in time to copy what was measured (the JSON is saved per config)
  PME_CUDA_VALIDATE=0 capped "${BENCH_CAP:-540}" "$PY" benchmarks/bench_lookup.py "$@"
  local rc=$?
  [ $rc -eq 124 ] && say "bench_lookup stopped at its cap or the deadline; the JSON holds the configs done"
  find benchmarks/results -maxdepth 1 -type f -newer "$STATE/bench.marker" -exec cp {} "$OUT/results/" \;
  return $rc
}

stage_bench() {
  bench_run --configs gpu --max-seconds 2
}

stage_bench1() {
  BENCH_CAP=150 bench_run --configs machines_zipf --max-seconds 1 \
    --methods pme,eb_dense,per_size,pme_fused_rowwise_adagrad,eb_sparse_adagrad
}

stage_graph() {
  bench_run --configs machines_zipf,bf16,latency --cuda-graph --max-seconds 2 \
    --methods pme,eb_dense,per_size,pme_fused_rowwise_adagrad,eb_sparse_adagrad
}

stage_compile() {  # eager against compiled / exported / inference-mode calls on the GPU (bench_compile.py)
  use_pme
  mkdir -p "$OUT/results"
  capped 150 "$PY" benchmarks/bench_compile.py --device cuda --rows 1000000 10000000 --bags 16384 \
    --rounds 7 --out "$OUT/results/compile_cuda.json"
}

stage_profile() {
  use_pme
  local ncu
  ncu="$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)"
  [ -n "$ncu" ] || { say "no ncu found"; return 1; }
  # the headline configuration: a forward, a forward + backward and a fused row-wise Adagrad step,
  # profiled after warm-up (cudaProfilerStart/Stop bound what Nsight Compute sees)
  cat > "$STATE/profile_driver.py" <<'PY'
import torch, pme
V, D, B, L = 10_000_000, 128, 16384, 32
g = torch.Generator(device="cuda").manual_seed(0)
sizes = torch.tensor([16, 32, 64, 128], device="cuda")[torch.multinomial(
    torch.tensor([.55, .25, .15, .05], device="cuda"), V, replacement=True, generator=g)]
ranks = torch.arange(1, V + 1, device="cuda", dtype=torch.float64).pow(-1.05)
cdf = (ranks.cumsum(0) / ranks.sum()).float()
perm = torch.randperm(V, device="cuda", generator=g)
idx = perm[torch.searchsorted(cdf, torch.rand(B * L, device="cuda", generator=g)).clamp(max=V - 1)]
off = torch.arange(0, B * L, L, device="cuda")
emb = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes.cpu(), mode="sum", device="cuda")
fused = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes.cpu(), mode="sum", device="cuda",
                                  optimizer=pme.optim.RowwiseAdagrad(lr=0.01))
go = torch.randn(B, D, device="cuda", generator=g)
emb.weight.requires_grad_(True)
def run():
    with torch.no_grad():
        emb(idx, off)
    emb(idx, off).backward(go)
    fused(idx, off).backward(go)
for _ in range(3):
    run()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
run()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
PY
  PME_CUDA_VALIDATE=0 capped 400 "$ncu" --profile-from-start off --target-processes all \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats "$PY" "$STATE/profile_driver.py" > "$OUT/ncu.txt" 2>&1
  local rc=$?
  grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
    "$OUT/ncu.txt" | head -200
  return $rc
}

FIRST_FAIL=0
SUMMARY=()
for st in "$@"; do
  case "$st" in prep|deps|wheel|suite|build|selfcheck|tests|sanitize|bench1|bench|graph|profile|compile) ;; *)
    echo "unknown stage: $st" >&2; usage >&2; exit 2 ;; esac
  say "stage $st: start (log: $OUT/$st.log)"
  t0=$(date +%s)
  "stage_$st" > >(tee "$OUT/$st.log") 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  SUMMARY+=("$st: rc=$rc, ${dt} s")
  say "stage $st: rc=$rc after ${dt} s"
  [ $rc -ne 0 ] && [ $FIRST_FAIL -eq 0 ] && FIRST_FAIL=$rc
done
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
exit $FIRST_FAIL
