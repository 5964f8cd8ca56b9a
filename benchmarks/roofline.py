"""Roofline model of the MoS linear op: predicted times and MoS overhead on V100, A100 and H100.

For each form of the op it counts the floating-point work and the fewest bytes each kernel must
move through device memory, and charges every kernel max(work / peak, bytes / bandwidth) plus a
launch cost. Forms (docs/design.md, section 1):

  dense    what a plain supernet does: F.linear on the [:n_out, :n_in] slice of one weight
  naive    the paper's code: a Python loop of m broadcast multiplies and adds builds W_a, then
           F.linear; backward goes through autograd, which also turns every expert's slice
           gradient into a full (m, N_max, K_max) tensor and sums those
  one_pass one pass (strategy="one_pass"): W_a combined tile by tile on chip
           while the GEMM runs, never stored; dx likewise; G = dy^T x with the epilogue that
           writes dE and the dbeta partials. This is the form's floor: the cuda backend's WMMA
           kernels are latency-bound and measured far above it (--measure shows by how much)
  combine  combine-then-GEMM (strategy="combine"): one pass writes W_a, then the
           vendor GEMM; backward: G by the vendor GEMM, then one epilogue pass that writes dE, the
           dbeta partials and W_a again (from the expert rows it reads anyway), then dx by the
           vendor GEMM
  saved    combine with save_mixed_weight=True: W_a kept from the forward, so the backward's
           epilogue does not write it (n_out x n_in more memory until the backward)

The MoS overhead is min(one_pass, combine, saved) / dense. All numbers are predictions from
datasheet peaks (PEAKS below), not measurements; with --measure, on a CUDA GPU, the script also
times the same forms there (this repository's "cuda" backend with strategy="one_pass" and
"combine", and with save_mixed_weight=True; the "triton" backend's strategies too where it runs:
GPU time per call from CUDA events around many calls, the host's launch overhead hidden) and
puts them beside the prediction for that GPU. Each measured row records the (backend, strategy)
that ran (mos_kernels.plan).

    python benchmarks/roofline.py --out benchmarks/results/roofline.json
    python benchmarks/roofline.py --measure --out benchmarks/results/roofline_h100.json
"""
import argparse
import json
import math
import os
import sys
import time

# Datasheet peaks, dense (no structured sparsity), SXM boards:
#   V100 SXM2:      125 TFLOP/s fp16 tensor cores (no bf16), 15.7 TFLOP/s fp32, 900 GB/s HBM2
#   A100 SXM4 80GB: 312 TFLOP/s fp16/bf16 tensor cores, 19.5 TFLOP/s fp32, 2039 GB/s HBM2e
#   H100 SXM5:      989 TFLOP/s fp16/bf16 tensor cores, 67 TFLOP/s fp32, 3350 GB/s HBM3
# wmma_fraction: the share of the tensor-core peak that WMMA (mma.sync) can reach. 1 on V100 and
# A100; on H100 the full rate needs wgmma, which WMMA does not use: 0.6 is our assumption (not a
# datasheet figure), applied to the one-pass form only (the vendor GEMM uses wgmma).
PEAKS = {
    "V100": dict(tensor=125e12, fp32=15.7e12, bandwidth=900e9, bf16=False, wmma_fraction=1.0),
    "A100": dict(tensor=312e12, fp32=19.5e12, bandwidth=2039e9, bf16=True, wmma_fraction=1.0),
    "H100": dict(tensor=989e12, fp32=67e12, bandwidth=3350e9, bf16=True, wmma_fraction=0.6),
}
LAUNCH_S = 4e-6  # per kernel launched from PyTorch (launch plus dispatcher), all devices
TOKEN_TILE = 128  # tokens per block of the one-pass forward/dx kernels: W_a tiles are recombined
                  # once per token tile (from L2; charged as CUDA-core work, not DRAM bytes)

# name: (K_max, N_max, n_in, n_out). MT (HAT space): d_model 512/640, FFN 1024/2048/3072, experts
# sized for the largest (640, 3072). BERT (SuperShaper space): 768 backbone, FFN 3072, hidden
# 120..768 per layer.
SHAPES = {}
for d in (512, 640):
    for ffn in (1024, 2048, 3072):
        SHAPES[f"mt-ffn1 d{d} f{ffn}"] = (640, 3072, d, ffn)
        SHAPES[f"mt-ffn2 d{d} f{ffn}"] = (3072, 640, ffn, d)
for hidden in (120, 240, 360, 480, 540, 600, 768):
    SHAPES[f"bert-ffn1 h{hidden}"] = (768, 3072, hidden, 3072)
    SHAPES[f"bert-ffn2 h{hidden}"] = (3072, 768, 3072, hidden)
