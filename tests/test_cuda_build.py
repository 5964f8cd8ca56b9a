"""Every CUDA kernel file compiles with the machine's nvcc, warnings as errors, for each GPU
generation we ship: no GPU and no CUDA torch needed (the .cu files include no torch headers).
ptxas's report (-v) must show no register spills in the elementwise kernels
(csrc/cuda/mos_linear_elementwise.cuh), which are memory-bound: a spill is memory traffic they
exist to avoid. The tensor binding (csrc/cuda/mos_linear_cuda.cpp) is type-checked against the
torch headers and the toolkit's runtime headers, so an API mismatch shows here, not at a GPU
user's install.

The pipelined one-pass kernels (pipelined_gemm_kernel, csrc/cuda/mos_linear_pipeline.cuh) are
also checked from the compiled code (cuobjdump): no spills or local memory, registers and shared
memory that let at least two blocks of 256 threads share an SM, and, on sm_75, at most
MAX_PER_HMMA SASS instructions per HMMA in the main loop (the k-loop: the innermost loop, ended by
a backward branch, that holds the HMMAs). `python3 tests/test_cuda_build.py [archs]` prints these
figures per kernel."""
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
BINDING = os.path.join(ROOT, "csrc", "cuda", "mos_linear_cuda.cpp")
NVCC = shutil.which("nvcc")


def find_cuobjdump():
    """cuobjdump from PATH, beside nvcc, or the copy Triton ships (any recent one reads the
    cubins of these architectures)."""
    candidates = [shutil.which("cuobjdump")]
    if NVCC:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(NVCC)), "cuobjdump"))
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CUOBJDUMP = find_cuobjdump()
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


# Objects of the compiles below, removed when the process exits.
BUILD_DIR = tempfile.TemporaryDirectory(prefix="mos_cuda_build_")


@functools.lru_cache(maxsize=None)
def compile_kernels(source, arch, defines=()):
    """(command, return code, nvcc and ptxas log, object file) of one compile, cached: the build
    and SASS tests share it."""
    tag = "".join(f".{d}" for d in defines)
    obj = os.path.join(BUILD_DIR.name, os.path.basename(source) + f".sm{arch}{tag}.o")
    cmd = [NVCC, *FLAGS, *(f"-D{d}" for d in defines), "-Xptxas", "-v", "-gencode",
           f"arch=compute_{arch},code=sm_{arch}", "-c", source, "-o", obj]
    result = subprocess.run(cmd, capture_output=True, text=True)
    return " ".join(cmd), result.returncode, result.stdout + result.stderr, obj


def skip_unless_arch(arch):
    if f"compute_{arch}" not in nvcc_archs():
        pytest.skip(f"this nvcc cannot build for sm_{arch} (CUDA 13 starts at sm_75)")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize("arch", ["70", "75", "80", "90"])
@pytest.mark.parametrize("source", KERNEL_FILES, ids=os.path.basename)
def test_kernels_compile(source, arch):
    skip_unless_arch(arch)
    cmd, code, log, obj = compile_kernels(source, arch)
    assert code == 0, f"{cmd}\n{log}"
    assert "warning" not in log.lower(), log
    assert os.path.getsize(obj) > 0
    if os.path.basename(source) == ELEMENTWISE_SOURCE:
        report = ptxas_report(log)
        ours = {name: usage for name, usage in report.items()
                if any(kernel in name for kernel in ELEMENTWISE_KERNELS)}
        # combine, column sums and finish per dtype, the gradient epilogue per dtype and W_a
        assert len(ours) == 4 * 5, f"elementwise kernels in ptxas's report: {sorted(ours)}"
        spilled = {name: usage for name, usage in ours.items() if usage[1] or usage[2]}
        assert not spilled, f"sm_{arch}: (registers, spill store, spill load bytes): {spilled}"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")
