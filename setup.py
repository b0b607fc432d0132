"""Build pme's compiled extension `pme._C`.

Switches (environment variables):
  FORCE_CUDA=1           build the CUDA kernels or fail loudly (no GPU needs to be visible).
  PME_CPU_ONLY=1         build the CPU kernels only, even when torch and nvcc have CUDA.
  TORCH_CUDA_ARCH_LIST   e.g. "8.0;9.0+PTX"; default: sm_80/86/89/90 and sm_100/120 where this
                         nvcc can build them, PTX for the newest (see default_arch_list).
  MAX_JOBS               parallel compile jobs; default from CPU count and free memory.
  PME_LOCAL_VERSION      local version label (e.g. cpu, cu130) appended as "+label".
  PME_REQUIRE_EXTENSION=1  fail if the extension cannot be built (release builds and CI set it;
                         FORCE_CUDA=1 implies it). Default: a missing or failing compiler gives
                         an installation without `pme._C` that runs on the pure-PyTorch
                         reference, with a warning here and at `import pme`.
  PME_NO_EXTENSION=1     do not build the extension at all (pure-Python installation).
  DEBUG=1                -O0 -g.

Default: CUDA when `torch.version.cuda` is set and a CUDA toolkit (CUDA_HOME or nvcc on
PATH) is found; otherwise CPU only. Both target the LibTorch stable ABI
(TORCH_TARGET_VERSION 2.10) and the Python limited API (3.10), so one wheel serves every
torch >= 2.10 and every CPython >= 3.10 of its flavour. Release wheels: scripts/build_wheel.sh.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "0x020a000000000000"  # 2.10.0: only the stable surface of torch >= 2.10
PY_LIMITED = "0x030A0000"  # CPython 3.10
# Default CUDA targets: Ampere (A100, RTX 30), Ada (L4/L40, RTX 40), Hopper (H100/H200),
# Blackwell (B200/GB200 sm_100, RTX 50/RTX PRO sm_120). SASS for sm_X.y also runs on sm_X.z, z > y.
WANTED_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"setup.py: {msg}", file=sys.stderr, flush=True)


def _version():
    ns = {}
    with open(os.path.join(ROOT, "pme", "_version.py")) as f:
        exec(f.read(), ns)
    v = ns["__version__"]
    local = os.environ.get("PME_LOCAL_VERSION", "").lstrip("+")
    return f"{v}+{local}" if local else v


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True, stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _nvcc_sms(cuda_home):
    """The sm_XY codes this nvcc can build ({'8.0', '9.0', ...}), or None if it cannot say."""
    try:
        out = subprocess.check_output(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-code"], text=True, stderr=subprocess.DEVNULL
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    sms = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)", out)}
    return sms or None


def resolve_cuda_home(cuda_home):
    """A toolkit root that has include/cuda_runtime.h. torch guesses the root as `which nvcc`/../..,
    wrong when nvcc on PATH is a wrapper or a link (/usr/local/bin/nvcc -> /usr/local/cuda-X/bin);
    then ask nvcc where it really lives (`nvcc --dryrun` prints `_HERE_=<root>/bin`)."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return cuda_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return cuda_home
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "x.cu")
            open(src, "w").close()
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "x.o")], text=True, capture_output=True
            ).stderr
    except OSError:
        return cuda_home
    m = re.search(r"_HERE_=(\S+)", out)
    if m:
        root = os.path.dirname(os.path.realpath(m.group(1)))
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return cuda_home


def default_arch_list(nvcc_version, supported=None):
    """sm_80/86/89/90 and sm_100/120 where this nvcc can build them, PTX for the newest (forward
    compatibility: the driver JIT-compiles it for GPUs newer than the newest SASS).
    `supported` is nvcc's own list (`nvcc --list-gpu-code`); without it, go by the version."""
    major, minor = nvcc_version
    if supported is not None:
        archs = [a for a in WANTED_ARCHS if a in supported]
    else:
        archs = ["8.0", "8.6"]
        if (major, minor) >= (11, 8):
            archs += ["8.9", "9.0"]
        if (major, minor) >= (12, 8):
            archs += ["10.0", "12.0"]
    if not archs:
        raise ValueError(f"nvcc {major}.{minor} builds none of {', '.join(WANTED_ARCHS)}")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def archs_label(archs):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", or space-separated) as the comma-separated list baked
    into the binary: pme.info() parses the build info as "key=value;key=value;...", so no ';'."""
    return ",".join(a for a in re.split(r"[;,\s]+", archs) if a)


def _available_mem_gib():
    """MemAvailable, capped by the cgroup (v2 or v1) memory limit of a container."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    avail = int(info["MemAvailable"].split()[0]) * 1024
    for limit_f, usage_f in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            avail = min(avail, int(limit) - usage)
        break
    return max(0, avail) / 2**30


