"""Compiles the Triton backend's kernels ahead of time for NVIDIA GPUs, without a GPU.

Triton's interpreter (how the tests run these kernels on CPU tensors) executes the Python with
NumPy and never lowers it, so it cannot see what only the compiler rejects, nor what a tile
configuration costs in shared memory and registers. triton.compile with an explicit target needs
no device: this script compiles every kernel variant the backend launches (dtype, strategy
flags, autotune configuration) to a cubin for each target and prints one JSON line per
compile: dynamic shared memory, registers and spill stack per thread (from the bundled
cuobjdump), and the shared memory the backend's config pruner estimates for it. For the one-pass
GEMM kernels (forward, grad_input) it also reads the main loop from the SASS (loop_stats): its
instructions per k-iteration per warp, tensor-core instructions, shared-memory stores, local
memory traffic and wgmma waits; and compiles a plain Triton matmul of the same tile, warps and
stages (plain_matmul) as the yardstick for the instruction count.

    python tests/triton_compile.py [--targets 90 80] [--dtypes bfloat16 float16 float32]
        [--experts 2] [--all-configs] [--precisions ieee tf32] > out.jsonl
    python tests/triton_compile.py --sass-table [--experts 2 6] ...   # a markdown table

Run with TRITON_INTERPRET unset: kernels defined under the interpreter cannot be compiled.
tests/test_triton_compile.py runs it in a subprocess.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/triton_compile.py: unset TRITON_INTERPRET (interpreted kernels do not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
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
GEMM_KERNELS = ("forward", "grad_input")


@triton.jit(do_not_specialize=["rows"])
def plain_matmul(A, B, C, rows, cols, depth, stride_ar, stride_ad, stride_bc, stride_bd,
                 stride_cr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 GROUP: tl.constexpr):
    """C (rows, cols) = A (rows, depth) @ B (cols, depth)^T: the loop of Triton's matmul
    tutorial, with the one-pass kernels' clamped edges, 32-bit offsets and tile order. The
    yardstick of their main loops (never launched)."""
    pid_r, pid_c = tb._grouped_tile(rows, cols, BLOCK_R, BLOCK_C, GROUP)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    a_offsets = tl.minimum(r, rows - 1)[:, None] * stride_ar + d[None, :] * stride_ad
    b_offsets = d[:, None] * stride_bd + tl.minimum(c, cols - 1)[None, :] * stride_bc
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, depth, BLOCK_D):
        d_ok = d < depth - d0
        a = tl.load(A + d0 * stride_ad + a_offsets, mask=d_ok[None, :], other=0.0)
        b = tl.load(B + d0 * stride_bd + b_offsets, mask=d_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + r[:, None] * stride_cr + c[None, :], acc.to(C.dtype.element_ty),
             mask=(r < rows)[:, None] & (c < cols)[None, :])


def plain_case(kernel, config):
    """(constants, unit strides) of the plain matmul that does a one-pass kernel's GEMM with
    the same tile: forward y = x W^T (reduction over n_in, BLOCK_K); grad_input dx = dy W
    (reduction over n_out, BLOCK_N, W's rows read with stride K_max)."""
    c = config.kwargs
    if kernel.startswith("forward"):
        return (dict(BLOCK_R=c["BLOCK_T"], BLOCK_C=c["BLOCK_N"], BLOCK_D=c["BLOCK_K"],
                     GROUP=c["GROUP"]), {"stride_ad", "stride_bd"})
    return (dict(BLOCK_R=c["BLOCK_T"], BLOCK_C=c["BLOCK_K"], BLOCK_D=c["BLOCK_N"],
                 GROUP=c["GROUP"]), {"stride_ad", "stride_bc"})


def kernel_cases(dtype, m, all_configs, precisions, layerwise=False):
    """(name, JIT function, constants, configs, the pruner's shared-memory estimate in elements
    or None) per kernel variant the backend launches for this dtype and number of experts;
    layerwise: dx's variant for layer-wise beta (rows of stride 0) in place of its other."""
    acc, dot = tb._types(dtype)
    if dtype != torch.float32:
        precisions = ["ieee"]  # the only one half and double dots take
    first = (lambda configs: configs) if all_configs else (lambda configs: configs[:1])
    out = []
    for precision in precisions:
        common = dict(M=m, ACC=acc, DOT=dot, PRECISION=precision)
        # 32-bit offsets, as every launch that fits int32; SWAP as the backend sets it per sm
        one_pass = dict(common, WIDE=False, SWAP=None)
        out.append((f"forward[{precision}]", tb._forward_kernel, dict(one_pass, RELATIVE=None),
                    first(tb._GEMM_CONFIGS), tb._gemm_shared))
        grad_input = dict(one_pass, BETA_WORDS=False if layerwise else None,
                          LAYERWISE=layerwise)
        out.append((f"grad_input{'_layerwise' if layerwise else ''}[{precision}]",
                    tb._grad_input_kernel, grad_input, first(tb._GEMM_CONFIGS),
                    tb._grad_input_shared))
        if not all_configs:  # 64-bit offsets, for tensors of 2^31 elements or more
            wide = dict(one_pass, WIDE=True)
            out.append((f"forward_wide[{precision}]", tb._forward_kernel,
                        dict(wide, RELATIVE=None),
                        tb._GEMM_CONFIGS[:1], tb._gemm_shared))
            out.append((f"grad_input{'_layerwise' if layerwise else ''}_wide[{precision}]",
                        tb._grad_input_kernel,
                        dict(grad_input, WIDE=True), tb._GEMM_CONFIGS[:1],
                        tb._grad_input_shared))
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
        elif arg == "Beta" and constants.get("BETA_WORDS"):
            sig[arg] = "*i32"  # beta's rows as int32 words of two experts (triton_backend._Dims)
        elif arg in INPUT_POINTERS or fn is plain_matmul and arg in "ABC":
            sig[arg] = "*" + TRITON_TYPES[dtype]
        elif arg in ACC_POINTERS:
            sig[arg] = "*" + acc
        else:
            sig[arg] = "i32"
    return sig


def _cuobjdump(cubin, flag):
    """The bundled cuobjdump's output for ``cubin`` with ``flag``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin):
    """(registers, stack bytes) per thread of the cubin's one function, from cuobjdump."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    fields = dict(item.split(":") for item in text.split() if item.count(":") == 1
                  and item.split(":")[1].isdigit())
    return int(fields["REG"]), int(fields["STACK"])


