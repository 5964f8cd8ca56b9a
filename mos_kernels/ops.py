"""The public op: argument checks, backend choice, and the torch.library registration.

``mos_kernels::mos_linear`` and ``mos_kernels::mos_linear_backward`` are custom ops with fake
kernels and an autograd formula, so torch.compile(fullgraph=True) sees one opaque node per call.
Their ``backend`` argument names the fused implementation (cpu, triton or cuda) that runs them.

Eager calls take a torch.autograd.Function that calls the same backend functions: the custom op's
Python dispatch costs about 100 us of host time per forward with autograd on (measured on the
2-core CPU machine), several times the GPU time of a layer at small token counts.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, reference
from ._contract import check_inputs

_resolved = {}


def _reason(name: str, device: torch.device) -> Optional[str]:
    return backends.load(name).unavailable_reason(device)


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    # On GPUs the CUDA C++ backend comes first wherever it is built: in the one GPU benchmark so
    # far (H100, bf16, benchmarks/results/h100-2026-11-23/) it was faster than Triton in all 48
    # rows (fwd, bwd, fwd+bwd; T 512-16384; m 2 and 6). Triton (sm_80 and newer) serves installs
    # built without a CUDA toolkit.
    if device.type == "cpu":
        return ("cpu",)
    if device.type == "cuda":
        return ("cuda", "triton")
    return ()


# torch.compile runs this once while tracing and keeps its answer: tracing into it would hit the
# backends' imports, a graph break, when the first call of a process is a compiled one.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str = "auto", device="cpu") -> str:
    """The backend that ``mos_linear(..., backend=backend)`` runs for tensors on ``device``.

    "auto" picks the first available of: cpu for CPU tensors; cuda then triton (sm_80 and
    newer) on GPUs; and "reference" where none is available. Naming a backend that cannot run on
    the device raises RuntimeError saying why.
    """
    device = torch.device(device)
    key = (backend, device)
    if key not in _resolved:
        if backend == "reference":
            name = backend
        elif backend in backends.FUSED:
            reason = _reason(backend, device)
            if reason is not None:
                raise RuntimeError(f"mos_linear: backend {backend!r} cannot run here: {reason}")
            name = backend
        elif backend == "auto":
            name = next((n for n in _auto_order(device) if _reason(n, device) is None),
                        "reference")
        else:
            raise ValueError(f"mos_linear: backend must be one of "
                             f"{('auto', 'reference') + backends.FUSED}, got {backend!r}")
        _resolved[key] = name
    return _resolved[key]


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` here, "reference" first."""
    device = torch.device(device)
    return ["reference"] + [n for n in backends.FUSED if _reason(n, device) is None]


def mos_linear(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor] = None, *,
               out_features: Optional[int] = None, backend: str = "auto",
               save_mixed_weight: bool = False) -> Tensor:
    """y = x @ W_a^T + b_a with W_a = sum_i diag(beta[:, i]) experts[i, :n_out, :n_in].

    x: (..., n_in); experts: (m, N_max, K_max), read through the [:n_out, :n_in] slice, never
    copied; beta: (n_out, m) neuron-wise, or (m,) layer-wise with ``out_features`` = n_out;
    bias: None, shared (N_max,), or per expert (m, N_max) mixed by beta like the weights.
    Returns (..., n_out). Differentiable in x, experts, beta and bias. Under torch.autocast it
    computes in the autocast dtype, as F.linear does.

    save_mixed_weight: build W_a (and b_a) once in the forward, run F.linear on it and keep it
    for the backward, instead of combining W_a again there, for n_out * n_in more memory held
    by the autograd graph until the backward. The cpu backend and the combine-then-GEMM
    strategies of cuda and triton rebuild W_a inside the gradient epilogue's pass over the
    expert rows, so there it saves little; the one-pass kernels (triton's, and cuda's fused
    strategy) recombine W_a tile by tile for dx, and there it saves more.
    """
    if (isinstance(x, Tensor) and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        # Like F.linear under autocast: floating inputs other than float64 go in the autocast
        # dtype (autograd casts their gradients back), and the op runs with autocast off.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type)
        x, experts, beta, bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
            and t.dtype != torch.float64 else t for t in (x, experts, beta, bias))
        with torch.autocast(device_type, enabled=False):
            return mos_linear(x, experts, beta, bias, out_features=out_features, backend=backend,
                              save_mixed_weight=save_mixed_weight)
    dims = check_inputs(x, experts, beta, bias, out_features)
    name = resolve_backend(backend, x.device)
    if name == "reference":  # builds W_a and keeps it for the backward anyway
        return reference.mos_linear(x, experts, beta, bias, out_features=out_features)
    beta_rows = beta.expand(dims.n_out, dims.num_experts)  # layer-wise: row stride 0, no copy
    if save_mixed_weight:
        return F.linear(x, *_mixed_weights(experts, beta_rows, bias, dims.n_in, name))
    x2d = x if x.dim() == 2 else x.reshape(-1, dims.n_in)  # (a reshape costs ~1 us of host time)
    if torch.compiler.is_compiling():
        y = torch.ops.mos_kernels.mos_linear(x2d, experts, beta_rows, bias, name)
    else:
        y = _EagerMoSLinear.apply(x2d, experts, beta_rows, bias, name)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], dims.n_out)


