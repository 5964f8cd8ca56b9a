"""Elastic layers shared by the supernets: one interface for the three supernet kinds.

``ElasticLinear`` is the layer every supernet's elastic linear goes through:

- ``kind="standard"``: plain weight sharing, one weight (N_max, K_max) of which the active
  sub-layer uses the first ``out_features`` rows and ``in_features`` columns (F.linear on the
  slice). The encoding passed to ``set_arch`` is ignored.
- ``kind="neuron"`` / ``kind="layer"``: a ``mos_kernels.MoSLinear`` (neuron-wise or layer-wise
  Mixture-of-Supernets) whose router reads the architecture encoding.

All kinds share ``set_arch(encoding, in_features, out_features)``, ``forward(x)``,
``collapsed_weights()`` and ``to_linear()``. In eval mode with gradients off, the active weight
(collapsed for MoS, a contiguous copy of the slice for standard) is computed once per
architecture and reused, so e.g. every beam-search step after the first runs a plain F.linear.

``ElasticEmbedding`` and ``ElasticLayerNorm`` slice their leading features likewise.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mos_kernels import BACKENDS, STRATEGIES, MoSLinear
from mos_kernels.module import linear_from

KINDS = ("standard", "neuron", "layer")


def _check_active(owner: str, name: str, value: Optional[int], maximum: int) -> int:
    value = maximum if value is None else int(value)
    if not 1 <= value <= maximum:
        raise ValueError(f"{owner}.set_arch: {name} must be in [1, {maximum}], got {value}")
    return value


class ElasticLinear(nn.Module):
    """Linear layer with an elastic active size, as a standard or a MoS supernet layer.

    Args:
        in_features, out_features: the largest sizes (K_max, N_max).
        bias: whether the layer has a bias (per expert for MoS, mixed like the weights).
        kind: "standard", "neuron" or "layer" (see the module docstring).
        arch_dim: length of the architecture encoding the router reads (MoS kinds).
        num_experts, router_hidden: MoS settings (m and the router's hidden width).
        backend: op backend for the MoS kinds: "auto" (fused where available) or "reference"
            (the naive loop), or a named fused backend. Changeable later via ``set_backend``.
        strategy: the op's strategy for the MoS kinds ("auto", "one_pass" or "combine"; see
            mos_kernels.mos_linear). Changeable later via ``set_backend``.

    Until ``set_arch`` is called the layer is at full size with an all-ones encoding.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 kind: str = "neuron", arch_dim: int = 10, num_experts: int = 2,
                 router_hidden: int = 128, backend: str = "auto", strategy: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"ElasticLinear: kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("arch_dim", arch_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ElasticLinear: {name} must be a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.arch_dim = kind, arch_dim
        self.active_in, self.active_out = in_features, out_features
        self._cache = None
        factory = {"device": device, "dtype": dtype}
        if kind == "standard":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
            self.mos = None
            self.reset_parameters()
        else:
            self.mos = MoSLinear(in_features, out_features, bias, num_experts=num_experts,
                                 granularity=kind, arch_dim=arch_dim,
                                 router_hidden=router_hidden, backend=backend, **factory)
        self.set_backend(backend, strategy=strategy)

    def reset_parameters(self) -> None:
        if self.mos is not None:
            self.mos.reset_parameters()
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.in_features),
                             1 / math.sqrt(self.in_features))

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def strategy(self) -> str:
        return self._strategy

    def set_backend(self, backend: str, save_mixed_weight: Optional[bool] = None,
                    strategy: Optional[str] = None) -> "ElasticLinear":
        """Op backend of the MoS kinds ("auto", "reference", or a fused backend's name), and
        MoSLinear's save_mixed_weight and strategy options (None: unchanged)."""
        _check_op_options("ElasticLinear", backend, strategy)
        self._backend = backend
        if strategy is not None:
            self._strategy = strategy
        if self.mos is not None:
            _configure_mos(self.mos, backend, save_mixed_weight, strategy)
        return self

    def set_arch(self, encoding: Union[Tensor, Sequence[float], None] = None,
                 in_features: Optional[int] = None,
                 out_features: Optional[int] = None) -> "ElasticLinear":
        """Selects the active sub-layer. ``encoding``: the architecture encoding (arch_dim numbers,
        each divided by its maximum); required by the MoS kinds, ignored by "standard"."""
        self.active_in = _check_active("ElasticLinear", "in_features", in_features,
                                       self.in_features)
        self.active_out = _check_active("ElasticLinear", "out_features", out_features,
                                        self.out_features)
        if self.mos is not None:
            if encoding is None:
                raise ValueError("ElasticLinear.set_arch: the MoS kinds need an encoding of "
                                 f"shape ({self.arch_dim},)")
            self.mos.set_arch(encoding, self.active_in, self.active_out)
        return self

    def collapsed_weights(self):
        """(W, b) of the active sub-layer: (active_out, active_in) and (active_out,) or None.
        Differentiable; for "standard" these are views of the shared weight."""
        if self.mos is not None:
            return self.mos.collapsed_weights()
        bias = None if self.bias is None else self.bias[:self.active_out]
        return self.weight[:self.active_out, :self.active_in], bias

    def _cached_weights(self):
        key = (self.active_in, self.active_out,
               tuple((p.data_ptr(), p._version) for p in self.parameters()),
               None if self.mos is None else self.mos.arch._version)
        if self._cache is None or self._cache[0] != key:
            weight, bias = self.collapsed_weights()
            self._cache = (key, weight.contiguous(), bias)
        return self._cache[1:]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.active_in:
            raise ValueError(f"ElasticLinear: x must have shape (..., {self.active_in}) for the "
                             f"active architecture, got {tuple(x.shape)}")
        if self.mos is not None:
            return self.mos(x)  # MoSLinear keeps its own eval cache of W_a
        if not self.training and not torch.is_grad_enabled():
            weight, bias = self._cached_weights()
            return F.linear(x, weight, bias)
        weight, bias = self.collapsed_weights()
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear (a copy) holding the active sub-layer's (collapsed) weights."""
        return linear_from(*self.collapsed_weights())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.kind!r}, active=({self.active_in}, {self.active_out}), "
                f"backend={self._backend!r}, strategy={self._strategy!r}")


