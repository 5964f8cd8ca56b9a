"""Infrastructure shared by the supernets in mos_models (MT, BERT).

- elastic: ElasticLinear (standard / neuron-wise MoS / layer-wise MoS behind one interface),
  ElasticEmbedding, ElasticLayerNorm, set_backend.
- checkpoint: atomic save, load-latest, full training state for --resume.
- evolution: GeneSpace (named genes with choices) and evolutionary_search (HAT's settings).
- training: sandwich/SPOS sampling and step, mixed precision (--amp), fused Adam where torch has
  it, torchrun/DDP setup, warmup+cosine, ProgressBar.
- timing: warm-up + many runs + trimmed mean, for latency measurement.
"""
from .checkpoint import (latest_checkpoint, load_checkpoint, load_training_state,
                         save_checkpoint, save_training_state)
from .elastic import ElasticEmbedding, ElasticLayerNorm, ElasticLinear, set_backend
from .evolution import EvolutionConfig, GeneSpace, SearchResult, evolutionary_search
from .timing import measure_latency, time_runs, trimmed_mean
from .training import (AMP, DistInfo, MixedPrecision, ProgressBar, arch_rng, cleanup_distributed,
                       fused_adam_options, init_distributed, sample_archs, sandwich_step, unwrap,
                       warmup_cosine, warmup_cosine_factor, wrap_ddp)

__all__ = [
    "AMP", "DistInfo", "MixedPrecision", "ElasticEmbedding", "ElasticLayerNorm", "ElasticLinear",
    "EvolutionConfig", "GeneSpace", "ProgressBar", "SearchResult", "arch_rng",
    "cleanup_distributed", "evolutionary_search", "fused_adam_options", "init_distributed",
    "latest_checkpoint", "load_checkpoint", "load_training_state", "measure_latency",
    "sample_archs", "sandwich_step", "save_checkpoint", "save_training_state", "set_backend",
    "time_runs", "trimmed_mean", "unwrap", "warmup_cosine", "warmup_cosine_factor", "wrap_ddp",
]