def test_sm70_wmma_path_compiles():
    """The sm_70 form of the pipelined kernels (WMMA on padded stages), which CUDA 13 cannot
    build for sm_70, compiled for sm_75 with MOS_PIPELINE_WMMA: it must compile cleanly and not
    spill."""
    skip_unless_arch("75")
    source = os.path.join(ROOT, "csrc", "cuda", ELEMENTWISE_SOURCE)
    cmd, code, log, _ = compile_kernels(source, "75", ("MOS_PIPELINE_WMMA",))
    assert code == 0, f"{cmd}\n{log}"
    assert "warning" not in log.lower(), log
    ours = {n: u for n, u in ptxas_report(log).items() if PIPELINED in n and "6__half" in n}
    assert len(ours) == 2 * 4, sorted(ours)
    spilled = {n: u for n, u in ours.items() if u[1] or u[2]}
    assert not spilled, spilled


# ------------------------------------------------------------------ SASS of the pipelined kernels

PIPELINED = "pipelined_gemm_kernel"
MAX_PER_HMMA = 10
# Per SM: registers, shared memory a block may use (reserved per block), threads.
SM_LIMITS = {"75": (65536, 65536, 0, 1024), "80": (65536, 167936, 1024, 2048),
             "90": (65536, 233472, 1024, 2048)}
THREADS = 256

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"^BRA(?:\.\S+)?\s+.*?0x([0-9a-f]+)")


def demangle_kernel(name):
    """(dtype, direction, held experts) of a pipelined kernel's mangled name."""
    args = re.search(r"pipelined_gemm_kernelI(\w+?)Lb([01])ELi(\d+)E", name)
    dtype = "fp16" if args.group(1).endswith("6__half") else "bf16"
    return dtype, "dx" if args.group(2) == "1" else "forward", int(args.group(3))


def sass_functions(obj):
    """{mangled name: [(address, instruction)]} from cuobjdump -sass."""
    out = subprocess.run([CUOBJDUMP, "-sass", obj], capture_output=True, text=True, check=True)
    functions, current = {}, None
    for line in out.stdout.splitlines():
        name = re.search(r"Function : (\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
        elif current is not None:
            match = SASS_LINE.search(line)
            if match:
                current.append((int(match.group(1), 16), match.group(2).strip()))
    return functions


def opcode(instruction):
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0] if instruction else ""


def main_loop(code):
    """(instructions, HMMAs, the loop's instructions) of the innermost loop holding HMMAs: the
    range from a backward branch's target to the branch. None if there is no such loop."""
    best = None
    for index, (address, instruction) in enumerate(code):
        branch = BRANCH.match(re.sub(r"^@!?U?P\w+\s+", "", instruction))
        if not branch or int(branch.group(1), 16) > address:
            continue
        target = int(branch.group(1), 16)
        body = [ins for addr, ins in code[:index + 1] if addr >= target]
        body = [ins for ins in body if opcode(ins) != "NOP"]
        hmma = sum(opcode(ins).startswith("HMMA") for ins in body)
        if hmma and (best is None or len(body) < len(best[2])):
            best = (len(body), hmma, body)
    return best


def resource_usage(obj):
    """{mangled name: {REG, SHARED, LOCAL, STACK}} from cuobjdump -res-usage."""
    out = subprocess.run([CUOBJDUMP, "-res-usage", obj], capture_output=True, text=True,
                         check=True)
    usage, current = {}, None
    for line in out.stdout.splitlines():
        name = re.search(r"Function (\S+):", line)
        if name:
            current = name.group(1)
        elif current is not None and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return usage


