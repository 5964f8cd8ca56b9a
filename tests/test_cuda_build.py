"""Every CUDA kernel file compiles with the machine's nvcc, warnings as errors, for each GPU
generation we ship: no GPU and no CUDA torch needed (the .cu files include no torch headers).
ptxas's report (-v) must show no register spills in the elementwise kernels
(csrc/cuda/mos_linear_elementwise.cuh), which are memory-bound: a spill is memory traffic they
exist to avoid. The tensor binding (csrc/cuda/mos_linear_cuda.cpp) is type-checked against the
torch headers and the toolkit's runtime headers, so an API mismatch shows here, not at a GPU
user's install."""
import functools
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
BINDING = os.path.join(ROOT, "csrc", "cuda", "mos_linear_cuda.cpp")
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++"))

# What torch.utils.cpp_extension passes to nvcc, plus our setup.py flags.
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "-Xcompiler", "-fPIC,-Wall,-Werror", "-Werror", "all-warnings"]


# The kernels that wrap the elementwise units, and the file that defines them.
ELEMENTWISE_KERNELS = ("combine_kernel", "expert_grad_kernel", "column_sum_kernel",
                       "finish_kernel")
ELEMENTWISE_SOURCE = "mos_linear_kernels.cu"


def ptxas_report(log):
    """{mangled kernel name: (registers, spill store bytes, spill load bytes)} from ptxas -v."""
    report = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        if name and spills and registers:
            report[name.group(1)] = (int(registers.group(1)), int(spills.group(1)),
                                     int(spills.group(2)))
    return report


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
    cmd = [NVCC, *FLAGS, "-Xptxas", "-v", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-c", source, "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)}\n{log}"
    assert "warning" not in log.lower(), log
    assert obj.stat().st_size > 0
    if os.path.basename(source) == ELEMENTWISE_SOURCE:
        report = ptxas_report(log)
        ours = {name: usage for name, usage in report.items()
                if any(kernel in name for kernel in ELEMENTWISE_KERNELS)}
        # combine, column sums and finish per dtype, the gradient epilogue per dtype and W_a
        assert len(ours) == 4 * 5, f"elementwise kernels in ptxas's report: {sorted(ours)}"
        spilled = {name: usage for name, usage in ours.items() if usage[1] or usage[2]}
        assert not spilled, f"sm_{arch}: (registers, spill store, spill load bytes): {spilled}"


def cuda_include_dir():
    """The toolkit's include folder: from CUDA_HOME, torch's guess, nvcc's own folder (nvcc may
    be a wrapper script on PATH), or /usr/local/cuda."""
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME,
             os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


@pytest.mark.skipif(NVCC is None or CXX is None, reason="needs a CUDA toolkit (for its runtime "
                    "headers) and a C++ compiler on PATH")
def test_binding_compiles_against_torch_headers(tmp_path):
    cuda_include = cuda_include_dir()
    if cuda_include is None:
        pytest.skip("nvcc is on PATH but no include/cuda_runtime.h was found; set CUDA_HOME")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], cuda_include]
    # The CPU wheel ships c10/cuda's headers without the one CMake generates for CUDA builds;
    # it only says that c10_cuda is a shared library.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in includes):
        shim = tmp_path / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-DMOS_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes), BINDING]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)}\n{log}"
    ours = [line for line in log.splitlines() if os.path.join("csrc", "cuda") in line and
            "warning" in line]
    assert not ours, "\n".join(ours)
