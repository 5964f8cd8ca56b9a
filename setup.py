"""Builds mos_kernels._C: the C++ CPU kernels always; the CUDA kernels (csrc/cuda/) when CUDA torch
and a CUDA toolkit are present, or FORCE_CUDA=1. Install with `pip install --no-build-isolation`."""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if not build_cuda():
        return CppExtension("mos_kernels._C", sources, extra_compile_args={"cxx": cxx})
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++17", "--use_fast_math"]
    return CUDAExtension("mos_kernels._C", sources, define_macros=[("MOS_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    name="mos-kernels",
    version="0.1.0",
    description="Fused kernels for Mixture-of-Supernets linear layers",
    packages=find_packages(include=["mos_kernels", "mos_kernels.*", "mos_models", "mos_models.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
