"""Build pme's compiled extension `pme._C`.

Switches (environment variables):
  FORCE_CUDA=1        build the CUDA kernels or fail loudly (no GPU needs to be visible).
  PME_CPU_ONLY=1      build the CPU kernels only, even when torch and nvcc have CUDA.
  TORCH_CUDA_ARCH_LIST e.g. "8.0;9.0+PTX"; default: every arch >= 8.0 the nvcc supports,
                      PTX for the newest.
  MAX_JOBS            parallel compile jobs; default from CPU count and free memory.
  PME_LOCAL_VERSION   local version label (e.g. cpu, cu130) appended as "+label".
  DEBUG=1             -O0 -g.

Default: CUDA when `torch.version.cuda` is set and a CUDA toolkit (CUDA_HOME or nvcc on
PATH) is found; otherwise CPU only. Both target the LibTorch stable ABI
(TORCH_TARGET_VERSION 2.10) and the Python limited API (3.10), so one wheel serves every
torch >= 2.10 and every CPython >= 3.10 of its flavour.
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "0x020a000000000000"  # 2.10.0: only the stable surface of torch >= 2.10
PY_LIMITED = "0x030A0000"  # CPython 3.10


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _version():
    ns = {}
    with open(os.path.join(ROOT, "pme", "_version.py")) as f:
        exec(f.read(), ns)
    v = ns["__version__"]
    local = os.environ.get("PME_LOCAL_VERSION", "")
    return f"{v}+{local}" if local else v


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_arch_list(nvcc_version):
    """Archs >= sm_80 that this nvcc can build, PTX for the newest (forward compatibility)."""
    major, minor = nvcc_version
    archs = ["8.0", "8.6"]
    if (major, minor) >= (11, 8):
        archs += ["8.9", "9.0"]
    if (major, minor) >= (12, 8):
        archs += ["10.0", "12.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def default_max_jobs():
    """One job per core, but no more than free memory / 2 GiB (nvcc peaks near that)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gib = int(info["MemAvailable"].split()[0]) / 2**20
        return max(1, min(cores, int(free_gib // 2)))
    except (OSError, KeyError, ValueError):
        return cores


def get_extensions():
    import torch
    from torch.utils import cpp_extension

    debug = _flag("DEBUG")
    force_cuda = _flag("FORCE_CUDA")
    cpu_only = _flag("PME_CPU_ONLY")
    if force_cuda and cpu_only:
        sys.exit("setup.py: FORCE_CUDA=1 and PME_CPU_ONLY=1 contradict each other")

    cuda_home = cpp_extension.CUDA_HOME
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
        msg = (f"nvcc {nvcc_version[0]}.{nvcc_version[1]} does not match the CUDA major of torch "
               f"({torch.version.cuda})")
        if force_cuda:
            sys.exit("setup.py: " + msg)
        print(f"setup.py: warning: {msg}; building CPU only", file=sys.stderr)
        use_cuda = False

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET}", f"-DPy_LIMITED_API={PY_LIMITED}"]
    cxx = opt + defines + ["-std=c++17", "-fvisibility=hidden"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(py_limited_api=True, include_dirs=[os.path.join(ROOT, "csrc")])

    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(nvcc_version)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        build = [f'-DPME_CUDA_ARCHS="{archs}"', f"-DPME_CUDA_VERSION={nvcc_version[0]}.{nvcc_version[1]}"]
        cxx += ["-DPME_WITH_CUDA", "-DUSE_CUDA"] + build
        nvcc = opt + defines + ["-DPME_WITH_CUDA", "-DUSE_CUDA", "-std=c++17", "--expt-relaxed-constexpr",
                                "-lineinfo"] + build
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        print(f"setup.py: building CPU + CUDA kernels (torch CUDA {torch.version.cuda}, nvcc "
              f"{nvcc_version[0]}.{nvcc_version[1]}, archs {archs}, MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = cpp_extension.CUDAExtension("pme._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                          **kwargs)
    else:
        print(f"setup.py: building CPU kernels only (torch {torch.__version__})")
        ext = cpp_extension.CppExtension("pme._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], cpp_extension.BuildExtension


ext_modules, build_ext = get_extensions()

setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
