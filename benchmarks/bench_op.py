"""Times the MoS linear op against the naive form and the dense slice, interleaved in one run.

Providers:
  naive    the paper's form: a Python loop over experts builds W_a, then F.linear (autograd keeps
           every temporary)
  dense    what a standard supernet does: F.linear(x, W[:n_out, :n_in], b[:n_out])
  <fused>  every fused backend available on the device (cpu; triton, cuda) with strategy "auto",
           and with --strategies each strategy a backend takes, named by the strategy argument
           (e.g. triton:one_pass, triton:combine); the table says which strategy each ran
  <fused>+saved  with --saved: the same backend with save_mixed_weight=True (W_a built once and
           kept for the backward)

Modes: fwd (forward with autograd recording, as in training), bwd (backward alone), fwdbwd.
Each repetition runs every provider once in a shuffled order; the table shows medians and the
ratios fused/dense and naive/fused. Also times MoSLinear in eval mode with cached weights against
an nn.Linear of the same shape. Writes JSON and a PNG plot of the ratios (default runs/op_<device>
in the repository, which git ignores; --out benchmarks/results/... to keep them).

    python benchmarks/bench_op.py                      # CPU
    python benchmarks/bench_op.py --saved --reps 11 --out benchmarks/results/op_cpu  # docs/results.md
    python benchmarks/bench_op.py --device cuda --dtype bfloat16 --tokens 512 2048 4096 8192 16384
"""
import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mos_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (K_max, N_max, n_in, n_out): FFN layers of the MT (HAT) and BERT (SuperShaper) spaces with
# a mid-sized active architecture.
SHAPES = {
    "mt-ffn1": (640, 3072, 512, 2048),
    "mt-ffn2": (3072, 640, 2048, 512),
    "bert-ffn1": (768, 3072, 360, 3072),
    "bert-ffn2": (3072, 768, 3072, 360),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        """Seconds that fn takes (its device work included)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def fused_providers(device, strategies, saved=False):
    """(label, backend, strategy) for every fused backend that runs on the device: strategy
    "auto", with ``saved`` also save_mixed_weight=True (label <backend>+saved), with
    ``strategies`` also every strategy the backend takes (label <backend>:<strategy>)."""
    out = []
    for name in mos_kernels.available_backends(device):
        if name == "reference":
            continue
        out.append((name, name, "auto"))
        if saved:
            out.append((f"{name}+saved", name, "auto"))
        if strategies:
            out += [(f"{name}:{s}", name, s)
                    for s in mos_kernels.backend_strategies(name, device) if s != "auto"]
    return out


def make_case(shape, tokens, m, dtype, device, seed=0):
    k_max, n_max, n_in, n_out = shape
    g = torch.Generator().manual_seed(seed)

    def param(*size, scale=1.0):
        t = torch.randn(*size, generator=g) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    return dict(
        x=param(tokens, n_in), dy=param(tokens, n_out).detach(),
        experts=param(m, n_max, k_max, scale=k_max ** -0.5), bias=param(m, n_max),
        beta=torch.randn(n_out, m, generator=g).softmax(-1).to(device, dtype).requires_grad_(True),
        weight=param(n_max, k_max, scale=k_max ** -0.5), dense_bias=param(n_max),
        n_in=n_in, n_out=n_out)


def forward_fn(label, backend, strategy, case):
    if label == "naive":
        return lambda: mos_kernels.reference.mos_linear(case["x"], case["experts"], case["beta"],
                                                        case["bias"])
    if label == "dense":
        n_in, n_out = case["n_in"], case["n_out"]
        return lambda: F.linear(case["x"], case["weight"][:n_out, :n_in],
                                case["dense_bias"][:n_out])
    return lambda: mos_kernels.mos_linear(case["x"], case["experts"], case["beta"], case["bias"],
                                          backend=backend, strategy=strategy,
                                          save_mixed_weight=label.endswith("+saved"))


def plans(providers, case):
    """{label: [backend, strategy]} that each fused provider runs for this case."""
    return {label: list(mos_kernels.plan(case["x"], case["experts"], case["beta"], case["bias"],
                                         backend=backend, strategy=strategy,
                                         save_mixed_weight=label.endswith("+saved")))
            for label, backend, strategy in providers if backend is not None}


def bench_case(providers, case, modes, reps, iters, clock, device):
    """Median seconds per (provider, mode), and peak memory of fwdbwd on CUDA."""
    times = {(p[0], mode): [] for p in providers for mode in modes}
    peak = {}
    fns = {p[0]: forward_fn(*p, case) for p in providers}
    grads = ["x", "experts", "beta", "bias", "weight", "dense_bias"]

    def clear():
        for k in grads:
            case[k].grad = None

    def one(label, mode):
        """Seconds per call, from `iters` calls issued back to back (on a GPU the host runs ahead,
        so this is the throughput a training loop sees)."""
        fwd = fns[label]

        def fwdbwd():
            for _ in range(iters):
                fwd().backward(case["dy"])
                clear()

        if mode == "fwd":
            return clock(lambda: [fwd() for _ in range(iters)]) / iters
        if mode == "fwdbwd":
            return clock(fwdbwd) / iters
        outputs = [fwd() for _ in range(iters)]

        def bwd():
            for y in outputs:
                y.backward(case["dy"])
                clear()
        return clock(bwd) / iters

    for label in fns:  # warm-up: compilation, autotuning, allocator
        for mode in modes:
            one(label, mode), one(label, mode)
            clear()
    order = [(p[0], mode) for p in providers for mode in modes]
    for _ in range(reps):
        random.shuffle(order)
        for label, mode in order:
            times[(label, mode)].append(one(label, mode))
            clear()
    if device.type == "cuda":
        for label in fns:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fns[label]().backward(case["dy"])
            torch.cuda.synchronize()
            peak[label] = torch.cuda.max_memory_allocated() - base
            clear()
    return {k: statistics.median(v) for k, v in times.items()}, peak


def bench_eval_cache(shapes, tokens_list, dtype, device, reps, clock):
    """MoSLinear in eval with cached weights vs nn.Linear of the active shape."""
    rows = []
    for name, (k_max, n_max, n_in, n_out) in shapes.items():
        layer = mos_kernels.MoSLinear(k_max, n_max, device=device, dtype=dtype).eval()
        layer.set_arch(torch.rand(10), in_features=n_in, out_features=n_out)
        linear = layer.to_linear()
        for tokens in tokens_list:
            x = torch.randn(tokens, n_in, device=device, dtype=dtype)
            samples = {"mos_eval": [], "linear": []}
            with torch.no_grad():
                for fn in (layer, linear, layer, linear):
                    fn(x)
                for _ in range(reps):
                    for label, fn in random.sample([("mos_eval", layer), ("linear", linear)], 2):
                        samples[label].append(clock(lambda: fn(x)))
            med = {k: statistics.median(v) for k, v in samples.items()}
            rows.append(dict(shape=name, tokens=tokens, mos_eval_s=med["mos_eval"],
                             linear_s=med["linear"], ratio=med["mos_eval"] / med["linear"]))
    return rows


def git_commit() -> str:
    """The checkout's short commit, or $MOS_COMMIT for a copied tree without .git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return commit or os.environ.get("MOS_COMMIT", "")


def environment(device):
    commit = git_commit()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor())
    return dict(device=name, date=datetime.date.today().isoformat(), commit=commit,
                torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version())


