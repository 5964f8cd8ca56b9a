"""Host time per call of the MoS linear op and MoSLinear against F.linear and nn.Linear.

At tiny shapes (default K = N = 16, T = 4, m = 2) the kernels take next to nothing, so what is
timed is the host's work per call: Python, argument checks, the dispatcher, autograd's
bookkeeping, allocations and launches. On a GPU a layer of an MT or BERT model runs forward and
backward in tens of microseconds, so this is the cost that decides whether training is
host-bound there; on the CPU every training step pays it too.

Cases (each forward with autograd recording, as in training, and forward + y.sum().backward()):
  F.linear             F.linear(x, W, b) on leaf tensors of the active shape
  mos_linear[b:s]      mos_kernels.mos_linear with backend b and strategy s, for every backend
                       that runs on the device and every strategy it takes (the plan it resolves
                       to is reported)
  nn.Linear            an nn.Linear(K, N)
  MoSLinear[b:s]       a MoSLinear(K, N) at full size, router included

Each repetition runs every case once, in a shuffled order, and times `--inner` calls back to
back (on CUDA followed by one synchronisation, so a sample is wall time per call); the table
shows medians and the ratios mos_linear / F.linear and MoSLinear / nn.Linear per mode.
Gradients are cleared between samples, outside the timing.

    python3 benchmarks/bench_host.py                       # CPU, one thread, the table
    python3 benchmarks/bench_host.py --json /tmp/host.json
    python3 benchmarks/bench_host.py --device cuda --json $OUT/host_cuda.json
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mos_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_op import git_commit  # noqa: E402


def make_cases(device, dtype, k, n, tokens, m):
    """{label: (kind, fn, leaves, plan)}: fn runs one forward and returns its output."""
    g = torch.Generator().manual_seed(0)

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device, dtype).requires_grad_(True)

    x = leaf(tokens, k)
    weight, bias = leaf(n, k, scale=k ** -0.5), leaf(n)
    experts, expert_bias = leaf(m, n, k, scale=k ** -0.5), leaf(m, n)
    beta = torch.randn(n, m, generator=g).softmax(-1).to(device, dtype).requires_grad_(True)
    cases = {"F.linear": ("F.linear", lambda: F.linear(x, weight, bias), [x, weight, bias],
                          None)}
    for backend in mos_kernels.available_backends(device):
        for strategy in mos_kernels.backend_strategies(backend):
            plan = mos_kernels.plan(x, experts, beta, expert_bias, backend=backend,
                                    strategy=strategy)

            def op(backend=backend, strategy=strategy):
                return mos_kernels.mos_linear(x, experts, beta, expert_bias, backend=backend,
                                              strategy=strategy)
            cases[f"mos_linear[{backend}:{strategy}]"] = (
                "mos_linear", op, [x, experts, beta, expert_bias], plan)

    linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
    cases["nn.Linear"] = ("nn.Linear", lambda: linear(x), [x, *linear.parameters()], None)
    for backend in mos_kernels.available_backends(device):
        for strategy in mos_kernels.backend_strategies(backend):
            layer = mos_kernels.MoSLinear(k, n, num_experts=m, backend=backend, strategy=strategy,
                                          device=device, dtype=dtype)
            plan = mos_kernels.plan(x, layer.experts, layer.router_scores(), layer.bias,
                                    backend=backend, strategy=strategy)
            cases[f"MoSLinear[{backend}:{strategy}]"] = (
                "MoSLinear", lambda layer=layer: layer(x), [x, *layer.parameters()], plan)
    return cases


def run(cases, modes, reps, inner, device):
    """Median seconds per call for every (label, mode)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(fn, leaves, mode):
        for t in leaves:
            t.grad = None
        sync()
        begin = time.perf_counter()
        if mode == "fwd":
            for _ in range(inner):
                fn()
        else:
            for _ in range(inner):
                fn().sum().backward()
        sync()
        return (time.perf_counter() - begin) / inner

    order = [(label, mode) for label in cases for mode in modes]
    for label, mode in order * 3:  # warm-up: allocator, first-call caches, Triton compiles
        sample(cases[label][1], cases[label][2], mode)
    times = {key: [] for key in order}
    for _ in range(reps):
        random.shuffle(order)
        for label, mode in order:
            times[(label, mode)].append(sample(cases[label][1], cases[label][2], mode))
    return {key: statistics.median(v) for key, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", nargs=4, type=int, default=[16, 16, 4, 2],
                    metavar=("K", "N", "T", "M"), help="in, out features, tokens, experts")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--reps", type=int, default=1000, help="interleaved repetitions")
    ap.add_argument("--inner", type=int, default=None,
                    help="calls per sample (default 1 on CPU, 20 on CUDA)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    random.seed(0)
    k, n, tokens, m = args.shape
    cases = make_cases(device, dtype, k, n, tokens, m)
    med = run(cases, args.modes, args.reps, inner, device)

    baseline = {"mos_linear": "F.linear", "MoSLinear": "nn.Linear"}
    rows = []
    for label, (kind, _, _, plan) in cases.items():
        for mode in args.modes:
            base = baseline.get(kind)
            rows.append(dict(label=label, kind=kind, mode=mode, us=1e6 * med[(label, mode)],
                             plan=list(plan) if plan else None, baseline=base,
                             ratio=med[(label, mode)] / med[(base, mode)] if base else None))
    env = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or platform.machine()),
               torch=torch.__version__, threads=torch.get_num_threads(), dtype=args.dtype,
               python=platform.python_version(), commit=git_commit())
    print(f"# host time per call, median us | {env['device']} | {args.dtype} | "
          f"K={k} N={n} T={tokens} m={m} | {env['threads']} thread(s) | {args.reps} reps x "
          f"{inner} calls")
    print(f"{'case':28} {'runs (backend, strategy)':26} "
          + " ".join(f"{mode + ' us':>10} {'ratio':>6}" for mode in args.modes))
    for label, (kind, _, _, plan) in cases.items():
        cells = []
        for mode in args.modes:
            row = next(r for r in rows if r["label"] == label and r["mode"] == mode)
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
            cells.append(f"{row['us']:>10.1f} {ratio:>6}")
        print(f"{label:28} {', '.join(plan) if plan else '':26} " + " ".join(cells))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, shape=dict(K=k, N=n, T=tokens, m=m), reps=args.reps,
                           inner=inner, command=" ".join(sys.argv), results=rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
