"""Compiles the Triton backend's kernels ahead of time for NVIDIA GPUs, without a GPU.

Triton's interpreter (how the tests run these kernels on CPU tensors) executes the Python with
NumPy and never lowers it, so it cannot see what only the compiler rejects, nor what a tile
configuration costs in shared memory and registers. triton.compile with an explicit target needs
no device: this script compiles every kernel variant the backend launches (dtype, strategy
flags, autotune configuration) to a cubin for each target and prints one JSON line per
compile: dynamic shared memory, registers and spill stack per thread (from the bundled
cuobjdump), and the shared memory the backend's config pruner estimates for it.

    python tests/triton_compile.py [--targets 90 80] [--dtypes bfloat16 float16 float32]
        [--experts 2] [--all-configs] [--precisions ieee tf32] > out.jsonl

Run with TRITON_INTERPRET unset: kernels defined under the interpreter cannot be compiled.
tests/test_triton_compile.py runs it in a subprocess.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/triton_compile.py: unset TRITON_INTERPRET (interpreted kernels do not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from mos_kernels.backends import triton_backend as tb  # noqa: E402

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}
# Pointer arguments of each kernel in the input dtype; Parts and S hold the accumulation type.
INPUT_POINTERS = {"X", "E", "Beta", "Bias", "Y", "DY", "DX", "G", "DE", "W", "MixedBias", "DBeta",
                  "DBias"}
ACC_POINTERS = {"Parts", "S"}
# Unit strides of contiguous inputs: Triton specialises an integer argument equal to 1 into a
# constant unless the kernel says not to, so these compile as the common launch does.
UNIT_STRIDES = {"stride_xk", "stride_e2", "stride_dyo", "stride_gk"}


def kernel_cases(dtype, m, all_configs, precisions):
    """(name, JIT function, constants, configs, the pruner's shared-memory estimate in elements
    or None) per kernel variant the backend launches for this dtype and number of experts."""
    acc, dot = tb._types(dtype)
    if dtype != torch.float32:
        precisions = ["ieee"]  # the only one half and double dots take
    first = (lambda configs: configs) if all_configs else (lambda configs: configs[:1])
    out = []
    for precision in precisions:
        common = dict(M=m, ACC=acc, DOT=dot, PRECISION=precision)
        out.append((f"forward[{precision}]", tb._forward_kernel, common,
                    first(tb._GEMM_CONFIGS), tb._gemm_shared))
        out.append((f"grad_input[{precision}]", tb._grad_input_kernel, common,
                    first(tb._GEMM_CONFIGS), tb._grad_input_shared))
        for from_g, want_w in ((False, False), (True, False), (True, True)):
            out.append((f"weight_grad[{precision},from_g={from_g},want_w={want_w}]",
                        tb._weight_grad_kernel, dict(common, FROM_G=from_g, WANT_W=want_w),
                        first(tb._WGRAD_CONFIGS), tb._wgrad_shared))
    out.append(("combine", tb._combine_kernel, dict(M=m, ACC=acc), first(tb._COMBINE_CONFIGS),
                None))
    out.append(("beta_bias_grad", tb._beta_bias_grad_kernel, dict(M=m, ACC=acc, BLOCK=128),
                [triton.Config({}, num_warps=4)], None))
    return out


def signature(fn, constants, dtype):
    acc = "fp64" if dtype == torch.float64 else "fp32"
    sig = {}
    for arg in fn.arg_names:
        if arg in constants:
            sig[arg] = "constexpr"
        elif arg in INPUT_POINTERS:
            sig[arg] = "*" + TRITON_TYPES[dtype]
        elif arg in ACC_POINTERS:
            sig[arg] = "*" + acc
        else:
            sig[arg] = "i32"
    return sig


def resource_usage(cubin):
    """(registers, stack bytes) per thread of the cubin's one function, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(item.split(":") for item in text.split() if item.count(":") == 1
                  and item.split(":")[1].isdigit())
    return int(fields["REG"]), int(fields["STACK"])


def compile_one(fn, constants, config, dtype, arch):
    constants = dict(constants, **config.kwargs)
    constants.update({s: 1 for s in UNIT_STRIDES if s in fn.arg_names})
    sig = signature(fn, constants, dtype)
    # What a launch with 16-byte aligned tensors and sizes and strides that are multiples of 16
    # specialises on (the arguments the kernel does not exempt).
    exempt = {fn.arg_names[a] if isinstance(a, int) else a for a in fn.do_not_specialize}
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if sig[arg].startswith("*") or (sig[arg] == "i32" and arg not in exempt)}
    source = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=aligned)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": config.num_warps, "num_stages": config.num_stages})
    return triton.compile(source, target=target, options=options.__dict__)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--experts", type=int, default=2, help="m, the number of experts")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotune configuration (default: the first, which small "
                             "problems take)")
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32"],
                        help="fp32 dot precisions (exact, or TF32 when torch allows it)")
    args = parser.parse_args(argv)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, kernel, constants, configs, estimate in kernel_cases(
                dtype, args.experts, args.all_configs, args.precisions):
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            for config in configs:
                for arch in args.targets:
                    tiles = dict(config.kwargs, num_warps=config.num_warps,
                                 num_stages=config.num_stages)
                    row = dict(kernel=name, dtype=dtype_name, m=args.experts, arch=arch,
                               config=tiles)
                    try:
                        compiled = compile_one(fn, constants, config, dtype, arch)
                    except Exception as exc:  # noqa: BLE001  reported, the test fails on it
                        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    else:
                        registers, stack = resource_usage(compiled.asm["cubin"])
                        row.update(shared=compiled.metadata.shared, registers=registers,
                                   stack=stack)
                        if estimate is not None:
                            row["estimate"] = estimate(config.kwargs, config.num_stages,
                                                       args.experts) * dtype.itemsize
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
