"""Builds the `orthrus_ext` torch extension: CPU kernels always, CUDA kernels when possible.

CUDA is built when torch was built with CUDA and nvcc is found (CUDA_HOME / PATH). ORTHRUS_CUDA=0 or 1
forces it off or on (on fails loudly if it cannot be built). CUDA builds need the CUTLASS headers:
CUTLASS_DIR, else the `cutlass_library` package (pip install nvidia-cutlass); see third_party/README.md.
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:
    raise SystemExit("orthrus: install torch first, then build this package again") from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def relative_sources(pattern: str) -> list[str]:
    # setuptools wants sources relative to the project root.
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


def cuda_requested() -> bool:
    forced = os.environ.get("ORTHRUS_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        raise SystemExit(f"orthrus: ORTHRUS_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} was built without CUDA")
    elif CUDA_HOME is None:  # torch only looks for nvcc when it has CUDA itself
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if forced == "1" and missing:
        raise SystemExit("orthrus: ORTHRUS_CUDA=1 but " + "; ".join(missing))
    return not missing


def cutlass_include_dir() -> str:
    tried = []
    if os.environ.get("CUTLASS_DIR"):
        root = os.environ["CUTLASS_DIR"]
        tried += [os.path.join(root, "include"), root]
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is not None and spec.origin is not None:
            tried.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    for candidate in tried:
        if os.path.isfile(os.path.join(candidate, "cutlass", "cutlass.h")):
            return candidate
    raise SystemExit(
        "orthrus: the CUDA build needs the CUTLASS headers (cutlass/cutlass.h, cute/). Set CUTLASS_DIR to a "
        "CUTLASS checkout or `pip install nvidia-cutlass`, or build without CUDA (ORTHRUS_CUDA=0). "
        f"Looked in: {tried or 'nothing (CUTLASS_DIR unset, cutlass_library not installed)'}"
    )


def extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = relative_sources("csrc/torch/*.cpp") + relative_sources("csrc/cpu/*.cpp")
    # No -std for C++: torch picks the standard its headers need (C++17 or C++20); the kernels are C++17.
    # -g0: the kernels need no debug info, and it halves the compile time and the library size.
    # -ffp-contract=off: no fused multiply-adds the code did not ask for, so every code path of a kernel
    # rounds identically (row invariance).
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off"]
    if sys.platform.startswith("linux"):
        # The CPU kernels run on torch's intra-op pool through at::parallel_for, whose OpenMP body is
        # compiled into this module: without -fopenmp it would run on one thread. Nothing is added at link
        # time, so the GOMP symbols bind to the libgomp torch already loaded: one OpenMP runtime, one pool.
        cxx_flags.append("-fopenmp")
    if not cuda_requested():
        return CppExtension("orthrus_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})
    cuda_sources = relative_sources("csrc/cuda/*.cu")
    if not cuda_sources:
        raise SystemExit("orthrus: CUDA build requested but csrc/cuda/ has no .cu sources")
    include_dirs.append(cutlass_include_dir())
    nvcc_flags = [
        "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DORTHRUS_WITH_CUDA",
        "-gencode=arch=compute_90a,code=sm_90a",
        # torch disables the half/bfloat16 operators for its own sources; the kernels are torch-free and
        # must compile exactly as in the CMake build.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    return CUDAExtension("orthrus_ext._C", sources + cuda_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags + ["-DORTHRUS_WITH_CUDA"], "nvcc": nvcc_flags})


# orthrus_ext's Python side lives in csrc/ so that a source checkout on sys.path (pytest run from the
# repository root) cannot shadow the installed package that holds the compiled _C module.
setup(
    packages=find_packages(include=["orthrus", "orthrus.*"]) + ["orthrus_ext"],
    package_dir={"orthrus_ext": "csrc/orthrus_ext"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