def sass(cubin):
    """The cubin's SASS text, from the bundled cuobjdump."""
    return _cuobjdump(cubin, "-sass")


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_MMA = ("HMMA", "HGMMA")


def loop_stats(text):
    """The main loop of a GEMM kernel's SASS: the innermost backward branch's range that holds
    tensor-core instructions. Returns its instruction count (NOPs left out: that is
    instructions per k-iteration per warp, as the loop is not unrolled), its tensor-core
    instructions (HMMA/HGMMA), shared-memory stores (STS), local memory accesses (LDL/STL), and
    the pending-group counts of its wgmma waits (WARPGROUP.DEPBAR.LE gsb0, N). None if no loop
    holds a tensor-core instruction. wgmma_register_a: per wgmma of the loop, whether its A
    operand comes from registers. half_width: packed half multiplies and fmas (HMUL2, HFMA2)
    whose two factors are both one half of a register (R4.H0_H0): one element's work in a
    two-element instruction."""
    code, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            address = int(ins.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            code.append((address, re.sub(r"^@!?U?P[T0-9]+\s+", "", ins.group(2))))
    loops = []
    for address, ins in code:
        if not ins.startswith("BRA"):
            continue
        target = re.search(r"\((\.L_x_\d+)\)", ins)
        start = labels.get(target.group(1)) if target else None
        if start is None:
            hexa = re.search(r"0x([0-9a-f]+)", ins)
            start = int(hexa.group(1), 16) if hexa else None
        if start is not None and start <= address:
            body = [i for a, i in code if start <= a <= address]
            if any(i.startswith(_MMA) for i in body):
                loops.append(body)
    if not loops:
        return None
    body = min(loops, key=len)
    opcodes = [i.split()[0] for i in body]
    waits = [int(m.group(1), 16) for i in body
             for m in [re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", i)] if m]
    # wgmma's A operand: a register (R88) when it comes from registers, gdesc[...] from shared
    register_a = [i.split(None, 1)[1].split(",")[1].strip().startswith("R") for i in body
                  if i.startswith("HGMMA")]
    half = re.compile(r"\.H[01]_H[01]$")
    half_width = sum(1 for i in body if i.startswith(("HMUL2", "HFMA2")) and all(
        half.search(f.strip()) for f in i.split(None, 1)[1].split(",")[1:3]))
    return dict(instructions=sum(op != "NOP" for op in opcodes), half_width=half_width,
                mma=sum(op.startswith(_MMA) for op in opcodes), wgmma_register_a=register_a,
                sts=sum(op.startswith("STS") for op in opcodes),
                local=sum(op.startswith(("LDL", "STL")) for op in opcodes),
                wgmma_waits=waits)


def compile_one(fn, constants, config, dtype, arch, units=None, types=None):
    """``fn`` compiled for ``arch`` with ``constants`` and ``config``'s tiles; ``units``: the
    stride arguments to specialise as 1 (default UNIT_STRIDES); ``types``: argument types that
    override signature()'s (a tensor descriptor's, say)."""
    constants = dict(constants, **config.kwargs)
    if "SWAP" in constants and constants["SWAP"] is None:
        constants["SWAP"] = arch >= 90
    if "RELATIVE" in constants and constants["RELATIVE"] is None:  # as _Dims.forward
        constants["RELATIVE"] = constants["M"] <= tb.RELATIVE_MAX_EXPERTS
    if "BETA_WORDS" in constants and constants["BETA_WORDS"] is None:  # as _Dims.beta_words
        constants["BETA_WORDS"] = constants["SWAP"] and dtype.itemsize == 2 and \
            constants["M"] % 2 == 0
    constants.update({s: 1 for s in (UNIT_STRIDES if units is None else units)
                      if s in fn.arg_names})
    sig = dict(signature(fn, constants, dtype), **(types or {}))
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


def compile_rows(dtype_name, m, targets, all_configs, precisions, plain_cache, kernels=None,
                 indices=None, layerwise=False):
    """One row per compile of every kernel variant (see the module docstring); ``kernels``:
    only those whose names start with one of these; ``indices``: only these configs."""
    dtype = getattr(torch, dtype_name)
    for name, kernel, constants, configs, estimate in kernel_cases(dtype, m, all_configs,
                                                                   precisions, layerwise):
        if kernels and not name.startswith(tuple(kernels)):
            continue
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        if indices is not None:
            configs = [c for i, c in enumerate(configs) if i in indices]
        for config in configs:
            for arch in targets:
                tiles = dict(config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages)
                row = dict(kernel=name, dtype=dtype_name, m=m, arch=arch, config=tiles)
                try:
                    compiled = compile_one(fn, constants, config, dtype, arch)
                except Exception as exc:  # noqa: BLE001  reported, the test fails on it
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    yield row
                    continue
                registers, stack = resource_usage(compiled.asm["cubin"])
                row.update(shared=compiled.metadata.shared, registers=registers, stack=stack)
                if estimate is not None:
                    row["estimate"] = estimate(config.kwargs, config.num_stages, m) * \
                        dtype.itemsize
                if name.startswith(GEMM_KERNELS):
                    row["loop"] = loop_stats(sass(compiled.asm["cubin"]))
                if name.startswith(GEMM_KERNELS) and dtype in (torch.float16, torch.bfloat16):
                    # the yardstick: half-precision inputs, fp32 accumulation
                    plain, units = plain_case(name, config)
                    key = (arch, dtype_name, tuple(sorted(plain.items())), config.num_warps,
                           config.num_stages, tuple(sorted(units)))
                    if key not in plain_cache:
                        yardstick = compile_one(plain_matmul, plain, triton.Config(
                            {}, num_warps=config.num_warps, num_stages=config.num_stages),
                            dtype, arch, units)
                        cubin = yardstick.asm["cubin"]
                        plain_registers, plain_stack = resource_usage(cubin)
                        plain_cache[key] = dict(loop_stats(sass(cubin)) or {},
                                                registers=plain_registers, stack=plain_stack)
                    row["plain"] = plain_cache[key]
                yield row


def sass_table(rows):
    """Markdown: per GEMM kernel compile, ours / plain instructions per k-iteration per warp."""
    lines = ["| sm | dtype | m | kernel | tile T x N x K, warps, stages | ours | plain | "
             "ours / plain | registers (plain) | spill bytes | MMA per iteration (plain) | "
             "wgmma waits in loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "plain" not in r:
            continue
        c, loop, plain = r["config"], r["loop"] or {}, r["plain"]
        tile = (f"{c['BLOCK_T']}x{c['BLOCK_N']}x{c['BLOCK_K']}, {c['num_warps']}, "
                f"{c['num_stages']}")
        ours_n, plain_n = loop.get("instructions"), plain.get("instructions")
        ratio = f"{ours_n / plain_n:.2f}" if ours_n and plain_n else "-"
        waits = ",".join(map(str, loop.get("wgmma_waits", []))) or "-"
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['m']} | {r['kernel'].split('[')[0]} | "
                     f"{tile} | {ours_n} | {plain_n} | {ratio} | {r['registers']} "
                     f"({plain['registers']}) | {r['stack']} | {loop.get('mma')} "
                     f"({plain.get('mma')}) | {waits} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--experts", type=int, nargs="+", default=[2],
                        help="m, the number of experts (several: each)")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotune configuration (default: the first, which small "
                             "problems take)")
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32"],
                        help="fp32 dot precisions (exact, or TF32 when torch allows it)")
    parser.add_argument("--configs", type=int, nargs="+", default=None,
                        help="only these indices in the kernels' config lists")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="only the kernels whose names start with one of these")
    parser.add_argument("--layerwise", action="store_true",
                        help="dx's variant for layer-wise beta (rows of stride 0) in place of "
                             "its other")
    parser.add_argument("--sass-table", action="store_true",
                        help="print a markdown table of the one-pass GEMM kernels' main loops "
                             "against the plain matmul instead of JSON lines")
    args = parser.parse_args(argv)
    plain_cache, table = {}, []
    for dtype_name in args.dtypes:
        for m in args.experts:
            for row in compile_rows(dtype_name, m, args.targets, args.all_configs,
                                    args.precisions, plain_cache, args.kernels,
                                    args.configs, args.layerwise):
                if args.sass_table:
                    table.append(row)
                else:
                    print(json.dumps(row), flush=True)
    if args.sass_table:
        print(sass_table(sorted(table, key=lambda r: (-r["arch"], r["dtype"], r["m"],
                                                      r["kernel"]))))


if __name__ == "__main__":
    main()
