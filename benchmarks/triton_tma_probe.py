"""Whether TMA would shorten the Triton one-pass forward's main loop on sm_90: compiles, without
a GPU, the backend's forward (pointer loads, cp.async) beside two variants that read x and the
experts through TMA descriptors (built in the kernel by tl.make_tensor_descriptor, or passed
from the host), and prints the instructions per k-iteration per warp of each main loop (as
tests/triton_compile.py counts them) and of a plain Triton matmul of the same tile.

The variants mix as the backend does beyond RELATIVE_MAX_EXPERTS (beta_0 E_0, then one fma per
further expert, packed in the input dtype), and the backend's forward is compiled in that form
too: a TMA box holds one expert's rows, so the relative form's per-row choice of expert cannot
be a TMA load. Re-run it when Triton changes (docs/results.md, "Triton one-pass kernels").

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/triton_tma_probe.py [--configs 4 9] [--experts 2]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import triton_compile as tc  # noqa: E402
from mos_kernels.backends import triton_backend as tb  # noqa: E402


@triton.jit
def _forward_tiles(x_desc, e_desc, Beta, Y, T, n_out, n_in, stride_bo, stride_bi, stride_yt,
                   M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """The SWAP forward (no bias) of one tile, x and the experts read through descriptors, mixed
    as the backend's _mix_tile mixes."""
    pid_t, pid_n = tb._grouped_tile(T, n_out, BLOCK_T, BLOCK_N, GROUP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    beta_rows = Beta + tl.minimum(cols, n_out - 1) * stride_bo
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        x = x_desc.load([pid_t * BLOCK_T, k0])
        w = tl.load(beta_rows)[:, None] * \
            e_desc.load([0, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K)
        for i in tl.static_range(1, M):
            e = e_desc.load([i, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K)
            w = tl.fma(tl.load(beta_rows + i * stride_bi)[:, None], e, w)
        acc = tl.dot(w, tl.trans(x), acc)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tl.store(Y + rows[None, :] * stride_yt + cols[:, None], acc.to(Y.dtype.element_ty),
             mask=(rows < T)[None, :] & (cols < n_out)[:, None])


@triton.jit(do_not_specialize=["T"])
def forward_device_descriptors(X, E, Beta, Y, T, n_out, n_in, stride_xt, stride_e0, stride_e1,
                               stride_bo, stride_bi, stride_yt, M: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """With descriptors made in the kernel."""
    tl.assume(n_in > 0)
    x_desc = tl.make_tensor_descriptor(X, [T, n_in], [stride_xt, 1], [BLOCK_T, BLOCK_K])
    e_desc = tl.make_tensor_descriptor(E, [M, n_out, n_in], [stride_e0, stride_e1, 1],
                                       [1, BLOCK_N, BLOCK_K])
    _forward_tiles(x_desc, e_desc, Beta, Y, T, n_out, n_in, stride_bo, stride_bi, stride_yt, M,
                   BLOCK_T, BLOCK_N, BLOCK_K, GROUP)


@triton.jit(do_not_specialize=["T"])
def forward_host_descriptors(x_desc, e_desc, Beta, Y, T, n_out, n_in, stride_bo, stride_bi,
                             stride_yt, M: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """With descriptors made on the host (triton.tools.tensor_descriptor)."""
    tl.assume(n_in > 0)
    _forward_tiles(x_desc, e_desc, Beta, Y, T, n_out, n_in, stride_bo, stride_bi, stride_yt, M,
                   BLOCK_T, BLOCK_N, BLOCK_K, GROUP)


def _loop(compiled):
    return tc.loop_stats(tc.sass(compiled.asm["cubin"]))["instructions"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, nargs="+", default=[4, 9],
                        help="indices in triton_backend._GEMM_CONFIGS")
    parser.add_argument("--experts", type=int, default=2)
    args = parser.parse_args(argv)
    m, dtype = args.experts, torch.bfloat16
    print("| tile T x N x K, warps, stages | pointers (backend) | device descriptors | "
          "host descriptors | plain |\n|---|---|---|---|---|")
    for index in args.configs:
        config = tb._GEMM_CONFIGS[index]
        c = config.kwargs
        ours = tc.compile_one(tb._forward_kernel, dict(
            M=m, ACC=tl.float32, DOT=tl.bfloat16, PRECISION="ieee", WIDE=False, SWAP=True,
            RELATIVE=False), config, dtype, 90)
        device = tc.compile_one(forward_device_descriptors, dict(M=m), config, dtype, 90)
        host = tc.compile_one(forward_host_descriptors, dict(M=m), config, dtype, 90, types=dict(
            x_desc=f"tensordesc<bf16[{c['BLOCK_T']},{c['BLOCK_K']}]>",
            e_desc=f"tensordesc<bf16[1,{c['BLOCK_N']},{c['BLOCK_K']}]>"))
        plain, units = tc.plain_case("forward", config)
        yardstick = tc.compile_one(tc.plain_matmul, plain, triton.Config(
            {}, num_warps=config.num_warps, num_stages=config.num_stages), dtype, 90, units)
        print(f"| {c['BLOCK_T']}x{c['BLOCK_N']}x{c['BLOCK_K']}, {config.num_warps}, "
              f"{config.num_stages} | {_loop(ours)} | {_loop(device)} | {_loop(host)} | "
              f"{_loop(yardstick)} |")


if __name__ == "__main__":
    main()
