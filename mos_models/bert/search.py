"""Evolutionary search of a trained BERT supernet: minimise the validation MLM perplexity of
the inherited (supernet) weights over the architectures whose static sub-network has at most
``max_params`` parameters (``model.param_count``: what ``export`` would produce)."""
import math
import time

from ..common.evolution import EvolutionConfig, evolutionary_search
from .train import load_run, masked_valid, mlm_perplexity


def search(run_dir: str, max_params: int, config: EvolutionConfig = None, device="cpu",
           valid_blocks: int = None, log=print) -> dict:
    config = config or EvolutionConfig()
    model, run = load_run(run_dir, device, log)
    cfg = run.task_config
    space = model.space
    smallest = model.param_count(space.smallest())
    if smallest > max_params:
        raise ValueError(f"search: max_params = {max_params:,} is below the smallest "
                         f"architecture's {smallest:,} parameters")
    inputs, labels = masked_valid(cfg.data, cfg.seq_len, cfg.vocab_size, valid_blocks)

    def fitness(arch):
        model.set_arch(arch)
        return math.log(mlm_perplexity(model, inputs, labels, device=device))

    def within_budget(arch):
        return model.param_count(arch) <= max_params

    start = time.monotonic()

    def report(iteration, best_loss, best_arch):
        log(f"iteration {iteration + 1}/{config.iterations}: best perplexity "
            f"{math.exp(best_loss):.3f} with {model.param_count(best_arch):,} params "
            f"({time.monotonic() - start:.0f}s)")

    result = evolutionary_search(space, fitness, within_budget, config, on_iteration=report)
    return {"arch": result.best, "params": model.param_count(result.best),
            "perplexity": math.exp(result.best_fitness), "max_params": int(max_params),
            "history": [math.exp(h) for h in result.history], "evaluated": result.evaluated,
            "space": space.name, "supernet": cfg.supernet, "step": run.step,
            "valid_blocks": int(inputs.shape[0])}