class _EagerMoSLinear(torch.autograd.Function):
    """The custom op's eager twin: the same backend calls, without the op's dispatch cost."""

    @staticmethod
    def forward(ctx, x, experts, beta, bias, backend):
        _setup_context(ctx, (x, experts, beta, bias, backend), None)
        return backends.load(backend).forward(x, experts, beta, bias)

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy, backends.load(ctx.backend).backward)


@torch.library.custom_op("mos_kernels::mos_linear", mutates_args=())
def _mos_linear(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor],
                backend: str) -> Tensor:
    return backends.load(backend).forward(x, experts, beta, bias)


@_mos_linear.register_fake
def _(x, experts, beta, bias, backend):
    return x.new_empty(x.shape[0], beta.shape[0])


@torch.library.custom_op("mos_kernels::mos_linear_backward", mutates_args=())
def _mos_linear_backward(dy: Tensor, x: Tensor, experts: Tensor, beta: Tensor,
                         bias: Optional[Tensor], backend: str,
                         needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(backends.load(backend).backward(dy, x, experts, beta, bias, needs))


@_mos_linear_backward.register_fake
def _(dy, x, experts, beta, bias, backend, needs):
    like = (x, experts, beta, bias)
    return tuple(t.new_empty(t.shape) if need else dy.new_empty(0) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x, experts, beta, bias, backend = inputs
    ctx.save_for_backward(x, experts, beta, bias)
    ctx.backend = backend


def _gradients(ctx, dy, backward):
    x, experts, beta, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    needs[3] = needs[3] and bias is not None
    grads = backward(dy, x, experts, beta, bias, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,)


def _backward(ctx, dy):
    def op(dy, x, experts, beta, bias, needs):
        return torch.ops.mos_kernels.mos_linear_backward(dy, x, experts, beta, bias, ctx.backend,
                                                         needs)
    return _gradients(ctx, dy, op)


_mos_linear.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------- save_mixed_weight: W_a as a tensor

def _mixed_weights(experts: Tensor, beta_rows: Tensor, bias: Optional[Tensor], n_in: int,
                   backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """W_a (n_out, n_in) and b_a (n_out,) or None, differentiable, for F.linear to use (and its
    autograd node to keep). A shared bias is sliced here; only a per-expert one is mixed."""
    expert_bias = bias if bias is not None and bias.dim() == 2 else None
    args = (experts, beta_rows, expert_bias, n_in, backend)
    if torch.compiler.is_compiling():
        weight, mixed_bias = torch.ops.mos_kernels.mos_combine(*args)
    else:
        weight, mixed_bias = _EagerCombine.apply(*args)
    if expert_bias is not None:
        return weight, mixed_bias
    return weight, None if bias is None else bias[:beta_rows.shape[0]]


class _EagerCombine(torch.autograd.Function):
    """mos_combine's eager twin, as _EagerMoSLinear is mos_linear's."""

    @staticmethod
    def forward(ctx, experts, beta, bias, n_in, backend):
        _combine_setup_context(ctx, (experts, beta, bias, n_in, backend), None)
        return tuple(backends.load(backend).combine(experts, beta, bias, n_in))

    @staticmethod
    def backward(ctx, d_weight, d_mixed_bias):
        return _combine_gradients(ctx, d_weight, d_mixed_bias,
                                  backends.load(ctx.backend).combine_backward)


@torch.library.custom_op("mos_kernels::mos_combine", mutates_args=())
def _mos_combine(experts: Tensor, beta: Tensor, bias: Optional[Tensor], n_in: int,
                 backend: str) -> Tuple[Tensor, Tensor]:
    return tuple(backends.load(backend).combine(experts, beta, bias, n_in))


@_mos_combine.register_fake
def _(experts, beta, bias, n_in, backend):
    n_out = beta.shape[0]
    return experts.new_empty(n_out, n_in), experts.new_empty(n_out if bias is not None else 0)


@torch.library.custom_op("mos_kernels::mos_combine_backward", mutates_args=())
def _mos_combine_backward(d_weight: Tensor, d_mixed_bias: Optional[Tensor], experts: Tensor,
                          beta: Tensor, bias: Optional[Tensor], backend: str,
                          needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(backends.load(backend).combine_backward(d_weight, d_mixed_bias, experts, beta,
                                                         bias, needs))


@_mos_combine_backward.register_fake
def _(d_weight, d_mixed_bias, experts, beta, bias, backend, needs):
    like = (experts, beta, bias)
    return tuple(t.new_empty(t.shape) if need else experts.new_empty(0)
                 for t, need in zip(like, needs))


def _combine_setup_context(ctx, inputs, output):
    experts, beta, bias, n_in, backend = inputs
    ctx.save_for_backward(experts, beta, bias)
    ctx.backend = backend


def _combine_gradients(ctx, d_weight, d_mixed_bias, combine_backward):
    experts, beta, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    needs[2] = needs[2] and bias is not None
    if bias is None:
        d_mixed_bias = None  # the gradient of the empty placeholder output
    elif d_mixed_bias is None:
        d_mixed_bias = experts.new_zeros(beta.shape[0])
    grads = combine_backward(d_weight, d_mixed_bias, experts, beta, bias, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


def _combine_backward(ctx, d_weight, d_mixed_bias):
    def op(d_weight, d_mixed_bias, experts, beta, bias, needs):
        return torch.ops.mos_kernels.mos_combine_backward(d_weight, d_mixed_bias, experts, beta,
                                                          bias, ctx.backend, needs)
    return _combine_gradients(ctx, d_weight, d_mixed_bias, op)


_mos_combine.register_autograd(_combine_backward, setup_context=_combine_setup_context)
