"""Build of surgellm_kernels and its extension ``surgellm_kernels._C``.

Install with ``pip install --no-build-isolation -e .`` (an isolated build
would download another torch). The extension holds:

* csrc/library.cpp: the library and the small pybind11 module whose import
  loads it;
* csrc/<op>/<op>.cpp and <op>_kernels.cpp: each op's schemas, checks and
  autograd, and its kernels' entry points (dtype dispatch, launches);
  csrc/common/*.cpp: what they share;
* csrc/<op>/<op>_cpu.cpp: CPU kernels, compiled once per CPU capability
  (DEFAULT, and AVX2 / AVX512 on x86-64) with that capability's -m flags and
  picked at run time, as ATen does for its own kernels;
* csrc/<op>/<op>_cuda.cu: CUDA kernels, when torch has CUDA and nvcc is found
  (TORCH_CUDA_ARCH_LIST is honoured by torch's build helper).

CMakeLists.txt globs the same folders for the standalone build.
"""

import glob
import os
import platform
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    include_paths,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CPU_KERNELS = sorted(glob.glob(os.path.join(CSRC, "*", "*_cpu.cpp")))
CUDA_KERNELS = sorted(glob.glob(os.path.join(CSRC, "*", "*_cuda.cu")))
OPS = sorted(set(glob.glob(os.path.join(CSRC, "*", "*.cpp"))) - set(CPU_KERNELS))
HEADERS = sorted(glob.glob(os.path.join(CSRC, "**", "*.h*"), recursive=True))
# -ffp-contract=off: the kernels round as written -- one rounding where they
# call fmadd, two elsewhere -- instead of wherever the compiler chooses to
# contract (which differs between capability builds, and between the scalar
# combine steps and the vector loops). --fmad=false is the same for nvcc,
# whose default contracts: there x * g - mu became fma(x, g, -mu), so the
# rounding of u = x * g leaked into u - mu, and a constant feature's y into
# that rounding over eps.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
LINK_FLAGS = ["-lgomp"]
# SURGELLM_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer
# (scripts/sanitize.sh builds that way into its own directory).
if os.environ.get("SURGELLM_SANITIZE", "0") == "1":
    SANITIZE = [
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=undefined",
        "-g",
    ]
    CXX_FLAGS = ["-O1", *CXX_FLAGS[1:], *SANITIZE]
    LINK_FLAGS = [*LINK_FLAGS, *SANITIZE]


def compiler_compiles(source: str, flags: list) -> bool:
    """Whether the C++ compiler compiles the file `source` with `flags`."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    try:
        probe = subprocess.run([*cxx, *flags, "-c", "-o", os.devnull, source], capture_output=True)
    except OSError:
        return False
    return probe.returncode == 0


# The flags ATen compiles its AVX2 / AVX512 kernels with; AVX512 also with
# avx512_bf16's instructions where the compiler takes them, run only where the
# processor has them (kAvx512Bf16Rounding, cpu_dispatch.h).
if platform.machine().lower() in ("x86_64", "amd64"):
    AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    AVX512_BF16 = ["-mavx512bf16"]
    probe = os.path.join(CSRC, "common", "avx512_bf16_probe.cc")
    if not compiler_compiles(probe, AVX512_FLAGS + AVX512_BF16):
        AVX512_BF16 = []
    CAPABILITIES = {
        "DEFAULT": [],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
        "AVX512": AVX512_FLAGS + AVX512_BF16,
    }
    if AVX512_BF16:
        CXX_FLAGS.append("-DSURGELLM_AVX512_BF16")
else:
    CAPABILITIES = {"DEFAULT": []}


def with_cuda() -> bool:
    if os.environ.get("SURGELLM_NO_CUDA", "0") == "1" or os.environ.get("SURGELLM_SANITIZE") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


class BuildWithCpuCapabilities(BuildExtension):
    """Compiles each CPU kernel source once per capability, then links them
    into the extension with the rest (setuptools has no per-object flags)."""

    def build_extension(self, ext):
        ext.extra_objects = list(ext.extra_objects or []) + self._cpu_kernel_objects()
        super().build_extension(ext)

    def _cpu_kernel_objects(self):
        cxx = os.environ.get("CXX", "c++")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        base = [cxx, "-c", "-fPIC", *CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        base += [f"-I{CSRC}"] + [f"-I{p}" for p in include_paths()]
        jobs, objects = [], []
        # rebuild when a header or this file (its flags) changed
        newest_header = max([os.path.getmtime(h) for h in HEADERS] + [os.path.getmtime(__file__)])
        for cap, flags in CAPABILITIES.items():
            for src in CPU_KERNELS:
                name = os.path.splitext(os.path.basename(src))[0]
                obj = os.path.join(self.build_temp, "cpu_kernels", f"{name}.{cap}.o")
                objects.append(obj)
                if os.path.exists(obj) and os.path.getmtime(obj) > max(
                    os.path.getmtime(src), newest_header
                ):
                    continue
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                jobs.append(
                    (
                        f"{os.path.relpath(src, ROOT)} ({cap})",
                        base
                        + [
                            f"-DCPU_CAPABILITY={cap}",
                            f"-DCPU_CAPABILITY_{cap}",
                            *flags,
                            src,
                            "-o",
                            obj,
                        ],
                    )
                )
        workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            runs = pool.map(
                lambda job: subprocess.run(job[1], capture_output=True, text=True), jobs
            )
            for i, ((label, _), proc) in enumerate(zip(jobs, runs), 1):
                if proc.returncode != 0:
                    raise RuntimeError(f"compiling {label} failed:\n{proc.stderr}")
                print(f"[cpu kernels {i}/{len(jobs)}] {label}", flush=True)
        return objects


def extension():
    sources = [os.path.join(CSRC, "library.cpp")] + OPS
    define_macros = []
    extra = {"cxx": CXX_FLAGS}
    if with_cuda():
        sources += CUDA_KERNELS
        define_macros.append(("SURGELLM_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++17", "--fmad=false"]
        ctor = CUDAExtension
    else:
        ctor = CppExtension
    return ctor(
        name="surgellm_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[CSRC],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=LINK_FLAGS,
    )


# SURGELLM_SKIP_EXTENSION=1: the package without its extension (scripts/
# bootstrap.sh installs it editable that way and builds the extension in
# place, incrementally, with `setup.py build_ext --inplace`).
SKIP_EXTENSION = os.environ.get("SURGELLM_SKIP_EXTENSION", "0") == "1"

setup(
    name="surgellm_kernels",
    version="0.2.0",
    description="Fused kernels for SURGELLM: the sigmoid surgical gate and instance-weighted "
    "normalization",
    packages=find_packages(include=["surgellm_kernels", "surgellm_kernels.*"]),
    # Tested: Python 3.11 / torch 2.13 / Triton 3.9 / transformers 5.25 (CI); the
    # kernels also on the GPU machines' Python 3.12 / torch 2.11 / Triton 3.6.
    python_requires=">=3.10,<3.14",
    # The kernels need torch and numpy; the SURGELLM application (its model,
    # training and evaluation) transformers with Trainer's own needs.
    install_requires=[
        "torch>=2.4,<3",
        "numpy",
        "transformers>=5.0,<6",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "scikit-learn>=1.3,<2",
        "regex>=2024.4",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0,<4"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "test": ["pytest"],
    },
    ext_modules=[] if SKIP_EXTENSION else [extension()],
    cmdclass={"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=True)},
    zip_safe=False,
)
