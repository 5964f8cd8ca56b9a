"""Every CUDA kernel file compiles with the machine's nvcc, warnings as errors, for each GPU
generation we ship: no GPU and no CUDA torch needed (the .cu files include no torch headers)."""
import functools
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")

# What torch.utils.cpp_extension passes to nvcc, plus our setup.py flags.
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "-Xcompiler", "-fPIC,-Wall,-Werror", "-Werror", "all-warnings"]


@functools.lru_cache(maxsize=None)
def nvcc_archs():
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def test_there_are_kernel_files():
    assert KERNEL_FILES, "csrc/cuda/*.cu not found"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize("arch", ["70", "75", "80", "90"])
@pytest.mark.parametrize("source", KERNEL_FILES, ids=os.path.basename)
def test_kernels_compile(source, arch, tmp_path):
    if f"compute_{arch}" not in nvcc_archs():
        pytest.skip(f"this nvcc cannot build for sm_{arch} (CUDA 13 starts at sm_75)")
    obj = tmp_path / (os.path.basename(source) + f".sm{arch}.o")
    cmd = [NVCC, *FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c", source,
           "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)}\n{log}"
    assert "warning" not in log.lower(), log
    assert obj.stat().st_size > 0
