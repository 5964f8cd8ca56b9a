"""MoS supernets made from pretrained Hugging Face transformers models.

``to_supernet(model, ...)`` turns every FFN linear of a supported family (see families.py) into an
``ElasticLinear`` (a ``mos_kernels.MoSLinear`` for the MoS kinds) whose experts all start from the
pretrained weight and bias, after ordering neurons and layers by importance on calibration batches
(importance.py). The supernet wraps the Hugging Face model and calls its own forward, so outputs,
masks and caches are the model's: ``sn(**batch)`` returns what ``model(**batch)`` returns.

Elastic dimensions (the space, ``HFSpace``): ``ffn``, the FFN width of every layer (homogeneous,
the first ``ffn`` neurons after ordering), and ``layers``, the number of transformer layers: the
``layers`` most important ones (Minitron's block importance on the calibration batches), run in
their original order; without calibration data neurons and layers keep their order, so the first
``layers`` layers run. Attention heads are not elastic (BERT's config ties the head size to
hidden_size / num_attention_heads, so fewer heads of the same size cannot be exported as a stock
BERT). The routers read the encoding [ffn / ffn_max, layers / layers_max].
"""
import copy
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mos_models.common.elastic import BACKENDS, KINDS, ElasticLinear
from mos_models.common.evolution import GeneSpace

from .families import Found, detect
from .importance import importance, layer_ranking, permute_neurons

Arch = Dict[str, int]
DIMS = ("ffn", "layers")


class HFSpace(GeneSpace):
    """Genes ``ffn`` (FFN width of every layer) and ``layers`` (number of layers), each with its
    list of choices; the largest choices are the source model's sizes. ``encode`` gives the
    router's input: each number divided by its maximum."""

    arch_dim = len(DIMS)

    def __init__(self, ffn_choices: Sequence[int], layer_choices: Sequence[int]):
        super().__init__({"ffn": sorted(set(int(c) for c in ffn_choices)),
                          "layers": sorted(set(int(c) for c in layer_choices))})
        self.ffn_max, self.layers_max = max(self.genes["ffn"]), max(self.genes["layers"])

    def encode(self, arch: Arch) -> List[float]:
        return [arch["ffn"] / self.ffn_max, arch["layers"] / self.layers_max]

    def to_dict(self) -> Dict[str, List[int]]:
        return {"ffn_choices": list(self.genes["ffn"]),
                "layer_choices": list(self.genes["layers"])}


