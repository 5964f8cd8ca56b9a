"""The MT search space (HAT's), its presets, and the 10-number architecture encoding.

An architecture is a dict of genes (``MTSpace.genes``):

    encoder_embed, decoder_embed          embedding dims
    encoder_layers, decoder_layers        layer counts
    encoder_ffn_i, encoder_heads_i        per encoder layer i (used for i < encoder_layers)
    decoder_ffn_i, decoder_self_heads_i,  per decoder layer i (used for i < decoder_layers)
    decoder_cross_heads_i, decoder_ende_i (ende: how many of the last encoder layers it attends)

Genes of layers beyond the layer count are kept (so that mutation can bring them back) but do not
matter: ``MTSpace.key`` ignores them, so equal sub-networks compare equal.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Tuple

from ..common.evolution import Arch, GeneSpace


@dataclass(frozen=True)
class SpaceConfig:
    """Choices of the search space and the fixed sizes of the supernet."""
    embed_choices: Tuple[int, ...]
    encoder_layer_choices: Tuple[int, ...]
    decoder_layer_choices: Tuple[int, ...]
    ffn_choices: Tuple[int, ...]
    head_choices: Tuple[int, ...]
    ende_choices: Tuple[int, ...] = (1, 2, 3)
    qkv_dim: int = 512  # attention width, fixed as in HAT; the heads split it
    dropout: float = 0.1

    @property
    def max_encoder_layers(self) -> int:
        return max(self.encoder_layer_choices)

    @property
    def max_decoder_layers(self) -> int:
        return max(self.decoder_layer_choices)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "SpaceConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                      if k in known})


@dataclass(frozen=True)
class TrainPreset:
    space: SpaceConfig
    max_tokens: int = 4096      # tokens (source + target) per batch and process
    lr: float = 1e-3
    warmup_steps: int = 400
    max_steps: int = 50000
    min_lr_ratio: float = 0.02
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    vocab_size: int = 8000
    extra: Dict = field(default_factory=dict)


PRESETS: Dict[str, TrainPreset] = {
    # The paper's (HAT's) space on WMT: embed {512, 640}, 6 encoder layers, 1-6 decoder layers,
    # FFN {1024, 2048, 3072}, heads {4, 8}, decoder attends to the last 1-3 encoder layers.
    "full": TrainPreset(
        SpaceConfig(embed_choices=(512, 640), encoder_layer_choices=(6,),
                    decoder_layer_choices=(1, 2, 3, 4, 5, 6), ffn_choices=(1024, 2048, 3072),
                    head_choices=(4, 8), qkv_dim=512, dropout=0.3),
        max_tokens=4096, lr=1e-3, warmup_steps=10000, max_steps=40000, vocab_size=32000),
    # The same structure, scaled down for a CPU.
    "small": TrainPreset(
        SpaceConfig(embed_choices=(192, 256), encoder_layer_choices=(4,),
                    decoder_layer_choices=(1, 2, 3, 4), ffn_choices=(384, 768, 1024),
                    head_choices=(2, 4), qkv_dim=256),
        max_tokens=4096, lr=1e-3, warmup_steps=400, max_steps=20000),
    "tiny": TrainPreset(
        SpaceConfig(embed_choices=(64, 96), encoder_layer_choices=(3,),
                    decoder_layer_choices=(1, 2, 3), ffn_choices=(96, 192, 288),
                    head_choices=(2, 4), qkv_dim=96, dropout=0.0),
        max_tokens=768, lr=4e-3, warmup_steps=50, max_steps=6000, vocab_size=4000),
    # For tests and smoke runs only: seconds per run, nothing learned.
    "micro": TrainPreset(
        SpaceConfig(embed_choices=(16, 24), encoder_layer_choices=(2,),
                    decoder_layer_choices=(1, 2), ffn_choices=(16, 32), head_choices=(2, 4),
                    ende_choices=(1, 2), qkv_dim=16, dropout=0.1),
        max_tokens=256, lr=1e-3, warmup_steps=2, max_steps=10, vocab_size=64),
}


class MTSpace(GeneSpace):
    """HAT's per-layer gene space for a SpaceConfig."""

    def __init__(self, config: SpaceConfig):
        self.config = c = config
        genes = {"encoder_embed": c.embed_choices, "decoder_embed": c.embed_choices,
                 "encoder_layers": c.encoder_layer_choices,
                 "decoder_layers": c.decoder_layer_choices}
        for i in range(c.max_encoder_layers):
            genes[f"encoder_ffn_{i}"] = c.ffn_choices
            genes[f"encoder_heads_{i}"] = c.head_choices
        ende = [e for e in c.ende_choices if e <= c.max_encoder_layers] or [1]
        for i in range(c.max_decoder_layers):
            genes[f"decoder_ffn_{i}"] = c.ffn_choices
            genes[f"decoder_self_heads_{i}"] = c.head_choices
            genes[f"decoder_cross_heads_{i}"] = c.head_choices
            genes[f"decoder_ende_{i}"] = ende
        super().__init__(genes)

    def active_genes(self, arch: Arch) -> List[str]:
        names = ["encoder_embed", "decoder_embed", "encoder_layers", "decoder_layers"]
        for i in range(arch["encoder_layers"]):
            names += [f"encoder_ffn_{i}", f"encoder_heads_{i}"]
        for i in range(arch["decoder_layers"]):
            names += [f"decoder_ffn_{i}", f"decoder_self_heads_{i}",
                      f"decoder_cross_heads_{i}", f"decoder_ende_{i}"]
        return names

    def key(self, arch: Arch) -> Tuple:
        return tuple((name, arch[name]) for name in self.active_genes(arch))

    def validate(self, arch: Arch) -> Arch:
        """Checks an architecture; genes of inactive layers may be omitted (filled with the
        smallest choice)."""
        arch = dict(arch)
        for name in ("encoder_layers", "decoder_layers"):
            if name not in arch:
                raise ValueError(f"architecture is missing gene {name!r}")
        for name, choices in self.genes.items():
            if name not in arch and name not in self.active_genes(arch):
                arch[name] = min(choices)
        return super().validate(arch)

    def encode(self, arch: Arch) -> List[float]:
        """The router's 10 numbers, each divided by its maximum (docs/design.md)."""
        c = self.config
        n_enc, n_dec = arch["encoder_layers"], arch["decoder_layers"]

        def mean(prefix, n):
            return sum(arch[f"{prefix}_{i}"] for i in range(n)) / n

        max_ffn, max_heads = max(c.ffn_choices), max(c.head_choices)
        return [arch["encoder_embed"] / max(c.embed_choices),
                n_enc / c.max_encoder_layers,
                mean("encoder_ffn", n_enc) / max_ffn,
                mean("encoder_heads", n_enc) / max_heads,
                arch["decoder_embed"] / max(c.embed_choices),
                n_dec / c.max_decoder_layers,
                mean("decoder_ffn", n_dec) / max_ffn,
                mean("decoder_self_heads", n_dec) / max_heads,
                mean("decoder_cross_heads", n_dec) / max_heads,
                mean("decoder_ende", n_dec) / max(self.genes["decoder_ende_0"])]


ARCH_DIM = 10


def describe(arch: Arch) -> str:
    """A short human-readable summary of an architecture."""
    enc = [f"{arch[f'encoder_ffn_{i}']}/{arch[f'encoder_heads_{i}']}"
           for i in range(arch["encoder_layers"])]
    dec = [f"{arch[f'decoder_ffn_{i}']}/{arch[f'decoder_self_heads_{i}']}/"
           f"{arch[f'decoder_cross_heads_{i}']}/{arch[f'decoder_ende_{i}']}"
           for i in range(arch["decoder_layers"])]
    return (f"enc {arch['encoder_embed']}x{arch['encoder_layers']} [{' '.join(enc)}] "
            f"dec {arch['decoder_embed']}x{arch['decoder_layers']} [{' '.join(dec)}]")
