"""The BERT search spaces, their architecture encodings, and the presets.

An architecture is a dict of genes (``mos_models.common.GeneSpace``). Every space turns it into
a ``Layout``: the embedding (backbone) width and one (hidden, heads, ffn) triple per active layer,
which is all the model needs to select its sub-network and all an exported model stores.

- ``SuperShaperSpace`` (Ganesan et al., 2021): a fixed number of layers, each with its own hidden
  size, entered and left through bottleneck projections from/to a fixed backbone width; heads
  and FFN width fixed. Genes ``hidden_1`` ... ``hidden_L``. Encoding: the L hidden sizes, each
  divided by the largest choice.
- ``HomogeneousSpace`` (like AutoDistil's): every layer alike, no bottleneck, the embedding
  width equals the hidden size. Genes ``layers``, ``hidden``, ``ffn_ratio`` (FFN width
  ffn_ratio * hidden), ``heads``. Encoding: those four numbers in that order (the paper's,
  A.4.1), each divided by its largest choice.
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Sequence, Tuple

from ..common.evolution import GeneSpace

Arch = Dict[str, object]


class Layout(NamedTuple):
    embed_dim: int
    layers: Tuple[Tuple[int, int, int], ...]   # (hidden, heads, ffn) per active layer


class SuperShaperSpace(GeneSpace):
    name = "supershaper"
    bottleneck = True

    def __init__(self, backbone: int = 768, num_layers: int = 12,
                 hidden_choices: Sequence[int] = (120, 240, 360, 480, 540, 600, 768),
                 heads: int = 12, ffn: int = 3072):
        bad = [h for h in hidden_choices if h % heads or h > backbone]
        if bad:
            raise ValueError(f"SuperShaperSpace: hidden sizes {bad} are not divisible by heads = "
                             f"{heads} or exceed the backbone {backbone}")
        self.backbone, self.num_layers, self.heads, self.ffn = backbone, num_layers, heads, ffn
        self.hidden_choices = tuple(sorted(hidden_choices))
        super().__init__({f"hidden_{i + 1}": self.hidden_choices for i in range(num_layers)})

    @property
    def arch_dim(self) -> int:
        return self.num_layers

    def max_dims(self) -> Dict[str, int]:
        return {"embed_dim": self.backbone, "num_layers": self.num_layers,
                "hidden": max(self.hidden_choices), "heads": self.heads, "ffn": self.ffn}

    def encode(self, arch: Arch) -> List[float]:
        arch = self.validate(arch)
        top = max(self.hidden_choices)
        return [arch[g] / top for g in self.genes]

    def layout(self, arch: Arch) -> Layout:
        arch = self.validate(arch)
        return Layout(self.backbone, tuple((arch[g], self.heads, self.ffn) for g in self.genes))

    def size(self) -> int:
        return len(self.hidden_choices) ** self.num_layers

    def to_dict(self) -> dict:
        return {"name": self.name, "backbone": self.backbone, "num_layers": self.num_layers,
                "hidden_choices": list(self.hidden_choices), "heads": self.heads,
                "ffn": self.ffn}


class HomogeneousSpace(GeneSpace):
    name = "homogeneous"
    bottleneck = False

    def __init__(self, layer_choices: Sequence[int] = (12,),
                 hidden_choices: Sequence[int] = tuple(range(120, 769, 12)),
                 head_choices: Sequence[int] = (6, 12),
                 ffn_ratios: Sequence[float] = (2.0, 2.5, 3.0, 3.5, 4.0)):
        for h in hidden_choices:
            for a in head_choices:
                if h % a:
                    raise ValueError(f"HomogeneousSpace: hidden {h} not divisible by heads {a}")
            for r in ffn_ratios:
                if r * h != int(r * h):
                    raise ValueError(f"HomogeneousSpace: ffn_ratio {r} * hidden {h} is not whole")
        super().__init__({"layers": sorted(int(n) for n in layer_choices),
                          "hidden": sorted(int(h) for h in hidden_choices),
                          "ffn_ratio": sorted(float(r) for r in ffn_ratios),
                          "heads": sorted(int(a) for a in head_choices)})

    @property
    def arch_dim(self) -> int:
        return 4

    def max_dims(self) -> Dict[str, int]:
        hidden = max(self.genes["hidden"])
        return {"embed_dim": hidden, "num_layers": max(self.genes["layers"]), "hidden": hidden,
                "heads": max(self.genes["heads"]),
                "ffn": int(max(self.genes["ffn_ratio"]) * hidden)}

    def encode(self, arch: Arch) -> List[float]:
        arch = self.validate(arch)
        return [arch[g] / max(c) for g, c in self.genes.items()]

    def layout(self, arch: Arch) -> Layout:
        arch = self.validate(arch)
        hidden = arch["hidden"]
        layer = (hidden, arch["heads"], int(arch["ffn_ratio"] * hidden))
        return Layout(hidden, (layer,) * arch["layers"])

    def size(self) -> int:
        n = 1
        for c in self.genes.values():
            n *= len(c)
        return n

    def to_dict(self) -> dict:
        return {"name": self.name, "layer_choices": self.genes["layers"],
                "hidden_choices": self.genes["hidden"], "head_choices": self.genes["heads"],
                "ffn_ratios": self.genes["ffn_ratio"]}


def space_from_dict(d: dict):
    """Rebuilds a space from ``to_dict()`` (checkpoints carry their space)."""
    kwargs = {k: v for k, v in d.items() if k != "name"}
    if d.get("name") == "supershaper":
        return SuperShaperSpace(**kwargs)
    if d.get("name") == "homogeneous":
        return HomogeneousSpace(**kwargs)
    raise ValueError(f"space_from_dict: unknown space {d.get('name')!r}")


_SPACE_ARGS = {
    ("supershaper", "full"): {},
    ("homogeneous", "full"): {},
    # Same structure, numbers scaled down for a CPU (12 layers/heads -> 4, 768 wide -> 128).
    ("supershaper", "tiny"): {"backbone": 128, "num_layers": 4,
                              "hidden_choices": (32, 48, 64, 80, 96, 112, 128), "heads": 4,
                              "ffn": 512},
    ("homogeneous", "tiny"): {"layer_choices": (4,), "hidden_choices": tuple(range(32, 129, 8)),
                              "head_choices": (2, 4)},
}


def get_space(name: str, preset: str):
    if (name, preset) not in _SPACE_ARGS:
        raise ValueError(f"unknown space/preset {name!r}/{preset!r}: spaces are supershaper, "
                         f"homogeneous; presets are {sorted(PRESETS)}")
    cls = SuperShaperSpace if name == "supershaper" else HomogeneousSpace
    return cls(**_SPACE_ARGS[(name, preset)])


@dataclass(frozen=True)
class TrainSettings:
    seq_len: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    steps: int
    dropout: float


# "full": the paper's (SuperShaper's) pretraining recipe. "tiny": sized for a 2-core CPU, where
# a 10-minute run is limited by the tokens it can process (at equal tokens batch 8, 16 and 32
# reached the same perplexity, lr 3e-3 stalled, dropout only cost time), so no dropout.
PRESETS = {
    "full": TrainSettings(seq_len=128, batch_size=2048, lr=5e-4, weight_decay=0.01,
                          warmup_steps=10_000, steps=125_000, dropout=0.1),
    "tiny": TrainSettings(seq_len=64, batch_size=32, lr=1e-3, weight_decay=0.01,
                          warmup_steps=100, steps=2000, dropout=0.0),
}