def default_choices(intermediate: int, depth: int) -> Tuple[List[int], List[int]]:
    """FFN widths {1/4, 1/2, 3/4, 1} x intermediate_size; layer counts ceil(depth/3) .. depth."""
    ffn = sorted({max(1, round(intermediate * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    return ffn, list(range(max(1, math.ceil(depth / 3)), depth + 1))


class ElasticLayerList(nn.ModuleList):
    """The model's layer list, keeping every layer registered (parameters, state_dict and
    ``.to`` see all of them under their original names) while iteration, ``len``, indexing and
    slicing, which the model's forward uses, see only the active layers, in order."""

    def __init__(self, modules: Iterable[nn.Module]):
        super().__init__()
        self.active: Optional[Tuple[int, ...]] = None   # None: every layer
        self.extend(modules)

    def _view(self) -> List[nn.Module]:
        layers = list(self._modules.values())
        return layers if self.active is None else [layers[i] for i in self.active]

    def physical(self) -> List[nn.Module]:
        """Every layer, active or not."""
        return list(self._modules.values())

    def __iter__(self):
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._modules) if self.active is None else len(self.active)

    def __getitem__(self, index):
        view = self._view()
        return view[index]


class HFSupernet(nn.Module):
    """A MoS supernet around a Hugging Face model (made by ``to_supernet``).

    ``set_arch(arch)`` / ``set_arch(ffn=..., layers=...)`` selects the active sub-network,
    ``forward`` is the model's own, ``export(dir)`` writes the active sub-network as a stock
    Hugging Face model (export.py). ``space`` is the ``HFSpace`` the trainer samples from.
    """

    def __init__(self, model: nn.Module, found: Found, space: HFSpace, layer_rank: Sequence[int],
                 settings: Dict[str, Any]):
        super().__init__()
        self.model, self.family, self.layers_name = model, found.family, found.layers_name
        self.space, self.settings = space, dict(settings)
        self.register_buffer("layer_rank", torch.tensor(list(layer_rank), dtype=torch.long))
        self._rank = tuple(layer_rank)
        self.register_load_state_dict_post_hook(HFSupernet._after_load)
        self.arch: Arch = space.largest()

    @staticmethod
    def _after_load(module: "HFSupernet", incompatible) -> None:
        module._rank = tuple(module.layer_rank.tolist())
        module.set_arch(module.arch)

    @property
    def config(self):
        """The full-size model's config."""
        return self.model.config

    @property
    def layer_list(self) -> ElasticLayerList:
        return self.model.get_submodule(self.layers_name)

    def ffn_linears(self, layer: nn.Module) -> Tuple[List[ElasticLinear], List[ElasticLinear]]:
        """(widen, narrow) ElasticLinears of one layer."""
        return ([layer.get_submodule(p) for p in self.family.widen],
                [layer.get_submodule(p) for p in self.family.narrow])

    def resolve(self, arch: Optional[Arch] = None, ffn: Optional[int] = None,
                layers: Optional[int] = None) -> Arch:
        """The full architecture dict of a ``set_arch`` call, checked (None: full size)."""
        if arch is not None:
            if ffn is not None or layers is not None:
                raise ValueError("set_arch: pass an arch dict or keywords, not both")
            if not isinstance(arch, dict):
                raise ValueError(f"set_arch: arch must be a dict like {{'ffn': ..., 'layers': "
                                 f"...}}, got {type(arch).__name__}")
            unknown = sorted(set(arch) - set(DIMS))
            if unknown:
                raise ValueError(f"set_arch: unknown dimensions {unknown}; the space has {DIMS}")
            ffn, layers = arch.get("ffn"), arch.get("layers")
        out = {}
        for dim, value, top in (("ffn", ffn, self.space.ffn_max),
                                ("layers", layers, self.space.layers_max)):
            value = top if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"set_arch: {dim} = {value!r} is outside the space: allowed "
                                 f"integers 1..{top} (trained choices {self.space.genes[dim]})")
            out[dim] = value
        return out

    def active_layers(self, layers: int) -> Tuple[int, ...]:
        """Indices of the ``layers`` most important layers, in their original order."""
        return tuple(sorted(self._rank[:layers]))

    def set_arch(self, arch: Optional[Arch] = None, *, ffn: Optional[int] = None,
                 layers: Optional[int] = None) -> "HFSupernet":
        """Selects the active sub-network: ``set_arch({"ffn": 768, "layers": 4})`` (an arch of
        ``space``) or ``set_arch(ffn=768, layers=4)``; a missing or None dimension is full size.
        Any integer from 1 to the maximum is accepted, not only the space's choices."""
        arch = self.resolve(arch, ffn, layers)
        ref = self.layer_rank
        encoding = torch.tensor(self.space.encode(arch), dtype=torch.float32, device=ref.device)
        for layer in self.layer_list.physical():
            widen, narrow = self.ffn_linears(layer)
            for linear in widen:
                linear.set_arch(encoding, out_features=arch["ffn"])
            for linear in narrow:
                linear.set_arch(encoding, in_features=arch["ffn"])
        full = arch["layers"] == len(self._rank)
        self.layer_list.active = None if full else self.active_layers(arch["layers"])
        self.arch = arch
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def export(self, out_dir: str, tokenizer=None, source_dir: Optional[str] = None) -> str:
        """Writes the active sub-network as a stock Hugging Face model directory (export.py)."""
        from .export import export
        return export(self, out_dir, tokenizer=tokenizer, source_dir=source_dir)

    def to_static(self) -> nn.Module:
        """The active sub-network as a stock model of the source's class (export.py)."""
        from .export import to_static
        return to_static(self)

    def hparams(self) -> Dict[str, Any]:
        """What rebuilds this supernet from its source model (``from_hparams``): the conversion
        settings and the space. The weights, neuron order and layer ranking are in state_dict."""
        return {**self.settings, **self.space.to_dict(), "family": self.family.name}

    def num_params(self, arch: Optional[Arch] = None) -> int:
        """Parameters of the stock model ``export`` writes for ``arch`` (default: the active
        one); computed, not built."""
        arch = self.resolve(arch) if arch is not None else self.arch
        layers = self.layer_list.physical()
        ffn_ids = {id(p) for layer in layers for lin in sum(self.ffn_linears(layer), [])
                   for p in lin.parameters()}
        per_layer = sum(p.numel() for p in layers[0].parameters() if id(p) not in ffn_ids)
        outside = {id(p) for layer in layers for p in layer.parameters()}
        total = sum(p.numel() for p in self.model.parameters() if id(p) not in outside)
        widen, narrow = self.ffn_linears(layers[0])
        hidden = widen[0].in_features
        ffn = sum(arch["ffn"] * (hidden + has_bias(lin)) for lin in widen)
        ffn += sum(hidden * (arch["ffn"] + has_bias(lin)) for lin in narrow)
        return total + arch["layers"] * (per_layer + ffn)

    def extra_repr(self) -> str:
        return f"family={self.family.name!r}, arch={self.arch}, settings={self.settings}"


def has_bias(linear: ElasticLinear) -> bool:
    return (linear.mos.bias if linear.mos is not None else linear.bias) is not None


@torch.no_grad()
def _elastic_from(linear: nn.Linear, kind: str, num_experts: int, router_hidden: int,
                  backend: str) -> ElasticLinear:
    """An ElasticLinear whose weight (standard) or every expert (MoS) is ``linear``'s."""
    weight = linear.weight
    layer = ElasticLinear(linear.in_features, linear.out_features, linear.bias is not None,
                          kind=kind, arch_dim=len(DIMS), num_experts=num_experts,
                          router_hidden=router_hidden, backend=backend, device=weight.device,
                          dtype=weight.dtype)
    if layer.mos is None:
        layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer
    layer.mos.experts.copy_(weight.unsqueeze(0).expand_as(layer.mos.experts))
    if linear.bias is not None:
        layer.mos.bias.copy_(linear.bias.unsqueeze(0).expand_as(layer.mos.bias))
    return layer


def _check_settings(num_experts, granularity, router_hidden, backend) -> None:
    if granularity not in KINDS:
        raise ValueError(f"to_supernet: granularity must be one of {KINDS} ('standard': plain "
                         f"weight sharing), got {granularity!r}")
    for name, value in (("num_experts", num_experts), ("router_hidden", router_hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"to_supernet: {name} must be a positive int, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"to_supernet: backend must be one of {BACKENDS}, got {backend!r}")


def _check_choices(name: str, choices: Sequence[int], top: int) -> List[int]:
    bad = [c for c in choices if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= top]
    if not choices or bad:
        raise ValueError(f"to_supernet: {name} must be non-empty integers in 1..{top}, got "
                         f"{list(choices)}")
    out = sorted(set(choices))
    if out[-1] != top:   # the largest sub-network is the model itself: sandwich training needs it
        out.append(top)
    return out


def to_supernet(model: nn.Module, num_experts: int = 2, granularity: str = "neuron",
                calibration: Optional[Iterable] = None, router_hidden: int = 128, *,
                ffn_choices: Optional[Sequence[int]] = None,
                layer_choices: Optional[Sequence[int]] = None, backend: str = "auto",
                copy_model: bool = True, source_dir: Optional[str] = None) -> HFSupernet:
    """A MoS supernet of the Hugging Face ``model`` (BERT-style or Llama-style, see families.py).

    Args:
        num_experts: m, the experts per FFN linear (MoS kinds).
        granularity: "neuron" or "layer" (neuron-wise / layer-wise MoS), or "standard" (plain
            weight sharing, the baseline).
        calibration: batches (dicts of model inputs or tensors of input ids) on which neuron and
            layer importance are measured; None keeps the original neuron and layer order.
        router_hidden: the routers' hidden width.
        ffn_choices, layer_choices: the space's choices (default: ``default_choices``); the
            model's own sizes are always included.
        backend: the MoS op backend ("auto", "reference", ...).
        copy_model: convert a deep copy (default), leaving ``model`` usable as the teacher; False
            converts ``model`` itself.
        source_dir: the model's directory (tokenizer files for ``export``); default: the
            config's ``_name_or_path`` when it is a directory.
    """
    _check_settings(num_experts, granularity, router_hidden, backend)
    found = detect(model)
    depth, intermediate = len(found.layers), model.config.intermediate_size
    default_ffn, default_layers = default_choices(intermediate, depth)
    space = HFSpace(
        _check_choices("ffn_choices", default_ffn if ffn_choices is None else ffn_choices,
                       intermediate),
        _check_choices("layer_choices", default_layers if layer_choices is None else layer_choices,
                       depth))
    model = copy.deepcopy(model) if copy_model else model
    found = detect(model)
    rank = list(range(depth))
    if calibration is not None:
        neuron_scores, layer_scores = importance(model, found, calibration)
        permute_neurons(found, neuron_scores)
        rank = layer_ranking(layer_scores)
    for layer in found.layers:
        for path in found.family.widen + found.family.narrow:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            setattr(parent, attr, _elastic_from(getattr(parent, attr), granularity, num_experts,
                                                router_hidden, backend))
    parent_path, _, attr = found.layers_name.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, ElasticLayerList(found.layers))
    if source_dir is None:
        source_dir = _source_dir(model)
    settings = {"num_experts": num_experts, "granularity": granularity,
                "router_hidden": router_hidden, "backend": backend, "source_dir": source_dir,
                "calibrated": calibration is not None}
    return HFSupernet(model, found, space, rank, settings).set_arch()


def from_hparams(hparams: Dict[str, Any], model: Optional[nn.Module] = None) -> HFSupernet:
    """The supernet ``hparams()`` describes, before its state_dict is loaded: converted without
    calibration from ``model`` (itself, not a copy) or, when None, from the model in
    ``hparams["source_dir"]``. ``load_state_dict`` then brings the trained (and permuted) weights
    and the layer ranking."""
    if model is None:
        from .export import load_pretrained
        if not hparams.get("source_dir"):
            raise ValueError("from_hparams: the supernet has no source_dir; pass the model")
        model = load_pretrained(hparams["source_dir"]).model
    return to_supernet(model, hparams["num_experts"], hparams["granularity"], None,
                       hparams["router_hidden"], ffn_choices=hparams["ffn_choices"],
                       layer_choices=hparams["layer_choices"], backend=hparams["backend"],
                       copy_model=False, source_dir=hparams.get("source_dir"))


def _source_dir(model: nn.Module) -> Optional[str]:
    path = getattr(model.config, "_name_or_path", "") or ""
    return path if path and os.path.isdir(path) else None