TOKENS = (512, 2048, 8192, 16384)
EXPERTS = (2, 6)
DTYPES = ("float16", "bfloat16")
ELEMENT_BYTES = 2


class Kernel:
    """One launched kernel: tensor-core FLOPs, CUDA-core FLOPs, DRAM bytes."""

    def __init__(self, name, tensor_flops=0.0, core_flops=0.0, elements=0.0, wmma=False):
        self.name, self.tensor_flops, self.core_flops = name, tensor_flops, core_flops
        self.bytes, self.wmma = elements * ELEMENT_BYTES, wmma

    def seconds(self, peak):
        tensor = peak["tensor"] * (peak["wmma_fraction"] if self.wmma else 1.0)
        compute = self.tensor_flops / tensor + self.core_flops / peak["fp32"]
        return max(compute, self.bytes / peak["bandwidth"]) + LAUNCH_S


def kernels(form, shape, tokens, m, backward):
    """The kernels a form launches for forward, or for backward alone (with bias, as benchmarked)."""
    k_max, n_max, K, N = shape
    T, NK, full = tokens, N * K, n_max * k_max
    gemm = 2.0 * T * N * K
    if form == "dense":
        if not backward:
            return [Kernel("addmm", gemm, 0, T * K + NK + T * N + N)]
        return [Kernel("dx = dy W", gemm, 0, T * N + NK + T * K),
                Kernel("dW = dy^T x", gemm, 0, T * N + T * K + NK),
                Kernel("db = sum dy", 0, T * N, T * N + N),
                Kernel("slice grad into (N_max, K_max)", 0, 0, full + NK)]
    if form == "naive":
        if not backward:
            out = [Kernel(f"beta_{i} * E_{i}", 0, NK, 2 * NK) for i in range(m)]
            out += [Kernel("W += ...", 0, NK, 3 * NK) for _ in range(m - 1)]
            out += [Kernel(f"beta_{i} * bias_{i}", 0, N, 2 * N) for i in range(2 * m - 1)]
            return out + [Kernel("addmm", gemm, 0, T * K + NK + T * N + N)]
        out = [Kernel("dx = dy W", gemm, 0, T * N + NK + T * K),
               Kernel("dW = dy^T x", gemm, 0, T * N + T * K + NK),
               Kernel("db = sum dy", 0, T * N, T * N + N)]
        for i in range(m):
            out += [Kernel(f"dE_{i} = beta_{i} dW", 0, NK, 2 * NK),
                    Kernel(f"dW * E_{i}", 0, NK, 3 * NK),
                    Kernel(f"dbeta_{i} = sum_k", 0, NK, NK + N),
                    Kernel(f"slice_backward {i}", 0, 0, full + NK),
                    Kernel(f"select_backward {i}", 0, 0, m * full + full)]
            if i:
                out.append(Kernel("accumulate dE", 0, m * full, 3 * m * full))
            out += [Kernel(f"bias grads {i}", 0, 2 * N, 6 * N)]
        return out
    recombine = 2.0 * m * NK * math.ceil(T / TOKEN_TILE)
    if form == "one_pass":
        if not backward:
            return [Kernel("one-pass forward", gemm, recombine, T * K + m * NK + T * N, wmma=True)]
        return [Kernel("one-pass dx", gemm, recombine, T * N + m * NK + T * K, wmma=True),
                Kernel("zero dE outside slice", 0, 0, m * (full - NK)),
                Kernel("G = dy^T x + epilogue", gemm, 3.0 * m * NK,
                       T * N + T * K + m * NK + m * NK, wmma=True),
                Kernel("dbeta/dbias finish", 0, 0, 2 * m * N)]
    if form in ("combine", "saved"):
        combine = Kernel("combine W_a", 0, 2.0 * m * NK, m * NK + NK)
        if not backward:
            return [combine, Kernel("addmm", gemm, 0, T * K + NK + T * N + N)]
        # combine: the epilogue writes W_a again for dx from the expert rows it reads for dbeta;
        # saved: W_a kept from the forward.
        again = 2.0 * m * NK if form == "combine" else 0.0
        return [Kernel("G = dy^T x", gemm, 0, T * N + T * K + NK),
                Kernel("column sums of dy", 0, T * N, T * N),
                Kernel("epilogue dE (zeros outside the slice too), dbeta partials"
                       + (", W_a" if form == "combine" else ""), 0, 3.0 * m * NK + again,
                       NK + m * NK + m * full + (NK if form == "combine" else 0)),
                Kernel("dx = dy W_a", gemm, 0, T * N + NK + T * K),
                Kernel("dbeta/dbias finish", 0, 0, 2 * m * N)]
    raise ValueError(form)


