"""Training-step time of the MT supernet: standard weight sharing vs MoS with the naive op
(backend="reference") vs MoS with the fused backend (backend="auto"), interleaved in one run;
and search throughput (architectures evaluated per second, validation loss of inherited weights).

A training step = zero_grad, the sandwich step (largest, smallest, one random architecture;
forward + backward each), gradient clipping and the Adam step; the forward+backward part is
also reported alone (the MoS models have more parameters, so their Adam step costs more). Every provider gets the same
batches and architectures; the order of providers rotates each repetition. Reported: median
milliseconds per step and the ratios MoS-fused / standard, MoS-naive / standard,
MoS-naive / MoS-fused, and the same two key ratios as medians of per-repetition (paired)
ratios, which machine drift between repetitions does not move. With --compile, also "<kind>-compiled": the fused model with its blocks
under torch.compile as the trainers' --compile does (warm-up steps compile every block size the
timed steps meet; the graphs compiled are reported).

    python benchmarks/bench_mt_train.py [--shapes tiny,small] [--kinds neuron,layer]
                                        [--reps 10] [--device cuda] [--compile]
                                        [--strategy auto|one_pass|combine] [--json OUT.json]

Prints the table; writes JSON only where --json says.
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mos_kernels import STRATEGIES, resolve_backend  # noqa: E402
from mos_models.common import (AMP, MixedPrecision, arch_rng, fused_adam_options,  # noqa: E402
                               sample_archs, sandwich_step, set_backend)
from mos_models.common.compile import compile_model, compile_stats  # noqa: E402
from mos_models.mt.config import PRESETS  # noqa: E402
from mos_models.mt.model import MTSupernet, loss_fn  # noqa: E402
from mos_models.mt.train import evaluate_loss  # noqa: E402

# (preset, vocabulary, sentences per batch, source length, target length)
SHAPES = {"tiny": ("tiny", 4000, 64, 18, 20),
          "small": ("small", 8000, 64, 18, 20),
          "full": ("full", 32000, 48, 24, 26)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(vocab, batch, s_len, t_len, device, seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (batch, s_len), generator=gen)
    tgt = torch.randint(4, vocab, (batch, t_len + 1), generator=gen)
    tgt[:, 0] = 2
    return src.to(device), tgt[:, :-1].contiguous().to(device), tgt[:, 1:].contiguous().to(device)


def build(kind, backend, preset, vocab, device, strategy="auto", compiled=False):
    torch.manual_seed(0)
    model = MTSupernet(vocab, PRESETS[preset].space, kind).to(device)
    set_backend(model, backend, strategy=strategy)
    compile_model(model, compiled, None, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **fused_adam_options(model.parameters()))
    return model, opt


def train_step(model, opt, batch, archs, device, precision):
    """Returns (milliseconds of the forward+backward passes, of the whole step)."""
    src, t_in, t_out = batch
    synchronize(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    sandwich_step(model, archs, lambda m, a: loss_fn(m(src, t_in), t_out, 0.1), precision)
    synchronize(device)
    middle = time.perf_counter()
    precision.step(opt, model.parameters(), 1.0)
    synchronize(device)
    end = time.perf_counter()
    return (middle - start) * 1e3, (end - start) * 1e3


def time_providers(providers, space, shape, reps, warmup, device, amp):
    """Median ms per step and per forward+backward of every provider, interleaved (the order
    rotates each repetition), the same batches and architectures for all; and the graphs
    compiled during the warm-up and during the timed steps."""
    _, vocab, batch, s_len, t_len = shape
    times = {p: [] for p in providers}
    passes = {p: [] for p in providers}
    names = list(providers)
    precision = {p: MixedPrecision(amp, device.type) for p in providers}
    graphs = [compile_stats()["compiled_graphs"]]
    for rep in range(warmup + reps):
        batch_data = make_batch(vocab, batch, s_len, t_len, device, rep)
        archs = sample_archs(space, arch_rng(0, rep))
        if rep == warmup:
            graphs.append(compile_stats()["compiled_graphs"])
        for p in names[rep % len(names):] + names[:rep % len(names)]:
            model, opt = providers[p]
            fwd_bwd, total = train_step(model, opt, batch_data, archs, device, precision[p])
            if rep >= warmup:
                times[p].append(total)
                passes[p].append(fwd_bwd)
    graphs.append(compile_stats()["compiled_graphs"])
    return ({p: statistics.median(t) for p, t in times.items()},
            {p: statistics.median(t) for p, t in passes.items()},
            {"warmup": graphs[1] - graphs[0], "timed": graphs[2] - graphs[1]}, times)


def paired_ratios(kinds, times):
    """Median over repetitions of each repetition's own step-time ratio: the two steps of a
    pair ran seconds apart on the same batch, so drift of the machine's speed between
    repetitions cancels, which a ratio of medians keeps."""
    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    ratios = {}
    for kind in kinds:
        ratios[f"{kind}-fused/standard"] = paired(f"{kind}-fused", "standard")
        ratios[f"{kind}-naive/{kind}-fused"] = paired(f"{kind}-naive", f"{kind}-fused")
    return ratios


def step_ratios(kinds, median, median_passes, compiled):
    ratios = {}
    for kind in kinds:
        ratios[f"{kind}-fused/standard"] = median[f"{kind}-fused"] / median["standard"]
        ratios[f"{kind}-naive/standard"] = median[f"{kind}-naive"] / median["standard"]
        ratios[f"{kind}-naive/{kind}-fused"] = median[f"{kind}-naive"] / median[f"{kind}-fused"]
        ratios[f"{kind}-fused/standard (fwd+bwd only)"] = (median_passes[f"{kind}-fused"]
                                                          / median_passes["standard"])
        ratios[f"{kind}-naive/{kind}-fused (fwd+bwd only)"] = (
            median_passes[f"{kind}-naive"] / median_passes[f"{kind}-fused"])
        if compiled:
            ratios[f"{kind}-compiled/{kind}-fused"] = (median[f"{kind}-compiled"]
                                                      / median[f"{kind}-fused"])
            ratios[f"{kind}-compiled/standard"] = median[f"{kind}-compiled"] / median["standard"]
    return ratios


def search_throughput(providers, names, space, shape, count, device):
    """Distinct architectures per second whose validation loss (inherited weights, eval mode)
    each provider computes, and the number of validation sentences."""
    _, vocab, batch, s_len, t_len = shape
    rng = random.Random(1)
    archs, keys = [], set()
    while len(archs) < count:
        a = space.sample(rng)
        if space.key(a) not in keys:
            keys.add(space.key(a))
            archs.append(a)
    valid = [make_batch(vocab, batch, s_len, t_len, device, 10_000 + i) for i in range(2)]
    src_rows = [row for b in valid for row in b[0].tolist()]
    tgt_rows = [row + [3] for b in valid for row in b[2].tolist()]
    batches = [list(range(i * batch, (i + 1) * batch)) for i in range(len(valid))]
    throughput = {}
    for p in names:
        model = providers[p][0]
        evaluate_loss(model, batches, src_rows, tgt_rows, device, archs[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for a in archs:
            evaluate_loss(model, batches, src_rows, tgt_rows, device, a)
        synchronize(device)
        throughput[p] = len(archs) / (time.perf_counter() - start)
    return throughput, len(src_rows)


def bench_shape(name, kinds, reps, warmup, device, search_archs, log, amp="off",
                strategy="auto", compiled=False):
    shape = SHAPES[name]
    preset, vocab, batch, s_len, t_len = shape
    providers = {"standard": build("standard", "auto", preset, vocab, device)}
    for kind in kinds:
        providers[f"{kind}-naive"] = build(kind, "reference", preset, vocab, device, strategy)
        providers[f"{kind}-fused"] = build(kind, "auto", preset, vocab, device, strategy)
        if compiled:
            providers[f"{kind}-compiled"] = build(kind, "auto", preset, vocab, device, strategy,
                                                  compiled=True)
    fused = resolve_backend("auto", device)
    space = providers["standard"][0].space
    median, median_passes, graphs, times = time_providers(providers, space, shape, reps,
                                                          warmup, device, amp)
    result = {"shape": name, "preset": preset, "vocab": vocab, "batch": batch,
              "src_len": s_len, "tgt_len": t_len, "fused_backend": fused, "strategy": strategy,
              "amp": amp, "reps": reps,
              "median_ms": median, "median_forward_backward_ms": median_passes,
              "params": {p: sum(x.numel() for x in m.parameters())
                         for p, (m, _) in providers.items()},
              "ratios": step_ratios(kinds, median, median_passes, compiled),
              "paired_ratios": paired_ratios(kinds, times)}
    if compiled:
        result["compiled_graphs"] = graphs
    log(f"[{name}] batch {batch}x({s_len}+{t_len}) vocab {vocab}, fused backend {fused!r}, "
        f"strategy {strategy!r}, median of {reps}"
        + (f" (graphs compiled: {graphs})" if compiled else "") + ":")
    for p, ms in median.items():
        log(f"  {p:16s} {ms:9.1f} ms/step ({median_passes[p]:9.1f} ms forward+backward)")
    for r, v in result["ratios"].items():
        log(f"  {r:44s} {v:6.3f}")
    for r, v in result["paired_ratios"].items():
        log(f"  {r + ' (median of paired)':44s} {v:6.3f}")
    if search_archs:
        names = ["standard"] + [f"{k}-fused" for k in kinds]
        throughput, sentences = search_throughput(providers, names, space, shape, search_archs,
                                                  device)
        result.update(search_archs_per_second=throughput, search_valid_sentences=sentences)
        log(f"  search: architectures/s on {sentences} validation sentences: " +
            ", ".join(f"{p} {v:.2f}" for p, v in throughput.items()))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,small")
    ap.add_argument("--kinds", default="neuron")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--search-archs", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--amp", default="off", choices=list(AMP),
                    help="autocast the forward passes as the trainer's --amp does")
    ap.add_argument("--strategy", default="auto", choices=STRATEGIES,
                    help="the MoS op's strategy, as the trainers' --strategy")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fused model under torch.compile (trainers' --compile)")
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {torch.get_num_threads()} threads"))
    results = [bench_shape(s, a.kinds.split(","), a.reps, a.warmup, device, a.search_archs, log,
                           a.amp, a.strategy, a.compile) for s in a.shapes.split(",")]
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                            "threads": torch.get_num_threads(),
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
