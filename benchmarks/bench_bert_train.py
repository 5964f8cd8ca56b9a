"""Times one BERT supernet training step: standard supernet vs MoS naive vs MoS fused.

A step is what ``python -m mos_models.bert train`` does per batch: a sandwich (largest,
smallest and one random architecture, forward and backward each, gradients summed), gradient
clipping, and an AdamW step. Providers:
  standard   the weight-sharing supernet (FFN linears slice one weight)
  mos-naive  MoS FFN linears through backend="reference" (the paper's loop over experts)
  mos-fused  the same MoS model through backend="auto" (the fused kernels of the device)
  mos-saved  mos-fused with save_mixed_weight=True (W_a kept from the forward for the backward)
  mos-compiled  with --compile: mos-fused with its layers under torch.compile (the trainers'
             --compile; its own copy of the model, the same weights)
The MoS providers share one model (same weights), so they differ only in how the op runs.
Each repetition runs every provider once in a shuffled order; the table shows medians and the
ratios. The random architecture is fixed, so every provider runs the same three sub-networks.
Prints the table; writes JSON only where --json says.

    python benchmarks/bench_bert_train.py                                 # CPU, tiny preset
    python benchmarks/bench_bert_train.py --device cuda --preset full     # GPU, bfloat16
"""
import argparse
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mos_kernels  # noqa: E402
from mos_models.bert.data import NUM_SPECIAL, mask_tokens  # noqa: E402
from mos_models.bert.model import BertSupernet  # noqa: E402
from mos_models.bert.space import PRESETS, get_space  # noqa: E402
from mos_models.bert.train import make_optimizer  # noqa: E402
from mos_models.common import (AMP, MixedPrecision, sandwich_step, set_backend,  # noqa: E402
                               write_json)
from mos_models.common.compile import compile_model, compile_stats  # noqa: E402

from bench_op import Clock, environment  # noqa: E402  (this folder is on sys.path)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="default tiny on CPU, full on CUDA")
    ap.add_argument("--space", default="supershaper", choices=["supershaper", "homogeneous"])
    ap.add_argument("--granularity", default="neuron", choices=["neuron", "layer"])
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per step (default: tiny's 32; 128 for full)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="default 4000 (tiny), 30522 (full)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default float32 on CPU, bfloat16 on CUDA (parameters too)")
    ap.add_argument("--amp", default="off", choices=list(AMP),
                    help="autocast the forward passes as the trainers' --amp does (use with "
                         "--dtype float32)")
    ap.add_argument("--reps", type=int, default=None, help="default 10 on CPU, 30 on CUDA")
    ap.add_argument("--strategy", default="auto", choices=mos_kernels.STRATEGIES,
                    help="the MoS op's strategy, as the trainers' --strategy")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fused model under torch.compile (trainers' --compile)")
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    return ap.parse_args(argv)


def make_providers(args, space, vocab, seq_len, device, dtype):
    """{name: ((model, optimizer), backend, save_mixed_weight)}; the MoS ones share a model."""
    def build(kind, compiled=False):
        torch.manual_seed(0)
        model = BertSupernet(space, vocab, seq_len, supernet=kind, num_experts=args.experts,
                             dropout=0.0).to(device=device, dtype=dtype).train()
        compile_model(model, compiled, None, device)
        return model, make_optimizer(model, 1e-4, 0.01)

    mos = build(args.granularity)
    providers = {"standard": (build("standard"), "auto", False),
                 "mos-naive": (mos, "reference", False), "mos-fused": (mos, "auto", False),
                 "mos-saved": (mos, "auto", True)}
    if args.compile:
        providers["mos-compiled"] = (build(args.granularity, True), "auto", False)
    return providers


def time_steps(step, names, reps, clock):
    """Seconds per step of each provider: warm-up (and compilation) first, then ``reps``
    rounds in shuffled orders; and the graphs compiled in the warm-up and in the timed rounds."""
    graphs = [compile_stats()["compiled_graphs"]]
    for name in names:
        step(name), step(name)
    graphs.append(compile_stats()["compiled_graphs"])
    times = {name: [] for name in names}
    order = list(names)
    random.seed(0)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            times[name].append(clock(lambda: step(name)))
    graphs.append(compile_stats()["compiled_graphs"])
    return times, {"warmup": graphs[1] - graphs[0], "timed": graphs[2] - graphs[1]}


def ratios_of(med):
    ratios = {"fused_over_standard": med["mos-fused"] / med["standard"],
              "naive_over_standard": med["mos-naive"] / med["standard"],
              "naive_over_fused": med["mos-naive"] / med["mos-fused"],
              "saved_over_standard": med["mos-saved"] / med["standard"],
              "saved_over_fused": med["mos-saved"] / med["mos-fused"]}
    if "mos-compiled" in med:
        ratios["compiled_over_fused"] = med["mos-compiled"] / med["mos-fused"]
        ratios["compiled_over_standard"] = med["mos-compiled"] / med["standard"]
    return ratios


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("full" if cuda else "tiny")
    settings = PRESETS[preset]
    batch = args.batch_size or (settings.batch_size if preset == "tiny" else 128)
    seq_len = args.seq_len or settings.seq_len
    vocab = args.vocab_size or (4000 if preset == "tiny" else 30522)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    reps = args.reps or (30 if cuda else 10)
    space = get_space(args.space, preset)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(NUM_SPECIAL, vocab, (batch, seq_len), generator=g)
    inputs, labels = (t.to(device) for t in mask_tokens(ids, vocab, g))
    archs = [space.largest(), space.smallest(), space.sample(random.Random(0))]
    providers = make_providers(args, space, vocab, seq_len, device, dtype)
    precision = {name: MixedPrecision(args.amp, device.type) for name in providers}

    def step(name):
        (model, opt), backend, saved = providers[name]
        set_backend(model, backend, saved, args.strategy)
        opt.zero_grad(set_to_none=True)
        sandwich_step(model, archs, lambda net, arch: net(inputs, labels), precision[name])
        precision[name].step(opt, model.parameters(), 1.0)

    env = environment(device)
    fused = mos_kernels.resolve_backend("auto", device)
    print(f"# {env['device']} | {env['date']} | commit {env['commit']} | torch {env['torch']} | "
          f"{env['threads']} threads | {dtype} | amp {args.amp} | auto -> {fused} | "
          f"strategy {args.strategy}")
    print(f"# {space.name} space ({preset}), {args.granularity}-wise MoS, m={args.experts}, "
          f"batch {batch} x {seq_len} tokens, vocab {vocab}, sandwich of 3 archs + AdamW")
    times, graphs = time_steps(step, list(providers), reps, Clock(device))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = ratios_of(med)
    for name in providers:
        print(f"{name:12} median {1e3 * med[name]:9.2f} ms  (min {1e3 * min(times[name]):.2f},"
              f" max {1e3 * max(times[name]):.2f}, {reps} reps)")
    print("  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.compile:
        print(f"graphs compiled: {graphs}")
    if args.json:
        params = {"standard": sum(p.numel() for p in providers["standard"][0][0].parameters()),
                  "mos": sum(p.numel() for p in providers["mos-fused"][0][0].parameters())}
        write_json(args.json, dict(
            environment=env, fused_backend=fused, dtype=str(dtype), amp=args.amp,
            strategy=args.strategy, compiled_graphs=graphs if args.compile else None,
            preset=preset, space=space.name, granularity=args.granularity, experts=args.experts,
            batch=batch, seq_len=seq_len, vocab=vocab, reps=reps, params=params, median_s=med,
            times_s=times, ratios=ratios, command=" ".join(sys.argv)))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
