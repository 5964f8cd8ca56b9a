"""Latency measurement: warm-up runs, many timed runs, a trimmed mean (or the median)."""
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch


def trimmed_mean(values: Sequence[float], trim: float = 0.1) -> float:
    """Mean of ``values`` after dropping the lowest and highest ``trim`` fraction of them."""
    if not values:
        raise ValueError("trimmed_mean: values must not be empty")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean: trim must be in [0, 0.5), got {trim}")
    ordered = sorted(values)
    cut = int(len(ordered) * trim)
    kept = ordered[cut:len(ordered) - cut]
    return sum(kept) / len(kept)


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], warmup: int = 5, runs: int = 30,
              device: Optional[torch.device] = None) -> List[float]:
    """Calls ``fn`` ``warmup`` times untimed, then ``runs`` times; returns each run's time in
    milliseconds. On CUDA devices the device is synchronised around each run."""
    if runs < 1:
        raise ValueError(f"time_runs: runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(fn: Callable[[], object], warmup: int = 5, runs: int = 30, trim: float = 0.1,
                    device: Optional[torch.device] = None) -> float:
    """Trimmed-mean latency of ``fn`` in milliseconds."""
    return trimmed_mean(time_runs(fn, warmup, runs, device), trim)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