FORMS = ("dense", "naive", "one_pass", "combine", "saved")


def predict(device, shape, tokens, m):
    peak = PEAKS[device]
    out = {}
    for form in FORMS:
        fwd = sum(k.seconds(peak) for k in kernels(form, shape, tokens, m, False))
        bwd = sum(k.seconds(peak) for k in kernels(form, shape, tokens, m, True))
        out[form] = dict(fwd=fwd, fwdbwd=fwd + bwd)
    for mode in ("fwd", "fwdbwd"):
        best = min(("one_pass", "combine", "saved"), key=lambda f: out[f][mode])
        out[f"best_{mode}"] = best
        out[f"overhead_{mode}"] = out[best][mode] / out["dense"][mode]
    return out


# ------------------------------------------------------------------------------ measurement

def measure(shapes, tokens_list, experts, dtype_name, reps, on_case=None, device="cuda"):
    """Seconds per call of each form on this GPU (CUDA events), forward and forward+backward;
    on_case(key, row) is called after each (shape, tokens, m) case. device="cpu" times the cpu
    backend by the wall clock instead (a check of this code without a GPU)."""
    import torch
    import torch.nn.functional as F

    try:
        import mos_kernels
    except ImportError:  # run from a source checkout that is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import mos_kernels

    dtype = getattr(torch, dtype_name)
    device = torch.device(device)
    # label: (backend, strategy, save_mixed_weight); the cuda backend's rows carry the model's
    # form names, so that they sit beside its predictions.
    providers = {"dense": None, "naive": None}
    available = mos_kernels.available_backends(device)
    if "cuda" in available:
        providers.update({"one_pass": ("cuda", "one_pass", False),
                          "combine": ("cuda", "combine", False), "saved": ("cuda", "auto", True)})
    if "cpu" in available:
        providers.update({"combine": ("cpu", "combine", False), "saved": ("cpu", "auto", True)})
    if "triton" in available and device.type == "cuda":
        providers.update({"triton:one_pass": ("triton", "one_pass", False),
                          "triton:combine": ("triton", "combine", False)})

    def timed(fn):
        """GPU seconds per call: `reps` calls queued behind a GPU sleep, so that Python's launch
        overhead overlaps the sleep and the events time the kernels back to back (an upper
        bound if the host cannot queue the calls within the sleep)."""
        if device.type == "cpu":
            fn()
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - begin) / reps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # about 50 ms
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    results = {}
    for name in shapes:
        k_max, n_max, n_in, n_out = SHAPES[name]
        for tokens in tokens_list:
            for m in experts:
                g = torch.Generator(device=device).manual_seed(0)
                rand = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)
                x = rand(tokens, n_in).requires_grad_(True)
                dy = rand(tokens, n_out)
                experts_t = (rand(m, n_max, k_max) * k_max ** -0.5).requires_grad_(True)
                beta = rand(n_out, m).float().softmax(-1).to(dtype).requires_grad_(True)
                bias = rand(m, n_max).requires_grad_(True)
                weight = (rand(n_max, k_max) * k_max ** -0.5).requires_grad_(True)
                dense_bias = rand(n_max).requires_grad_(True)
                leaves = [x, experts_t, beta, bias, weight, dense_bias]

                def forward(provider):
                    if provider == "dense":
                        return F.linear(x, weight[:n_out, :n_in], dense_bias[:n_out])
                    if provider == "naive":
                        return mos_kernels.reference.mos_linear(x, experts_t, beta, bias)
                    backend, strategy, saved = providers[provider]
                    return mos_kernels.mos_linear(x, experts_t, beta, bias, backend=backend,
                                                  strategy=strategy, save_mixed_weight=saved)

                row = {}
                for provider, how in providers.items():
                    def fwdbwd():
                        forward(provider).backward(dy)
                        for t in leaves:
                            t.grad = None
                    row[provider] = dict(fwd=timed(lambda: forward(provider)), fwdbwd=timed(fwdbwd))
                    if how is not None:
                        backend, strategy, saved = how
                        row[provider]["plan"] = list(mos_kernels.plan(
                            x, experts_t, beta, bias, backend=backend, strategy=strategy,
                            save_mixed_weight=saved))
                results[(name, tokens, m)] = row
                if on_case is not None:
                    on_case((name, tokens, m), row)
                print(f"measured {name:20} T={tokens:>6} m={m}: " + "  ".join(
                    f"{p} {1e3 * v['fwd']:.3f}/{1e3 * v['fwdbwd']:.3f}" for p, v in row.items())
                    + " ms (fwd/fwdbwd)", flush=True)
    return results