def plot(results, fused, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, title) in zip(axes, [("fused_over_dense", "fused / dense slice (lower is better)"),
                                        ("naive_over_fused", "naive / fused (higher is better)")]):
        labels, values, colors = [], [], []
        for r in results:
            if r["mode"] != "fwdbwd":
                continue
            labels.append(f"{r['shape']} T={r['tokens']} m={r['m']}")
            values.append(r["ratios"][fused][key])
            colors.append("tab:blue" if r["m"] == 2 else "tab:orange")
        ax.barh(range(len(values)), values, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.set_title(f"{title}, fwd+bwd, {fused}", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048])
    ap.add_argument("--experts", nargs="+", type=int, default=[2, 6])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"],
                    choices=["fwd", "bwd", "fwdbwd"])
    ap.add_argument("--reps", type=int, default=None, help="default 7 on CPU, 50 on CUDA")
    ap.add_argument("--iters", type=int, default=None,
                    help="calls per timed sample, issued back to back (default 1 on CPU, 20 on "
                         "CUDA, where one call's host work would otherwise be what is timed)")
    ap.add_argument("--strategies", action="store_true",
                    help="also time each strategy a fused backend takes (strategy argument)")
    ap.add_argument("--saved", action="store_true",
                    help="also time each fused backend with save_mixed_weight=True")
    ap.add_argument("--no-eval-cache", action="store_true")
    ap.add_argument("--out", default=None,
                    help="prefix of the .json and .png files (default runs/op_<device> in the "
                         "repository, ignored by git)")
    return ap.parse_args(argv)