def blocks_per_sm(arch, registers, shared):
    """Resident 256-thread blocks an SM holds: registers (allocated 256 a warp), shared
    memory (plus what the SM reserves per block) and threads."""
    reg_file, smem, reserved, threads = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = reg_file // (per_warp * THREADS // 32)
    by_smem = smem // (shared + reserved) if shared + reserved else threads // THREADS
    return min(by_regs, by_smem, threads // THREADS)


@functools.lru_cache(maxsize=None)
def pipelined_report(arch):
    """{(dtype, direction, held): figures} of the pipelined kernels compiled for sm_arch."""
    source = os.path.join(ROOT, "csrc", "cuda", ELEMENTWISE_SOURCE)
    cmd, code, log, obj = compile_kernels(source, arch)
    assert code == 0, f"{cmd}\n{log}"
    spills = ptxas_report(log)
    usage = resource_usage(obj)
    report = {}
    for name, code_lines in sass_functions(obj).items():
        if PIPELINED not in name:
            continue
        key = demangle_kernel(name)
        if key[0] == "bf16" and arch == "75":
            continue  # bf16 needs sm_80: a trapping stub
        use = usage[name]
        loop = main_loop(code_lines)
        report[key] = dict(
            registers=use["REG"], shared=use["SHARED"], local=use.get("LOCAL", 0),
            stack=use.get("STACK", 0), spill_stores=spills[name][1], spill_loads=spills[name][2],
            blocks_per_sm=blocks_per_sm(arch, use["REG"], use["SHARED"]),
            loop_instructions=loop[0] if loop else None, loop_hmma=loop[1] if loop else None,
            per_hmma=round(loop[0] / loop[1], 2) if loop else None,
            loop_ldg=sum(opcode(i).startswith("LDG") for i in loop[2]) if loop else None,
            loop_local=sum(opcode(i) in ("LDL", "STL") for i in loop[2]) if loop else None)
    return report


needs_sass = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None,
                                reason="needs nvcc and cuobjdump")


@needs_sass
@pytest.mark.parametrize("arch", ["75", "80", "90"])
def test_pipelined_kernels_fit_two_blocks_an_sm_without_spills(arch):
    skip_unless_arch(arch)
    report = pipelined_report(arch)
    # fp16 (and bf16 from sm_80): forward and dx, 2, 4 or 8 experts held, or the general kernel
    assert len(report) == (2 if arch == "75" else 4) * 4, sorted(report)
    for key, r in report.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0, (key, r)
        assert r["blocks_per_sm"] >= 2, (key, r)
        if arch == "75":
            assert r["shared"] <= 32 * 1024, (key, r)


@needs_sass
def test_pipelined_main_loop_sm75_instructions_per_hmma():
    """sm_75, fp16, fast kernels: the k-loop issues at most MAX_PER_HMMA instructions per HMMA
    (its HMMA.1688s: 32 a warp and step) and touches no local memory."""
    skip_unless_arch("75")
    report = pipelined_report("75")
    for key, r in report.items():
        if key[2] == 0:
            continue  # the general kernel: masked element loads, for odd layouts only
        assert r["loop_hmma"] % 32 == 0, (key, r)  # whole steps (ptxas may unroll by two)
        assert r["per_hmma"] <= MAX_PER_HMMA, (key, r)
        assert r["loop_local"] == 0, (key, r)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize("arch", ["75", "80", "90"])
def test_weight_grad_kernel_does_not_spill(arch):
    """The one-pass weight gradient (two blocks an SM by its launch bounds) keeps its tiles in
    registers: 32 tokens a step leave room for the WMMA fragments and the staged tiles."""
    skip_unless_arch(arch)
    source = os.path.join(ROOT, "csrc", "cuda", ELEMENTWISE_SOURCE)
    cmd, code, log, _ = compile_kernels(source, arch)
    assert code == 0, f"{cmd}\n{log}"
    ours = {n: u for n, u in ptxas_report(log).items() if "weight_grad_kernel" in n}
    assert len(ours) == 4, sorted(ours)
    spilled = {n: u for n, u in ours.items() if u[1] or u[2]}
    assert not spilled, spilled


def print_report(archs):
    for arch in archs:
        for key, r in sorted(pipelined_report(arch).items()):
            print(f"sm_{arch}", *key, *(f"{k}={v}" for k, v in r.items()))


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


if __name__ == "__main__":
    print_report(sys.argv[1:] or ["75", "80", "90"])