def default_max_jobs(cores=None, mem_gib=None, gib_per_job=2.0):
    """One job per core, but no more than available memory / 2 GiB (nvcc with cub peaks near
    that), and at least one."""
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if mem_gib is None:
        try:
            mem_gib = _available_mem_gib()
        except (OSError, KeyError, ValueError):
            return max(1, cores)
    return max(1, min(cores, int(mem_gib // gib_per_job)))


def _compiler_works(cxx):
    """Whether the C++ compiler torch will use can compile an object file."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int pme_probe() { return 0; }\n")
        try:
            r = subprocess.run(
                [*cxx.split(), "-c", src, "-o", os.path.join(tmp, "probe.o")], capture_output=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


NO_EXTENSION_WARNING = """
========================================================================================
pme: {why}
pme is installed WITHOUT its compiled kernels (pme._C); `import pme` works on the slow
pure-PyTorch reference and warns. To get the kernels: install a prebuilt wheel of your
flavour (README.md, "Build"), or install a C++ compiler (and nvcc for CUDA) and reinstall
with `pip install --no-build-isolation --no-cache-dir --force-reinstall pme`.
Set PME_REQUIRE_EXTENSION=1 to make this an error instead.
========================================================================================
"""


def get_extensions():
    """(ext_modules, cmdclass). Empty ext_modules when the extension is not to be built."""
    cmdclass = {}
    if _flag("PME_NO_EXTENSION"):
        _say("PME_NO_EXTENSION=1: pure-Python installation (pure-PyTorch reference, no pme._C)")
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if set(sys.argv[1:]) & {"sdist", "egg_info", "dist_info"}:
            return [], cmdclass  # metadata and the source distribution need no torch
        sys.exit(
            f"setup.py: pme needs torch at build time ({e}). Install torch first, then "
            "`pip install --no-build-isolation .`"
        )

    debug = _flag("DEBUG")
    force_cuda = _flag("FORCE_CUDA")
    cpu_only = _flag("PME_CPU_ONLY")
    strict = force_cuda or _flag("PME_REQUIRE_EXTENSION")
    if force_cuda and cpu_only:
        sys.exit("setup.py: FORCE_CUDA=1 and PME_CPU_ONLY=1 contradict each other")

    cxx_cmd = os.environ.get("CXX", "c++")
    if not _compiler_works(cxx_cmd):
        why = f"no working C++ compiler (CXX={cxx_cmd!r} cannot compile a test file)"
        if strict:
            sys.exit(f"setup.py: {why}; PME_REQUIRE_EXTENSION=1 (or FORCE_CUDA=1) makes this an error")
        _say(NO_EXTENSION_WARNING.format(why=why))
        return [], cmdclass

    cuda_home = None
    nvcc_version = None
    if not cpu_only and torch.version.cuda is not None:
        cuda_home = resolve_cuda_home(cpp_extension.CUDA_HOME)
        if cuda_home and cuda_home != cpp_extension.CUDA_HOME:
            _say(f"CUDA toolkit root: {cuda_home} (torch guessed {cpp_extension.CUDA_HOME})")
            cpp_extension.CUDA_HOME = cuda_home  # include/lib paths are read from this at build time
            os.environ["CUDA_HOME"] = cuda_home
        nvcc_version = _nvcc_version(cuda_home) if cuda_home else None
    use_cuda = not cpu_only and torch.version.cuda is not None and nvcc_version is not None
    if force_cuda and not use_cuda:
        why = []
        if torch.version.cuda is None:
            why.append(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
        if nvcc_version is None:
            why.append(f"no working nvcc under CUDA_HOME={cuda_home!r} (set CUDA_HOME to the toolkit root)")
        sys.exit("setup.py: FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(why))
    if use_cuda and torch.version.cuda.split(".")[0] != str(nvcc_version[0]):
        msg = f"nvcc {nvcc_version[0]}.{nvcc_version[1]} does not match the CUDA major of torch ({torch.version.cuda})"
        if force_cuda:
            sys.exit("setup.py: " + msg)
        _say(f"warning: {msg}; building CPU only")
        use_cuda = False

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET}", f"-DPy_LIMITED_API={PY_LIMITED}"]
    cxx = opt + defines + ["-std=c++17", "-fvisibility=hidden"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    kwargs = dict(py_limited_api=True, include_dirs=[os.path.join(ROOT, "csrc")])

    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(nvcc_version, _nvcc_sms(cuda_home))
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        build = [f'-DPME_CUDA_ARCHS="{archs_label(archs)}"', f"-DPME_CUDA_VERSION={nvcc_version[0]}.{nvcc_version[1]}"]
        cxx += ["-DPME_WITH_CUDA", "-DUSE_CUDA"] + build
        nvcc = (
            opt
            + defines
            + ["-DPME_WITH_CUDA", "-DUSE_CUDA", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
            + build
        )
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        depends += sorted(glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))
        _say(
            f"building CPU + CUDA kernels (torch {torch.__version__}, CUDA_HOME {cuda_home}, nvcc "
            f"{nvcc_version[0]}.{nvcc_version[1]}, archs {archs}, MAX_JOBS={os.environ['MAX_JOBS']})"
        )
        ext = cpp_extension.CUDAExtension(
            "pme._C", sources, depends=depends, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs
        )
    else:
        _say(f"building CPU kernels only (torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = cpp_extension.CppExtension("pme._C", sources, depends=depends, extra_compile_args={"cxx": cxx}, **kwargs)

    class build_ext(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed compile leaves a reference-only installation, except when
        strict or building in place (`pip install -e .`, `setup.py develop`): a developer wants the error."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - CompileError, LinkError, ninja's RuntimeError, OSError
                if strict or self.inplace or getattr(self, "editable_mode", False):
                    raise
                _say(
                    NO_EXTENSION_WARNING.format(why=f"building the compiled extension failed: {type(e).__name__}: {e}")
                )
                self.extensions = []

    cmdclass["build_ext"] = build_ext
    return [ext], cmdclass


if __name__ == "__main__":
    ext_modules, cmdclass = get_extensions()
    setup(
        version=_version(),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
    )
