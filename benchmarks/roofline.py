"""Roofline model of the MoS linear op: predicted GPU times and MoS overhead on V100, A100, H100.

For each form of the op it counts the floating-point work, the fewest bytes each kernel must move
through device memory and, for the one-pass GEMM kernels, the issue slots their compiled main
loop takes, and charges every kernel max(tensor-core time, issue time, bytes / bandwidth). Host
time (one launch per kernel) is kept out of the GPU time and reported beside it. Forms
(docs/design.md, section 1):

  dense    what a plain supernet does: F.linear on the [:n_out, :n_in] slice of one weight
  naive    the paper's code: a Python loop of m broadcast multiplies and adds builds W_a, then
           F.linear; backward goes through autograd, which also turns every expert's slice
           gradient into a full (m, N_max, K_max) tensor and sums those
  one_pass one pass (strategy="one_pass"): W_a mixed tile by tile in registers while the GEMM
           runs, never stored; dx likewise; G = dy^T x with the epilogue that writes dE and the
           dbeta partials. The forward and dx kernels are charged by the SASS of their main loop
           (TRITON_SASS on A100/H100, CUDA_SASS for the cuda backend's pipelined kernels on V100):
           every k-iteration of every tile issues that many instructions per warp, an SM issues
           4 per clock (one per scheduler), and the tensor cores run meanwhile: time =
           max(tensor time of the padded tiles, issue time, bytes / bandwidth), for the tile
           configuration the autotuner would pick (the fastest by this count)
  combine  combine-then-GEMM (strategy="combine"): one pass writes W_a, then the
           vendor GEMM; backward: G by the vendor GEMM, then one epilogue pass that writes dE, the
           dbeta partials and W_a again (from the expert rows it reads anyway), then dx by the
           vendor GEMM
  saved    combine with save_mixed_weight=True: W_a kept from the forward, so the backward's
           epilogue does not write it (n_out x n_in more memory until the backward)

The vendor GEMMs are charged at the datasheet peak. The MoS overhead is
min(one_pass, combine, saved) / dense. All numbers are predictions from datasheet peaks (PEAKS
below) and compiled-code counts, not measurements; with --measure, on a CUDA GPU, the script also
times the same forms there (this repository's "cuda" backend with strategy="one_pass" and
"combine", and with save_mixed_weight=True; the "triton" backend's strategies too where it runs:
GPU time per call from CUDA events around many calls, the host's launch overhead hidden) and
puts them beside the prediction for that GPU. Each measured row records the (backend, strategy)
that ran (mos_kernels.plan). --rule prints the token counts from which the model puts combine
ahead of one pass (the rule of strategy="auto" in the triton backend, COMBINE_MIN_TOKENS).

    python benchmarks/roofline.py --out benchmarks/results/roofline.json
    python benchmarks/roofline.py --rule
    python benchmarks/roofline.py --measure --out benchmarks/results/roofline_h100.json
"""
import argparse
import json
import math
import os
import sys
import time

# Datasheet peaks, dense (no structured sparsity), SXM boards, and the clock those peaks are
# computed at (SMs x tensor-core rate x clock = the tensor peak):
#   V100 SXM2:      125 TFLOP/s fp16 tensor cores (no bf16), 15.7 TFLOP/s fp32, 900 GB/s HBM2,
#                   80 SMs, 1.53 GHz
#   A100 SXM4 80GB: 312 TFLOP/s fp16/bf16 tensor cores, 19.5 TFLOP/s fp32, 2039 GB/s HBM2e,
#                   108 SMs, 1.41 GHz
#   H100 SXM5:      989 TFLOP/s fp16/bf16 tensor cores, 67 TFLOP/s fp32, 3350 GB/s HBM3,
#                   132 SMs, 1.83 GHz
# one_pass: which compiled kernels the one-pass form runs there: the Triton kernels for sm_80
# and sm_90 (TRITON_SASS), the cuda backend's pipelined kernels on sm_70 (CUDA_SASS).
PEAKS = {
    "V100": dict(tensor=125e12, fp32=15.7e12, bandwidth=900e9, bf16=False, sms=80, clock=1.53e9,
                 one_pass="cuda"),
    "A100": dict(tensor=312e12, fp32=19.5e12, bandwidth=2039e9, bf16=True, sms=108,
                 clock=1.41e9, one_pass=80),
    "H100": dict(tensor=989e12, fp32=67e12, bandwidth=3350e9, bf16=True, sms=132, clock=1.83e9,
                 one_pass=90),
}
ISSUE_PER_CLOCK = 4  # warp instructions an SM issues per clock (4 schedulers), sm_70 to sm_90
LAUNCH_S = 4e-6  # host time per kernel launched from PyTorch (launch plus dispatcher)

