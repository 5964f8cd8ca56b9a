"""Builds mos_kernels._C: the C++ CPU kernels always; the CUDA kernels (csrc/cuda/) when CUDA torch
and a CUDA toolkit are present, or FORCE_CUDA=1. Install with `pip install --no-build-isolation`.
The project's metadata, dependencies and extras are in pyproject.toml; this file only builds."""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("mos-kernels builds its extension against the torch you have installed: install "
             "torch first (e.g. pip install -r requirements.txt), then pip install "
             "--no-build-isolation --no-deps -e .")


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvcc_version():
    """(major, minor) of the CUDA toolkit's nvcc, or of torch's CUDA when nvcc cannot be run."""
    try:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
        out = subprocess.run([nvcc, "--version"],
                             capture_output=True, text=True, check=True).stdout
        match = re.search(r"release (\d+)\.(\d+)", out)
        if match:
            return int(match.group(1)), int(match.group(2))
    except (OSError, subprocess.CalledProcessError):
        pass
    if torch.version.cuda:
        return tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    return (12, 0)


def default_arch_list() -> str:
    """Volta (V100) where the toolkit still builds for it (CUDA 12 does; CUDA 13 starts at 7.5),
    Turing (T4), Ampere and Hopper, plus Hopper PTX for newer GPUs to JIT-compile."""
    archs = ["7.5", "8.0", "9.0+PTX"]
    return ";".join((["7.0"] if nvcc_version() < (13, 0) else []) + archs)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a serial loop unless the extension itself is compiled with OpenMP
        # (ATen/ParallelOpenMP.h); linked with -fopenmp, it binds to the libgomp.so.1 torch loads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not build_cuda():
        return CppExtension("mos_kernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    # TORCH_CUDA_ARCH_LIST, when set, wins (e.g. "9.0" for a quick build on one H100).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++17", "--use_fast_math"]
    return CUDAExtension("mos_kernels._C", sources, define_macros=[("MOS_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