def print_row(row, providers, primary):
    med = row["median_s"]
    line = f"{row['shape']:10} {row['tokens']:>6} {row['m']:>2} {row['mode']:6} " + " ".join(
        f"{1e3 * med[p[0]]:>14.3f}" for p in providers)
    line += "".join(f" {row['ratios'][f]['fused_over_dense']:>12.3f} "
                    f"{row['ratios'][f]['naive_over_fused']:>10.2f}" for f in primary)
    print(line, flush=True)
    if "peak_bytes" in row:
        print(" " * 26 + "peak MiB: " + "  ".join(
            f"{k} {v / 2**20:.1f}" for k, v in row["peak_bytes"].items()))


def bench_rows(args, providers, fused, primary, dtype, device, reps, iters, clock):
    """Yields one result row per (shape, tokens, experts, mode), printed as it is measured."""
    for name in args.shapes:
        for tokens in args.tokens:
            for m in args.experts:
                case = make_case(SHAPES[name], tokens, m, dtype, device)
                ran = plans(fused, case)
                med, peak = bench_case(providers, case, args.modes, reps, iters, clock, device)
                print(f"# {name} T={tokens} m={m} runs: " + ", ".join(
                    f"{label}={strategy}" for label, (_, strategy) in ran.items()))
                for mode in args.modes:
                    row = dict(shape=name, dims=SHAPES[name], tokens=tokens, m=m, mode=mode,
                               median_s={p[0]: med[(p[0], mode)] for p in providers},
                               plans=ran, ratios={})
                    for f in primary:
                        row["ratios"][f] = dict(
                            fused_over_dense=med[(f, mode)] / med[("dense", mode)],
                            naive_over_fused=med[("naive", mode)] / med[(f, mode)])
                    if peak and mode == "fwdbwd":
                        row["peak_bytes"] = peak
                    print_row(row, providers, primary)
                    yield row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    reps = args.reps or (50 if device.type == "cuda" else 7)
    iters = args.iters or (20 if device.type == "cuda" else 1)
    clock = Clock(device)
    random.seed(0)
    fused = fused_providers(device, args.strategies, args.saved)
    if not fused:
        sys.exit(f"no fused backend runs on {device}: {mos_kernels.available_backends(device)}")
    providers = [("naive", None, None), ("dense", None, None)] + fused
    primary = [p[0] for p in fused if p[2] == "auto"]
    env = environment(device)
    print(f"# {env['device']} | {env['date']} | commit {env['commit']} | torch {env['torch']} | "
          f"{env['threads']} threads | {dtype} | auto -> {mos_kernels.resolve_backend('auto', device)}")

    prefix = args.out or os.path.join(ROOT, "runs", f"op_{device.type}")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)

    def save(eval_rows=()):
        with open(prefix + ".json", "w") as f:
            json.dump(dict(environment=env, dtype=str(dtype), reps=reps, iters=iters, results=results,
                           eval_cache=list(eval_rows), command=" ".join(sys.argv)), f, indent=1)

    results = []
    head = f"{'shape':10} {'T':>6} {'m':>2} {'mode':6} " + " ".join(f"{p[0]:>14}" for p in providers)
    head += "".join(f" {f + ' f/d':>12} {'n/' + f:>10}" for f in primary)
    print(head + "   (median ms)")
    for row in bench_rows(args, providers, fused, primary, dtype, device, reps, iters, clock):
        results.append(row)
        save()  # a run cut short keeps what it measured

    eval_rows = []
    if not args.no_eval_cache:
        eval_rows = bench_eval_cache({k: SHAPES[k] for k in args.shapes}, args.tokens, dtype,
                                     device, reps * 3, clock)
        print("\nMoSLinear eval (cached weights) vs nn.Linear, median ms")
        for r in eval_rows:
            print(f"{r['shape']:10} T={r['tokens']:>6}  mos {1e3 * r['mos_eval_s']:.3f}  "
                  f"linear {1e3 * r['linear_s']:.3f}  ratio {r['ratio']:.3f}")

    save(eval_rows)
    plot(results, primary[0], prefix + ".png")
    print(f"\nwrote {prefix}.json and {prefix}.png")


if __name__ == "__main__":
    main()
