"""What the commands do with a trained hf run: score an architecture on the held-out sentences,
search the space under a parameter budget, export an architecture as a stock model.

Scores (``score``): ``perplexity`` (lower is better) for causal language models,
``teacher_cosine`` (mean cosine of mean-pooled last hidden states to the source model's; higher
is better) for encoders; on the run's held-out sentences (every ``valid_every``-th of its text).
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..common.run import Run
from .export import load_pretrained
from .supernet import HFSupernet
from .train import held_out_score, is_causal_lm, load_run, run_texts


@dataclass
class Loaded:
    """A run with what scoring needs: the supernet, the source model (the teacher), its
    tokenizer, the held-out sentences."""
    sn: HFSupernet
    run: Run
    teacher: nn.Module
    tokenizer: object
    valid: List[str]
    causal: bool

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "teacher_cosine"

    def score(self, ffn: Optional[int] = None, layers: Optional[int] = None) -> Dict:
        """{metric: value, "arch", "params"} of the architecture (None: full size)."""
        self.sn.set_arch(ffn=ffn, layers=layers)
        result = held_out_score(self.sn, self.teacher, self.tokenizer, self.valid, self.causal,
                                self.run.task_config.max_length)
        return {**result, "arch": dict(self.sn.arch), "params": self.sn.num_params()}


def open_run(run_dir: str, device="cpu", log: Callable[[str], None] = print) -> Loaded:
    sn, run = load_run(run_dir, device, log)
    config = run.task_config
    pre = load_pretrained(config.model, device)
    _, valid = run_texts(config)
    return Loaded(sn, run, pre.model, pre.tokenizer, valid, is_causal_lm(pre.model))


def evaluate_run(run_dir: str, ffn: Optional[int], layers: Optional[int], device="cpu",
                 log=print) -> Dict:
    loaded = open_run(run_dir, device, log)
    result = loaded.score(ffn, layers)
    return {**result, "sentences": len(loaded.valid), "step": loaded.run.step}


def search_run(run_dir: str, max_params: int, device="cpu", log=print) -> Dict:
    """The best-scoring architecture of the space's grid (every trained ffn x layers choice)
    whose exported model has at most ``max_params`` parameters; every candidate's score too."""
    loaded = open_run(run_dir, device, log)
    sn, space = loaded.sn, loaded.sn.space
    grid = [{"ffn": f, "layers": n} for f in space.genes["ffn"] for n in space.genes["layers"]]
    within = [a for a in grid if sn.num_params(a) <= max_params]
    if not within:
        smallest = min(sn.num_params(a) for a in grid)
        raise ValueError(f"search: max_params = {max_params:,} is below the smallest "
                         f"architecture's {smallest:,} parameters")
    start, candidates = time.monotonic(), []
    for arch in within:
        candidates.append(loaded.score(**arch))
        log(f"search: {arch} {loaded.metric} {candidates[-1][loaded.metric]:.4f}, "
            f"{candidates[-1]['params']:,} params ({time.monotonic() - start:.0f}s)")
    sign = 1 if loaded.causal else -1   # perplexity: lower is better; cosine: higher
    best = min(candidates, key=lambda c: (sign * c[loaded.metric], c["params"]))
    return {"method": "grid: every trained (ffn, layers) choice within the budget, scored on "
                      "the held-out sentences", "metric": loaded.metric, "arch": best["arch"],
            "params": best["params"], loaded.metric: best[loaded.metric],
            "max_params": int(max_params), "candidates": candidates,
            "skipped_over_budget": len(grid) - len(within), "step": loaded.run.step}


@torch.no_grad()
def export_run(run_dir: str, ffn: Optional[int], layers: Optional[int], out_dir: str,
               device="cpu", log=print) -> Dict:
    """Writes architecture (ffn, layers) of a run as a stock Hugging Face model directory (with
    the source's tokenizer files); returns what was written."""
    sn, run = load_run(run_dir, device, log)
    sn.set_arch(ffn=ffn, layers=layers)
    sn.export(out_dir, source_dir=run.task_config.model)
    return {"out": out_dir, "arch": dict(sn.arch), "params": sn.num_params(),
            "run": str(run.dir.resolve()), "step": run.step}
