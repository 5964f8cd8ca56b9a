"""Machine translation supernet (HAT's space) with Mixture-of-Supernets FFN layers.

Modules: config (space, presets, encoding), data (gettext corpus, sentencepiece, batching),
model (MTSupernet, StaticTransformer), train, translate (beam search, BLEU), search (latency
predictor, evolutionary search), export. Command line: ``python -m mos_models.mt --help``.
"""
from .config import PRESETS, MTSpace, SpaceConfig
from .model import MTSupernet, StaticTransformer

__all__ = ["MTSpace", "MTSupernet", "PRESETS", "SpaceConfig", "StaticTransformer"]