# Instructions per k-iteration per warp of the main loop of the Triton one-pass kernels, read
# from their SASS (bf16; fp16 compiles to the same counts), per sm and kernel, keyed by
# (BLOCK_T, BLOCK_N, BLOCK_K, num_warps), for m = 2 to 6 (beyond: extrapolated from m = 4 and 6;
# the forward mixes relative to a pivot up to m = 4, as dx does beyond; odd m sends dx's beta
# down its 2-byte path, so odd m is counted, not interpolated). Counted by
#   python tests/triton_compile.py --sass-table --dtypes bfloat16 --experts 2 3 4 5 6 \
#       --all-configs --kernels forward grad_input
# (Triton 3.9); docs/results.md, "Triton one-pass kernels" has the table (m = 2, 4 and 6), with
# the commit; m = 3 and 5 at commit 73966f4. Neuron-wise beta: dx with layer-wise beta loads its
# betas once and runs shorter loops (docs/results.md), which the model does not credit.
# Configurations the backend leaves out (triton_backend.one_pass_left_out: where they spill,
# and the sm_90 forward's 64 x 64 x 32) are not charged there.
TRITON_SASS = {
    90: {
        "forward": {
            (32, 64, 32, 4): {2: 73, 3: 87, 4: 104, 5: 140, 6: 162},
            (256, 64, 64, 8): {2: 134, 3: 169, 4: 196, 5: 242, 6: 271},
            (32, 64, 64, 4): {2: 109, 3: 142, 4: 175, 5: 235, 6: 269},
            (128, 128, 32, 8): {2: 95, 3: 115, 4: 133, 5: 170, 6: 187},
            (128, 128, 64, 8): {2: 132, 3: 173, 4: 206, 5: 266, 6: 301},
            (128, 64, 32, 4): {2: 98, 3: 117, 4: 134, 5: 165, 6: 190},
            (64, 64, 64, 4): {2: 128, 3: 168, 4: 201, 5: 263, 6: 298},
            (64, 64, 32, 4): {2: 96, 3: 110, 4: 128, 5: 165, 6: 180},
            (32, 32, 32, 4): {2: 46, 3: 60, 4: 74, 5: 98, 6: 113},
            (256, 64, 32, 4): {2: 112, 3: 129, 4: 146, 5: 181, 6: 202},
        },
        "grad_input": {
            (32, 64, 32, 4): {2: 151, 3: 192, 4: 212, 5: 264, 6: 269},
            (256, 64, 64, 8): {2: 221, 3: 257, 4: 317, 5: 347, 6: 412},
            (32, 64, 64, 4): {2: 221, 3: 327, 4: 333, 5: 442, 6: 442},
            (128, 128, 32, 8): {2: 160, 3: 195, 4: 221, 5: 265, 6: 278},
            (128, 128, 64, 8): {2: 227, 3: 320, 4: 335, 5: 442, 6: 442},
            (128, 64, 32, 4): {2: 161, 3: 199, 4: 220, 5: 265, 6: 279},
            (64, 64, 64, 4): {2: 222, 3: 315, 4: 330, 5: 444, 6: 444},
            (64, 64, 32, 4): {2: 154, 3: 193, 4: 215, 5: 263, 6: 273},
            (32, 32, 32, 4): {2: 87, 3: 105, 4: 142, 5: 149, 6: 190},
            (256, 64, 32, 4): {2: 165, 3: 209, 4: 225, 5: 279, 6: 284},
        },
    },
    80: {
        "forward": {
            (32, 64, 32, 4): {2: 70, 3: 87, 4: 111, 5: 138, 6: 157},
            (256, 64, 64, 8): {2: 212, 3: 260, 4: 307, 5: 393, 6: 437},
            (32, 64, 64, 4): {2: 110, 3: 143, 4: 176, 5: 232, 6: 268},
            (128, 128, 32, 8): {2: 114, 3: 141, 4: 168, 5: 218, 6: 247},
            (128, 128, 64, 8): {2: 211, 3: 265, 4: 317, 5: 405, 6: 460},
            (128, 64, 32, 4): {2: 121, 3: 148, 4: 175, 5: 225, 6: 254},
            (64, 64, 64, 4): {2: 159, 3: 212, 4: 278, 5: 358, 6: 413},
            (64, 64, 32, 4): {2: 94, 3: 121, 4: 148, 5: 198, 6: 227},
            (32, 32, 32, 4): {2: 46, 3: 60, 4: 74, 5: 96, 6: 110},
            (256, 64, 32, 4): {2: 203, 3: 274, 4: 294, 5: 437, 6: 488},
        },
        "grad_input": {
            (32, 64, 32, 4): {2: 134, 3: 168, 4: 202, 5: 236, 6: 271},
            (256, 64, 64, 8): {2: 303, 3: 392, 4: 456, 5: 526, 6: 578},
            (32, 64, 64, 4): {2: 247, 3: 322, 4: 383, 5: 444, 6: 505},
            (128, 128, 32, 8): {2: 181, 3: 225, 4: 270, 5: 314, 6: 358},
            (128, 128, 64, 8): {2: 353, 3: 538, 4: 600, 5: 649, 6: 728},
            (128, 64, 32, 4): {2: 193, 3: 237, 4: 284, 5: 331, 6: 382},
            (64, 64, 64, 4): {2: 297, 3: 393, 4: 504, 5: 656, 6: 677},
            (64, 64, 32, 4): {2: 169, 3: 213, 4: 261, 5: 303, 6: 346},
            (32, 32, 32, 4): {2: 89, 3: 110, 4: 132, 5: 154, 6: 176},
            (256, 64, 32, 4): {2: 348, 3: 494, 4: 565, 5: 636, 6: 702},
        },
    },
}
# The cuda backend's pipelined one-pass kernels (what V100 and T4 run): tile (tokens, columns,
# depth, warps) and instructions per 32-deep step per warp of the main loop, per variant (2, 4
# or 8 experts held; "general" for m > 8), read from the SASS by tests/test_cuda_build.py
# (`python3 tests/test_cuda_build.py 75`). V100 runs the WMMA form: these are that form's counts
# compiled for sm_75 with -DMOS_PIPELINE_WMMA (nvcc 13 cannot target sm_70; Volta's HMMA
# sequences differ, so a V100 count needs an older toolkit); the general variant's count is the
# mma.sync form's. docs/results.md has the table with the commit.
CUDA_SASS = dict(tile=(128, 64, 32, 8),
                 instructions=dict(forward={2: 166, 4: 201, 8: 297, "general": 715},
                                   grad_input={2: 180, 4: 217, 8: 346, "general": 760}),
                 source="nvcc 13.0 -cubin -arch=sm_75 (-DMOS_PIPELINE_WMMA), "
                        "csrc/cuda/mos_linear_pipeline.cuh @ 9e86a23")

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
# The shapes of benchmarks/bench_op.py (a mid-sized active architecture of each space).
BENCH_SHAPES = {"mt-ffn1": "mt-ffn1 d512 f2048", "mt-ffn2": "mt-ffn2 d512 f2048",
                "bert-ffn1": "bert-ffn1 h360", "bert-ffn2": "bert-ffn2 h360"}