class ElasticEmbedding(nn.Embedding):
    """nn.Embedding whose active sub-network uses the first ``embedding_dim`` columns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 **kwargs):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **kwargs)
        self.active_dim = embedding_dim

    def set_arch(self, embedding_dim: Optional[int] = None) -> "ElasticEmbedding":
        self.active_dim = _check_active("ElasticEmbedding", "embedding_dim", embedding_dim,
                                        self.embedding_dim)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight[:, :self.active_dim], self.padding_idx)

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.active_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight[:, :self.active_dim])
        return out


class ElasticLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the first ``normalized_dim`` features of its largest size."""

    def __init__(self, normalized_dim: int, eps: float = 1e-5, **kwargs):
        super().__init__(normalized_dim, eps=eps, **kwargs)
        self.max_dim = self.active_dim = normalized_dim

    def set_arch(self, normalized_dim: Optional[int] = None) -> "ElasticLayerNorm":
        self.active_dim = _check_active("ElasticLayerNorm", "normalized_dim", normalized_dim,
                                        self.max_dim)
        return self

    def forward(self, x: Tensor) -> Tensor:
        d = self.active_dim
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)

    @torch.no_grad()
    def to_layer_norm(self) -> nn.LayerNorm:
        d = self.active_dim
        out = nn.LayerNorm(d, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight[:d])
        out.bias.copy_(self.bias[:d])
        return out


def _check_op_options(owner: str, backend: str, strategy: Optional[str]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"{owner}: strategy must be one of {STRATEGIES}, got {strategy!r}")


def _configure_mos(layer: MoSLinear, backend: str, save_mixed_weight: Optional[bool],
                   strategy: Optional[str]) -> None:
    layer.backend = backend
    if save_mixed_weight is not None:
        layer.save_mixed_weight = bool(save_mixed_weight)
    if strategy is not None:
        layer.strategy = strategy


def set_backend(module: nn.Module, backend: str, save_mixed_weight: Optional[bool] = None,
                strategy: Optional[str] = None) -> nn.Module:
    """Sets the op backend (and, unless None, save_mixed_weight and the strategy) of every
    ElasticLinear and every MoSLinear inside ``module`` (a supernet built from either); returns
    ``module``."""
    _check_op_options("set_backend", backend, strategy)
    for layer in module.modules():
        if isinstance(layer, ElasticLinear):
            layer.set_backend(backend, save_mixed_weight, strategy)
        elif isinstance(layer, MoSLinear):
            _configure_mos(layer, backend, save_mixed_weight, strategy)
    return module
