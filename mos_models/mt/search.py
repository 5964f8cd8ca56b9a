"""Latency-constrained architecture search, as in HAT.

1. Measure the latency of sampled architectures on the local device: the exported static model
   translates a ``src_len``-token sentence (batch 1) with ``tgt_len`` incremental greedy decoding
   steps; warm-up runs, then the trimmed mean of many runs.
2. Fit an MLP latency predictor on the 10-number encodings; report its error on held-out
   architectures.
3. For each latency limit, run the evolutionary search with fitness = validation loss of the
   inherited supernet weights, dropping candidates whose predicted latency exceeds the limit;
   measure the chosen architecture's real latency.
"""
import json
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..common.evolution import Arch, EvolutionConfig, evolutionary_search
from ..common.timing import trimmed_mean, time_runs
from .config import describe
from .data import BOS, EOS, Tokenizer, detect_lang, load_split, make_batches
from .model import MTSupernet, Transformer
from .train import evaluate_loss, load_run


@torch.no_grad()
def decode_latency(model: Transformer, vocab_size: int, src_len: int = 30, tgt_len: int = 30,
                    warmup: int = 3, runs: int = 10, trim: float = 0.1, device="cpu") -> float:
    """Milliseconds to encode one ``src_len``-token sentence and decode ``tgt_len`` tokens."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(EOS + 1, vocab_size, (1, src_len), generator=gen).to(device)

    def run():
        enc = model.encode(src)
        cache: list = []
        token = torch.full((1, 1), BOS, dtype=torch.long, device=device)
        for step in range(tgt_len):
            token = model.decode(token, enc, cache, start=step)[:, -1:].argmax(-1)

    return trimmed_mean(time_runs(run, warmup, runs, torch.device(device)), trim)


class LatencyPredictor(nn.Module):
    """MLP from the architecture encoding to latency (ms)."""

    def __init__(self, arch_dim: int = 10, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(arch_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, encodings: torch.Tensor) -> torch.Tensor:
        return self.net(encodings).squeeze(-1) * self.scale

    def fit(self, encodings: torch.Tensor, latencies: torch.Tensor, steps: int = 500,
            lr: float = 1e-2, seed: int = 0) -> "LatencyPredictor":
        """Full-batch Adam on the relative squared error. Few steps on purpose: with ~100
        architectures, longer fits overfit (the held-out error grows with the steps)."""
        torch.manual_seed(seed)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        self.scale.fill_(float(latencies.mean()))
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((self(encodings) - latencies) / self.scale).square().mean()
            loss.backward()
            opt.step()
        return self


def prediction_error(predicted: Sequence[float], measured: Sequence[float]) -> Dict:
    errors = [abs(p - m) for p, m in zip(predicted, measured)]
    return {"mae_ms": sum(errors) / len(errors),
            "rmse_ms": (sum(e * e for e in errors) / len(errors)) ** 0.5,
            "mean_relative_error": sum(e / m for e, m in zip(errors, measured)) / len(errors),
            "held_out": len(errors)}


def measure_space(supernet: MTSupernet, count: int, seed: int = 0, device="cpu",
                  log=print, **timing) -> List[Dict]:
    """Latencies of the largest, the smallest and ``count - 2`` random distinct architectures."""
    rng = random.Random(seed)
    space = supernet.space
    archs, keys = [], set()
    candidates = [space.largest(), space.smallest()]
    while len(archs) < count:
        arch = candidates.pop() if candidates else space.sample(rng)
        if space.key(arch) not in keys:
            keys.add(space.key(arch))
            archs.append(arch)
    records = []
    for i, arch in enumerate(archs):
        static = supernet.export(arch).to(device)
        ms = decode_latency(static, supernet.vocab_size, device=device, **timing)
        records.append({"arch": arch, "latency_ms": ms})
        if (i + 1) % 20 == 0 or i + 1 == len(archs):
            log(f"  measured {i + 1}/{len(archs)} architectures")
    return records


def fit_predictor(supernet: MTSupernet, records: List[Dict], holdout: float = 0.2,
                  seed: int = 0):
    """(predictor fitted on all records, its error on a held-out ``holdout`` fraction when
    fitted without them)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(int(len(records) * holdout), 1)
    enc = torch.tensor([supernet.space.encode(r["arch"]) for r in records])
    lat = torch.tensor([r["latency_ms"] for r in records])
    test, train = order[:n_test], order[n_test:]
    held = LatencyPredictor().fit(enc[train], lat[train], seed=seed)
    with torch.no_grad():
        error = prediction_error(held(enc[test]).tolist(), lat[test].tolist())
    return LatencyPredictor().fit(enc, lat, seed=seed).eval(), error


def cached_latencies(supernet: MTSupernet, cache_file: Path, samples: int, timing: Dict,
                     device, log=print) -> List[Dict]:
    """``samples`` latency measurements, from ``cache_file`` when it holds enough made with the
    same timing settings, else measured now and written there."""
    if cache_file.exists():
        with open(cache_file) as f:
            cached = json.load(f)
        if cached.get("timing") == timing and len(cached["records"]) >= samples:
            log(f"using {samples} latency measurements from {cache_file}")
            return cached["records"][:samples]
    log(f"measuring the latency of {samples} architectures on {device}")
    records = measure_space(supernet, samples, device=device, log=log, **timing)
    with open(cache_file, "w") as f:
        json.dump({"timing": timing, "records": records}, f)
    return records