SHAPES["bert-ffn2 h360"] = (3072, 768, 3072, 360)
TOKENS = (512, 2048, 4096, 8192, 16384)
EXPERTS = (2, 6)
DTYPES = ("float16", "bfloat16")
ELEMENT_BYTES = 2


def _per_m(counts, m):
    """Instructions at m experts from the counts at a few values of m: linear between the two
    nearest; beyond the last, along the slope from the one two before it (m = 4 to 6: dx takes
    another path for beta at odd m, so neighbours differ by more than one expert's work)."""
    known = sorted(counts.items())
    (m0, c0), (m1, c1) = next(((a, b) for a, b in zip(known, known[1:]) if m <= b[0]),
                              (known[-3], known[-1]) if len(known) > 2 else known[-2:])
    return c0 + (c1 - c0) * (m - m0) / (m1 - m0)


def _triton_left_out():
    """triton_backend.one_pass_left_out: the configurations the backend leaves out (imported
    here, so that the model and the backend read one list)."""
    try:
        from mos_kernels.backends.triton_backend import one_pass_left_out
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from mos_kernels.backends.triton_backend import one_pass_left_out
    return one_pass_left_out


def one_pass_gemm_s(peak, rows, cols, depth, m, kernel):
    """GPU seconds of a one-pass GEMM kernel's main loops (forward: cols = n_out, depth = n_in;
    grad_input: cols = n_in, depth = n_out), for the fastest configuration by the count; None
    where the counts are unknown."""
    if peak["one_pass"] == "cuda":
        counts = CUDA_SASS["instructions"].get(kernel)
        if counts is None:
            return None
        held = next((h for h in (2, 4, 8) if m <= h), "general")
        configs = {CUDA_SASS["tile"]: counts[held]}
    else:
        left_out = _triton_left_out()
        configs = {}
        for (bt, bn, bk, warps), counts in TRITON_SASS[peak["one_pass"]][kernel].items():
            if left_out(kernel, peak["one_pass"] // 10, m, (bt, bn, bk, warps)):
                continue  # the backend does not launch it there
            tile = (bt, bn, bk) if kernel == "forward" else (bt, bk, bn)
            configs[tile + (warps,)] = _per_m(counts, m)
    issue_rate = peak["sms"] * ISSUE_PER_CLOCK * peak["clock"]
    best = None
    for (bt, bc, bd, warps), instructions in configs.items():
        steps = math.ceil(rows / bt) * math.ceil(cols / bc) * math.ceil(depth / bd)
        seconds = max(steps * warps * instructions / issue_rate,
                      steps * 2.0 * bt * bc * bd / peak["tensor"])
        best = seconds if best is None else min(best, seconds)
    return best


class Kernel:
    """One launched kernel: tensor-core FLOPs, CUDA-core FLOPs, DRAM bytes; or, for the one-pass
    GEMMs, its compute time from the SASS count (compute_s; None: unknown)."""

    def __init__(self, name, tensor_flops=0.0, core_flops=0.0, elements=0.0, compute_s=0.0):
        self.name, self.tensor_flops, self.core_flops = name, tensor_flops, core_flops
        self.bytes, self.compute_s = elements * ELEMENT_BYTES, compute_s

    def seconds(self, peak):
        """GPU seconds (no host time), NaN where the compute time is unknown."""
        if self.compute_s is None:
            return math.nan
        compute = (self.tensor_flops / peak["tensor"] + self.core_flops / peak["fp32"]
                   + self.compute_s)
        return max(compute, self.bytes / peak["bandwidth"])


def kernels(form, shape, tokens, m, backward, peak):
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
    if form == "one_pass":
        if not backward:
            return [Kernel("one-pass forward", elements=T * K + m * NK + T * N,
                           compute_s=one_pass_gemm_s(peak, T, N, K, m, "forward"))]
        return [Kernel("one-pass dx", elements=T * N + m * NK + T * K,
                       compute_s=one_pass_gemm_s(peak, T, K, N, m, "grad_input")),
                Kernel("zero dE outside slice", 0, 0, m * (full - NK)),
                Kernel("G = dy^T x + epilogue", gemm, 3.0 * m * NK,
                       T * N + T * K + m * NK + m * NK),
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
    """Per form: GPU seconds forward (fwd) and forward+backward (fwdbwd), and the host seconds
    of their launches (host_fwd, host_fwdbwd); the best MoS form and its overhead over dense."""
    peak = PEAKS[device]
    out = {}
    for form in FORMS:
        fwd = kernels(form, shape, tokens, m, False, peak)
        bwd = kernels(form, shape, tokens, m, True, peak)
        out[form] = dict(fwd=sum(k.seconds(peak) for k in fwd),
                         fwdbwd=sum(k.seconds(peak) for k in fwd + bwd),
                         host_fwd=LAUNCH_S * len(fwd), host_fwdbwd=LAUNCH_S * len(fwd + bwd))
    for mode in ("fwd", "fwdbwd"):
        forms = [f for f in ("one_pass", "combine", "saved") if not math.isnan(out[f][mode])]
        best = min(forms, key=lambda f: out[f][mode])
        out[f"best_{mode}"] = best
        out[f"overhead_{mode}"] = out[best][mode] / out["dense"][mode]
    return out


# GPU generation (compute capability major) -> the GPU of PEAKS whose prediction sets the rule
RULE_DEVICES = {8: "A100", 9: "H100"}
RULE_EXPERTS = 6  # the counts are for m = 2, 4 and 6: the rule goes no further
# The token counts the rule is searched over: 256, 384, 512, 768, ... 2^20
RULE_TOKENS = sorted({3 << (k - 1) for k in range(8, 20)} | {1 << k for k in range(8, 21)})


def rule_table():
    """COMBINE_MIN_TOKENS of mos_kernels/backends/triton_backend.py: per GPU generation, for
    m = 1..RULE_EXPERTS, the fewest tokens from which combine is predicted faster than one pass
    (forward+backward) on at least half of the benchmark shapes (None: never)."""
    table = {}
    for major, device in RULE_DEVICES.items():
        row = []
        for m in range(1, RULE_EXPERTS + 1):
            crossings = sorted(math.inf if t is None else t for t in (
                combine_min_tokens(device, SHAPES[name], m) for name in BENCH_SHAPES.values()))
            half = crossings[(len(crossings) + 1) // 2 - 1]
            row.append(None if half == math.inf else half)
        table[major] = tuple(row)
    return table


def combine_min_tokens(device, shape, m):
    """The fewest tokens of RULE_TOKENS from which on combine is predicted faster than one pass
    for forward + backward on ``device``, at every larger count of RULE_TOKENS too; None:
    not at the largest."""
    found = None
    for tokens in reversed(RULE_TOKENS):
        p = predict(device, shape, tokens, m)
        if p["combine"]["fwdbwd"] >= p["one_pass"]["fwdbwd"]:
            break
        found = tokens
    return found


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


def _jsonable(counts):
    """TRITON_SASS with its tuple keys as strings."""
    return {str(sm): {kernel: {"x".join(map(str, tile)): by_m for tile, by_m in tiles.items()}
                      for kernel, tiles in kernels.items()} for sm, kernels in counts.items()}


def device_key(name):
    return next((key for key in PEAKS if key in name), None)


def parse_args(argv=None):
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
    ap.add_argument("--rule", action="store_true",
                    help="also print, per GPU, m and benchmark shape, the token count from "
                         "which combine is predicted faster than one pass")
    return ap.parse_args(argv)


def predicted_rows(devices):
    rows = []
    for device in devices:
        for dtype in DTYPES:
            if dtype == "bfloat16" and not PEAKS[device]["bf16"]:
                continue
            for name, shape in SHAPES.items():
                for tokens in TOKENS:
                    for m in EXPERTS:
                        rows.append(dict(device=device, dtype=dtype, shape=name, dims=shape,
                                         tokens=tokens, m=m, **predict(device, shape, tokens, m)))
    return rows


def print_predictions(rows, shown):
    print("Predicted GPU time (float16; bfloat16 the same on A100/H100, not supported on V100),")
    print("as ratios to the dense slice; dense in us; host = launch time per call in us, not in")
    print("the GPU time; one_pass '-' where its compiled main loop is not counted.")
    print(f"{'device':6} {'shape':9} {'T':>6} {'m':>2} {'dense us':>8} "
          f"{'one_pass/dense':>14} {'combine/dense':>13} {'fwdbwd: one_pass':>16} "
          f"{'combine':>7} {'host us (dense/one_pass/combine)':>32}")
    for r in rows:
        label = next((k for k, v in BENCH_SHAPES.items() if v == r["shape"]), r["shape"])
        if "measured" in r or r["dtype"] != "float16" or label not in shown \
                and r["shape"] not in shown:
            continue
        ratio = lambda form, mode: r[form][mode] / r["dense"][mode]  # noqa: E731
        cell = lambda x: "-" if math.isnan(x) else f"{x:.2f}"  # noqa: E731
        host = "/".join(f"{1e6 * r[f]['host_fwdbwd']:.0f}" for f in ("dense", "one_pass",
                                                                     "combine"))
        print(f"{r['device']:6} {label:9} {r['tokens']:>6} {r['m']:>2} "
              f"{1e6 * r['dense']['fwd']:>8.1f} {cell(ratio('one_pass', 'fwd')):>14} "
              f"{cell(ratio('combine', 'fwd')):>13} {cell(ratio('one_pass', 'fwdbwd')):>16} "
              f"{cell(ratio('combine', 'fwdbwd')):>7} {host:>32}")


def print_rule(devices):
    print("\nTokens from which combine is predicted faster than one pass, forward+backward "
          f"(None: not at {RULE_TOKENS[-1]})")
    for device in devices:
        for m in range(1, RULE_EXPERTS + 1):
            crossings = {label: combine_min_tokens(device, SHAPES[name], m)
                         for label, name in BENCH_SHAPES.items()}
            print(f"{device} m={m}: " + "  ".join(f"{k} {v}" for k, v in crossings.items()))
    print("\nCOMBINE_MIN_TOKENS (mos_kernels/backends/triton_backend.py):", rule_table())


def print_measured(rows, gpu, dtype):
    print(f"\nMeasured on {gpu} ({dtype}), GPU ms per call; predicted for "
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


def measure_here(args, rows, save):
    """Times the forms on this machine's GPU (or CPU), appending rows as they are measured;
    returns (the measurements, the device's name)."""
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
    return measured, gpu


def main(argv=None):
    args = parse_args(argv)
    rows = predicted_rows(args.devices)

    def save(gpu=None):
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(dict(peaks=PEAKS, launch_s=LAUNCH_S, triton_sass=_jsonable(TRITON_SASS),
                               cuda_sass=CUDA_SASS,
                               measured_on=gpu, rows=rows), f, indent=1)

    measured, gpu = measure_here(args, rows, save) if args.measure else ({}, None)
    print_predictions(rows, args.shapes or list(BENCH_SHAPES))
    if args.rule:
        print_rule(args.devices)
    if measured:
        print_measured(rows, gpu, args.measure_dtype)
    if args.out:
        save(gpu)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
