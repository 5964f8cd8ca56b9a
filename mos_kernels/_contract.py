"""The op contract: argument checks shared by every entry point.

Shapes (docs/design.md, section 1): x (..., n_in); experts (m, N_max, K_max); beta (n_out, m) for
neuron-wise MoS or (m,) for layer-wise MoS; bias None, shared (N_max,) or per expert (m, N_max).
"""
from typing import NamedTuple, Optional

from torch import Tensor


class Dims(NamedTuple):
    n_out: int
    n_in: int
    num_experts: int
    layerwise: bool


def _need_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"mos_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"mos_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")


def check_inputs(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor],
                 out_features: Optional[int]) -> Dims:
    named = [("x", x), ("experts", experts), ("beta", beta)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        _need_tensor(name, t)
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"mos_linear: {name} has dtype {t.dtype} but x has {x.dtype}; "
                            "all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"mos_linear: {name} is on {t.device} but x is on {x.device}; "
                             "all tensors must be on one device")

    if experts.dim() != 3:
        raise ValueError("mos_linear: experts must have shape (m, N_max, K_max), "
                         f"got {tuple(experts.shape)}")
    m, n_max, k_max = experts.shape
    if m < 1 or n_max < 1 or k_max < 1:
        raise ValueError(f"mos_linear: experts must be non-empty, got {tuple(experts.shape)}")
    if x.dim() < 1:
        raise ValueError("mos_linear: x must have shape (..., n_in), got a 0-d tensor")
    n_in = x.shape[-1]
    if not 1 <= n_in <= k_max:
        raise ValueError(f"mos_linear: x has n_in = {n_in} features; expected 1 <= n_in <= "
                         f"K_max = {k_max} (experts shape {tuple(experts.shape)})")

    if beta.dim() == 2:
        layerwise = False
        n_out = beta.shape[0]
        if beta.shape[1] != m:
            raise ValueError(f"mos_linear: beta has shape {tuple(beta.shape)}; expected "
                             f"(n_out, m) with m = {m} experts")
        if out_features is not None and out_features != n_out:
            raise ValueError(f"mos_linear: out_features = {out_features} but neuron-wise beta "
                             f"has {n_out} rows; they must agree")
    elif beta.dim() == 1:
        layerwise = True
        if beta.shape[0] != m:
            raise ValueError(f"mos_linear: beta has shape {tuple(beta.shape)}; expected (m,) "
                             f"with m = {m} experts")
        if out_features is None:
            raise ValueError("mos_linear: layer-wise beta of shape (m,) needs out_features "
                             "to give n_out")
        n_out = int(out_features)
    else:
        raise ValueError(f"mos_linear: beta must have shape (n_out, m) or (m,), "
                         f"got {tuple(beta.shape)}")
    if not 1 <= n_out <= n_max:
        raise ValueError(f"mos_linear: n_out = {n_out}; expected 1 <= n_out <= N_max = {n_max} "
                         f"(experts shape {tuple(experts.shape)})")

    if bias is not None and tuple(bias.shape) not in ((n_max,), (m, n_max)):
        raise ValueError(f"mos_linear: bias has shape {tuple(bias.shape)}; expected shared "
                         f"({n_max},) or per expert ({m}, {n_max})")
    return Dims(n_out, n_in, m, layerwise)
