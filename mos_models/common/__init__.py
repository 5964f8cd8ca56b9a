"""Infrastructure shared by the supernets in mos_models (MT, BERT, and what comes next).

- trainer: the training core (``Task``, ``TrainConfig``, ``train``): sampling, budgets, the
  schedule, seeds, mixed precision, torch.compile, DDP, checkpoints and --resume, logging.
- run: the run-directory and export-directory formats, ``load_run``, ``save_export``.
- checkpoint: atomic save, weights-only load, the newest loadable checkpoint.
- training: the step's pieces (sampling, batch indices, sandwich step, MixedPrecision, the
  schedule).
- distributed: torchrun/DDP set-up and the clock shared by all ranks.
- compile: --compile.
- elastic: ElasticLinear (standard / neuron-wise MoS / layer-wise MoS behind one interface),
  ElasticEmbedding, ElasticLayerNorm, set_backend.
- evolution: GeneSpace (named genes with choices, ``parse`` for --arch) and evolutionary_search.
- cli: the command-line flag groups the model commands share.
- study: the supernet-quality study (inherited against standalone scores; ``study`` commands).
- timing: warm-up + many runs + trimmed mean, for latency measurement.
"""
from mos_kernels import BACKENDS, STRATEGIES

from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_latest,
                         load_training_state, save_checkpoint, save_training_state)
from .distributed import (DistInfo, barrier, cleanup_distributed, init_distributed,
                          shared_clock, unwrap, wrap_ddp)
from .elastic import ElasticEmbedding, ElasticLayerNorm, ElasticLinear, set_backend
from .evolution import EvolutionConfig, GeneSpace, SearchResult, evolutionary_search
from .run import Run, load_export, load_run, read_run_config, save_export, write_json
from .timing import measure_latency, time_runs, trimmed_mean
from .trainer import Task, TrainConfig, fill_none, train
from .training import (AMP, SAMPLING, MixedPrecision, arch_rng, batch_indices,
                       fused_adam_options, lr_factor,
                       progress_bar, sample_archs, sandwich_step, step_seed, warmup_cosine,
                       warmup_cosine_factor)

__all__ = [
    "AMP", "BACKENDS", "CheckpointError", "DistInfo", "ElasticEmbedding", "ElasticLayerNorm",
    "ElasticLinear", "EvolutionConfig", "GeneSpace", "MixedPrecision", "Run", "SAMPLING",
    "STRATEGIES", "SearchResult", "Task", "TrainConfig", "arch_rng", "barrier", "batch_indices",
    "cleanup_distributed", "evolutionary_search", "fill_none", "fused_adam_options",
    "init_distributed", "latest_checkpoint", "load_checkpoint", "load_export", "load_latest",
    "load_run", "load_training_state", "lr_factor", "measure_latency", "progress_bar",
    "read_run_config", "sample_archs", "sandwich_step", "save_checkpoint", "save_export",
    "save_training_state", "set_backend", "shared_clock", "step_seed", "time_runs", "train",
    "trimmed_mean", "unwrap", "warmup_cosine", "warmup_cosine_factor", "wrap_ddp", "write_json",
]
