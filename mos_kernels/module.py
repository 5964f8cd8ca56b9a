"""MoSLinear: a drop-in for nn.Linear whose weights a router mixes from m experts."""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .ops import _C, _NATIVE, _any_autocast, _route, mos_linear

# nn.Module's global hooks (dictionaries, changed in place when hooks are registered).
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, f"_global{name}") for name in (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


@torch.no_grad()
def linear_from(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A plain nn.Linear holding copies of ``weight`` (out, in) and ``bias`` (out,) or None."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


class MoSLinear(nn.Module):
    """Linear layer of a Mixture-of-Supernets supernet (neuron-wise or layer-wise MoS).

    Parameters: ``experts`` (m, out_features, in_features); ``bias`` (m, out_features), mixed by
    the router's scores like the weights; ``router``: Linear(arch_dim, router_hidden), ReLU,
    Linear(router_hidden, m * out_features) for neuron-wise or m for layer-wise MoS, followed by a
    softmax over the experts. ``set_arch`` chooses the architecture encoding and the active
    sub-layer; until then the layer runs at full size with an all-ones encoding (every number of
    the encoding divided by its maximum, i.e. the largest architecture).

    In eval mode with gradients off, the collapsed weight and bias are computed once per
    architecture and parameter state and reused by plain F.linear. ``save_mixed_weight`` trades
    memory for time in training (see mos_kernels.mos_linear). ``backend`` and ``strategy`` go to
    mos_linear as they are; both are plain attributes that may be reassigned.

    With the cpu or cuda backend (eager, no autocast, save_mixed_weight off, the router the stock
    Linear, ReLU, Linear without hooks), the router and the op run as one autograd node whose
    backward runs in C++ (``_C.routed_linear``, csrc/mos_linear_autograd.cpp): the same kernels
    and the router's arithmetic (in plain loops on the CPU, equal up to rounding), for a fraction
    of the host time of the router's own autograd nodes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 num_experts: int = 2, granularity: str = "neuron", arch_dim: int = 10,
                 router_hidden: int = 128, backend: str = "auto", strategy: str = "auto",
                 save_mixed_weight: bool = False, device=None, dtype=None):
        super().__init__()
        if granularity not in ("neuron", "layer"):
            raise ValueError(f"MoSLinear: granularity must be 'neuron' or 'layer', "
                             f"got {granularity!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_experts", num_experts), ("arch_dim", arch_dim),
                            ("router_hidden", router_hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoSLinear: {name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.granularity, self.arch_dim = num_experts, granularity, arch_dim
        self.backend, self.strategy = backend, strategy
        self.save_mixed_weight = save_mixed_weight
        self.experts = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = (nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias
                     else None)
        scores = num_experts * out_features if granularity == "neuron" else num_experts
        self.router = nn.Sequential(nn.Linear(arch_dim, router_hidden, **factory), nn.ReLU(),
                                    nn.Linear(router_hidden, scores, **factory))
        self.register_buffer("arch", torch.ones(arch_dim, **factory), persistent=False)
        self.active_in, self.active_out = in_features, out_features
        self._cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert is initialised independently the way nn.Linear initialises its weight."""
        bound = 1 / math.sqrt(self.in_features)
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.experts[i], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[i], -bound, bound)
        for layer in (self.router[0], self.router[2]):
            layer.reset_parameters()

    def set_arch(self, encoding: Union[Tensor, Sequence[float]], in_features: Optional[int] = None,
                 out_features: Optional[int] = None) -> "MoSLinear":
        """Selects the architecture: its encoding (arch_dim numbers, each divided by its maximum)
        and the active sub-layer's in/out features (None: the full size)."""
        encoding = torch.as_tensor(encoding, dtype=self.arch.dtype, device=self.arch.device)
        if encoding.shape != (self.arch_dim,):
            raise ValueError(f"MoSLinear.set_arch: encoding must have shape ({self.arch_dim},), "
                             f"got {tuple(encoding.shape)}")
        n_in = self.in_features if in_features is None else in_features
        n_out = self.out_features if out_features is None else out_features
        if not 1 <= n_in <= self.in_features:
            raise ValueError(f"MoSLinear.set_arch: in_features must be in [1, "
                             f"{self.in_features}], got {n_in}")
        if not 1 <= n_out <= self.out_features:
            raise ValueError(f"MoSLinear.set_arch: out_features must be in [1, "
                             f"{self.out_features}], got {n_out}")
        with torch.no_grad():
            self.arch.copy_(encoding)
        self.active_in, self.active_out = n_in, n_out
        return self

    def router_scores(self) -> Tensor:
        """beta of the active architecture: (active_out, m) neuron-wise, (m,) layer-wise."""
        logits = self.router(self.arch)
        if self.granularity == "neuron":
            logits = logits.view(self.out_features, self.num_experts)[:self.active_out]
        return logits.softmax(dim=-1)

    def collapsed_weights(self):
        """(W_a, b_a) of the active architecture: (active_out, active_in) and (active_out,)."""
        return reference.combine(self.experts, self.router_scores(), self.bias, self.active_out,
                                 self.active_in)

    def _cached_weights(self):
        params = [self.arch, self.experts, *self.router.parameters()]
        if self.bias is not None:
            params.append(self.bias)
        key = (self.active_in, self.active_out,
               tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self.collapsed_weights())
        return self._cache[1:]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.active_in:
            raise ValueError(f"MoSLinear: x must have shape (..., {self.active_in}) for the active "
                             f"architecture, got {tuple(x.shape)}")
        if not self.training and not torch.is_grad_enabled():
            weight, bias = self._cached_weights()
            return F.linear(x, weight, bias)
        fused = self._one_node_args(x)
        if fused is not None:
            try:
                return _C.routed_linear(*fused)
            except (TypeError, ValueError):
                pass  # input the node declines: the plain path below raises the contract's error
        return mos_linear(x, self.experts, self.router_scores(), self.bias,
                          out_features=self.active_out, backend=self.backend,
                          strategy=self.strategy, save_mixed_weight=self.save_mixed_weight)

    def _one_node_args(self, x: Tensor):
        """The arguments of _C.routed_linear when this call can take the one-node path (see the
        class docstring), else None. Host time is the point: the module's private dictionaries
        are read directly (nn.Module.__getattr__ costs about 1 us per attribute), and the hook
        checks are those nn.Module.__call__ would make for the router's modules."""
        if (_route(self.backend, self.strategy, x.device) not in _NATIVE
                or self.save_mixed_weight or torch.compiler.is_compiling() or _any_autocast()
                or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2] or _GLOBAL_HOOKS[3]):
            return None
        router, arch = self._modules["router"], self._buffers["arch"]
        if type(router) is not nn.Sequential or len(router._modules) != 3 or arch.requires_grad:
            return None
        first, act, second = router._modules.values()
        if (type(first) is not nn.Linear or type(act) is not nn.ReLU
                or type(second) is not nn.Linear):
            return None
        for module in (router, first, act, second):
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks):
                return None
        params, w1, w2 = self._parameters, first._parameters, second._parameters
        if params.get("experts") is None:
            return None
        return (x, params["experts"], params.get("bias"), arch, w1["weight"], w1["bias"],
                w2["weight"], w2["bias"], self.active_out, self.granularity == "layer",
                self.strategy)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the collapsed weights of the active architecture."""
        return linear_from(*self.collapsed_weights())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_experts={self.num_experts}, "
                f"granularity={self.granularity!r}, active=({self.active_in}, {self.active_out}), "
                f"backend={self.backend!r}"
                + (f", strategy={self.strategy!r}" if self.strategy != "auto" else "")
                + (", save_mixed_weight=True" if self.save_mixed_weight else ""))