def _search_limit(supernet: MTSupernet, limit: float, fitness, predict, config, fastest: float,
                  device, timing: Dict, out_json, log=print) -> Dict:
    """The best architecture whose predicted latency is at most ``limit`` ms, its measured
    latency, and its file ``OUT.arch_<limit>ms.json``."""
    start = time.perf_counter()
    if limit < fastest:
        log(f"warning: {limit} ms is below the fastest measured architecture "
            f"({fastest:.2f} ms); the predictor extrapolates there")
    try:
        found = evolutionary_search(supernet.space, fitness, lambda a: predict(a) <= limit,
                                    config)
    except RuntimeError as exc:
        log(f"latency {limit} ms: infeasible ({exc})")
        return {"latency_limit_ms": limit, "arch": None, "error": str(exc)}
    arch = found.best
    measured = decode_latency(supernet.export(arch).to(device), supernet.vocab_size,
                              device=device, **timing)
    entry = {"latency_limit_ms": limit, "arch": arch, "description": describe(arch),
             "valid_loss": found.best_fitness, "predicted_latency_ms": predict(arch),
             "measured_latency_ms": measured, "extrapolated": limit < fastest,
             "history": found.history, "seconds": time.perf_counter() - start}
    arch_file = Path(str(out_json).removesuffix(".json") + f".arch_{limit:g}ms.json")
    with open(arch_file, "w") as f:
        json.dump({"arch": arch, "latency_limit_ms": limit}, f, indent=1)
    log(f"latency <= {limit} ms: {describe(arch)}; valid loss {found.best_fitness:.4f}, "
        f"predicted {entry['predicted_latency_ms']:.2f} ms, measured {measured:.2f} ms "
        f"-> {arch_file}")
    return entry


def mark_pareto(results: List[Dict]) -> None:
    """Sets "pareto" on every found entry: not dominated in (measured latency, valid loss)."""
    found = [r for r in results if r["arch"] is not None]
    for r in found:
        point = (r["measured_latency_ms"], r["valid_loss"])
        r["pareto"] = not any(
            o is not r and o["measured_latency_ms"] <= point[0] and o["valid_loss"] <= point[1]
            and (o["measured_latency_ms"], o["valid_loss"]) != point for o in found)


def run_search(run_dir, limits_ms: Sequence[float], out_json, samples: int = 100,
               valid_sentences: int = 300, config: Optional[EvolutionConfig] = None,
               device="cpu", timing: Optional[Dict] = None, log=print) -> Dict:
    run_dir = Path(run_dir)
    supernet, run = load_run(run_dir, device, log=log)
    if not isinstance(supernet, MTSupernet):
        raise ValueError(f"search: {run_dir} holds a static model, not a supernet")
    config, timing = config or EvolutionConfig(), dict(timing or {})
    records = cached_latencies(supernet, run_dir / f"latency_{torch.device(device).type}.json",
                               samples, timing, device, log)
    predictor, error = fit_predictor(supernet, records)
    log(f"latency predictor held-out error: MAE {error['mae_ms']:.3f} ms, mean relative "
        f"{100 * error['mean_relative_error']:.1f}%")

    def predict(arch: Arch) -> float:
        with torch.no_grad():
            return float(predictor(torch.tensor([supernet.space.encode(arch)]))[0])

    data = run.task_config.data
    src, tgt, _ = load_split(data, "valid", Tokenizer(run_dir / "spm.model"), detect_lang(data))
    src, tgt = src[:valid_sentences], tgt[:valid_sentences]
    batches = make_batches(src, tgt, run.task_config.max_tokens)
    scores: Dict = {}
    fitness_seconds = [0.0]

    def fitness(arch: Arch) -> float:
        key = supernet.space.key(arch)
        if key not in scores:
            start = time.perf_counter()
            scores[key] = evaluate_loss(supernet, batches, src, tgt, device, arch)
            fitness_seconds[0] += time.perf_counter() - start
        return scores[key]

    fastest = min(r["latency_ms"] for r in records)
    results = [_search_limit(supernet, limit, fitness, predict, config, fastest, device, timing,
                             out_json, log) for limit in limits_ms]
    mark_pareto(results)
    report = {"run": str(run_dir), "device": str(device), "supernet": supernet.kind,
              "predictor_error": error, "latency_samples": len(records),
              "measured_latency_range_ms": [fastest, max(r["latency_ms"] for r in records)],
              "evolution": vars(config), "valid_sentences": len(src),
              "architectures_evaluated": len(scores),
              "architectures_per_second": len(scores) / max(fitness_seconds[0], 1e-9),
              "results": results}
    with open(out_json, "w") as f:
        json.dump(report, f, indent=1)
    return report