def device_key(name):
    return next((key for key in PEAKS if key in name), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--devices", nargs="+", default=list(PEAKS), choices=list(PEAKS))
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="shape names to print (default: a representative subset; JSON has all)")
    ap.add_argument("--measure", action="store_true", help="also time the forms on this GPU")
    ap.add_argument("--measure-device", default="cuda",
                    help="cuda (default), or cpu to check the measurement code without a GPU")
    ap.add_argument("--measure-shapes", nargs="+",
                    default=["mt-ffn1 d640 f3072", "mt-ffn2 d640 f3072", "bert-ffn1 h120",
                             "bert-ffn2 h768"])
    ap.add_argument("--measure-tokens", nargs="+", type=int, default=[512, 2048, 16384])
    ap.add_argument("--measure-experts", nargs="+", type=int, default=list(EXPERTS))
    ap.add_argument("--measure-dtype", default="float16", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)

    rows = []
    for device in args.devices:
        for dtype in DTYPES:
            if dtype == "bfloat16" and not PEAKS[device]["bf16"]:
                continue
            for name, shape in SHAPES.items():
                for tokens in TOKENS:
                    for m in EXPERTS:
                        rows.append(dict(device=device, dtype=dtype, shape=name, dims=shape,
                                         tokens=tokens, m=m, **predict(device, shape, tokens, m)))

    def save(gpu=None):
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(dict(peaks=PEAKS, launch_s=LAUNCH_S, token_tile=TOKEN_TILE,
                               measured_on=gpu, rows=rows), f, indent=1)

    measured, gpu = {}, None
    if args.measure:
        import torch
        if args.measure_device == "cpu":
            gpu = "cpu"
        elif not torch.cuda.is_available():
            sys.exit("--measure needs a CUDA GPU (or --measure-device cpu)")
        else:
            gpu = torch.cuda.get_device_name()
        key = device_key(gpu)

        def on_case(case, row):  # written as it goes: a time limit keeps what was measured
            name, tokens, m = case
            rows.append(dict(device=gpu, dtype=args.measure_dtype, shape=name, dims=SHAPES[name],
                             tokens=tokens, m=m, measured=row,
                             predicted=predict(key, SHAPES[name], tokens, m) if key else None))
            save(gpu)

        measured = measure(args.measure_shapes, args.measure_tokens, args.measure_experts,
                           args.measure_dtype, args.reps, on_case, args.measure_device)

    shown = args.shapes or ["mt-ffn1 d512 f2048", "mt-ffn2 d512 f2048", "mt-ffn1 d640 f3072",
                            "bert-ffn1 h120", "bert-ffn1 h768", "bert-ffn2 h360"]
    print("Predicted ms (float16; bfloat16 is the same on A100/H100 and not supported on V100).")
    print("overhead = best MoS form / dense slice; naive/best = naive over best MoS form.")
    head = (f"{'device':5} {'shape':19} {'T':>6} {'m':>2} {'mode':6} {'dense':>8} {'naive':>8} "
            f"{'one_pass':>8} {'combine':>8} {'saved':>8} {'best':>8} {'overhead':>8} "
            f"{'naive/best':>10}")
    print(head)
    for r in rows:
        if "measured" in r or r["dtype"] != "float16" or r["shape"] not in shown:
            continue
        for mode in ("fwd", "fwdbwd"):
            best = r[f"best_{mode}"]
            print(f"{r['device']:5} {r['shape']:19} {r['tokens']:>6} {r['m']:>2} {mode:6} " +
                  " ".join(f"{1e3 * r[f][mode]:>8.3f}" for f in FORMS) +
                  f" {best:>8} {r[f'overhead_{mode}']:>8.2f} "
                  f"{r['naive'][mode] / r[best][mode]:>10.2f}")
    if measured:
        print(f"\nMeasured on {gpu} ({args.measure_dtype}), GPU ms per call; predicted for "
              f"{device_key(gpu)} in brackets")
        for r in rows:
            if "measured" not in r:
                continue
            for mode in ("fwd", "fwdbwd"):
                cells = []
                for p, v in r["measured"].items():
                    pred = r["predicted"][p][mode] if r["predicted"] and p in r["predicted"] else None
                    cells.append(f"{p} {1e3 * v[mode]:.3f}" +
                                 (f" [{1e3 * pred:.3f}]" if pred is not None else ""))
                print(f"{r['shape']:19} T={r['tokens']:>6} m={r['m']} {mode:6} " + "  ".join(cells))

    if args.out:
        save(gpu)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
