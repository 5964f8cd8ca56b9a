"""The public op: argument checks, backend and strategy choice, and the torch.library registration.

``mos_kernels::mos_linear`` and ``mos_kernels::mos_linear_backward`` are custom ops with fake
kernels and an autograd formula, so torch.compile(fullgraph=True) sees one opaque node per call.
Their ``backend`` argument names the fused implementation (cpu, triton or cuda) that runs them,
their ``strategy`` argument the form it runs ("auto" is resolved by the backend, per call, from the
shapes and dtype it sees: the rule is resolve_strategy's).

Eager calls skip the custom op's Python dispatch (about 100 us of host time per forward with
autograd on, measured on the 2-core CPU machine, several times the GPU time of a layer at small
token counts). For the cpu and cuda backends they call the extension's C++ autograd node
(``_C.linear``, csrc/mos_linear_autograd.cpp): the checks, the reshapes and the backward run in
C++. For triton, a torch.autograd.Function calls the same backend functions as the custom op.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, reference
from ._contract import check_inputs

try:
    from . import _C  # the C++ extension: its eager autograd nodes (csrc/mos_linear_autograd.cpp)
except ImportError:  # not built: only the reference (and triton) backends run
    _C = None

BACKENDS = ("auto", "reference") + backends.FUSED
STRATEGIES = ("auto", "one_pass", "combine")
# What each backend accepts; "auto" is resolved per call (resolve_strategy).
_BACKEND_STRATEGIES = {"reference": ("auto",), "cpu": ("auto", "combine"),
                       "triton": STRATEGIES, "cuda": STRATEGIES}
# Backends whose eager calls take the extension's C++ autograd nodes.
_NATIVE = ("cpu", "cuda")

_resolved = {}
_routes = {}
# torch._C._is_any_autocast_enabled: one cheap call for "is autocast on for any device"; older
# torch has no such function, then the per-device check always runs.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


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
            raise ValueError(f"mos_linear: backend must be one of {BACKENDS}, got {backend!r}")
        _resolved[key] = name
    return _resolved[key]


def backend_strategies(backend: str = "auto", device="cpu") -> Tuple[str, ...]:
    """The values of ``strategy`` that ``backend`` (resolved for ``device``) takes, "auto" first:
    reference ("auto",); cpu ("auto", "combine"); triton and cuda all of STRATEGIES."""
    return _BACKEND_STRATEGIES[resolve_backend(backend, device)]


@torch.compiler.assume_constant_result
def _route(backend: str, strategy: str, device) -> str:
    """resolve_backend, and a ValueError unless the backend takes ``strategy``: once per
    (backend, strategy, device), then a dictionary lookup."""
    key = (backend, strategy, device)
    name = _routes.get(key)
    if name is None:
        if strategy not in STRATEGIES:
            raise ValueError(f"mos_linear: strategy must be one of {STRATEGIES}, got {strategy!r}")
        name = resolve_backend(backend, device)
        allowed = _BACKEND_STRATEGIES[name]
        if strategy not in allowed:
            raise ValueError(f"mos_linear: strategy {strategy!r} is not available on the {name!r} "
                             f"backend; there strategy must be one of {allowed}")
        _routes[key] = name
    return name


def resolve_strategy(strategy: str = "auto", backend: str = "auto", tokens: int = 1,
                     n_out: int = 1, n_in: int = 1, num_experts: int = 2,
                     dtype: torch.dtype = torch.float32, device="cpu") -> str:
    """The strategy that ``mos_linear(..., backend=backend, strategy=strategy)`` runs for
    ``tokens`` rows of x (all leading dimensions together), an active slice of n_out x n_in and
    ``num_experts`` experts in ``dtype`` on ``device``: "one_pass" or "combine".

    A named strategy runs as asked, where the backend takes it (otherwise ValueError naming the
    allowed values). "auto":
      reference  "combine": the naive loop builds W_a, then F.linear (only "auto" is accepted);
      cpu        "combine" always (the only form the C++ kernels have);
      cuda       "combine" (combine, then cuBLAS): faster than the earlier single-stage one-pass
                 kernels at every shape and token count measured on an H100 (benchmarks/
                 roofline.py --measure); the pipelined one-pass forward/dx kernels that replaced
                 them (docs/design.md, section 5) are not yet timed on a GPU;
      triton     triton_backend.choose_strategy: for fp16, bf16 and TF32 inputs "combine" from
                 triton_backend.COMBINE_MIN_TOKENS tokens on (per GPU generation and number of
                 experts: where benchmarks/roofline.py predicts combine + cuBLAS faster than
                 the one-pass kernels for forward+backward, those charged by the issue slots of
                 their compiled main loops; docs/design.md, section 4), "one_pass" below; always
                 "combine" for exact fp32 (TF32 not allowed) and fp64.
    """
    name = _route(backend, strategy, torch.device(device))
    if strategy != "auto":
        return strategy
    if name == "triton":
        return backends.load("triton").choose_strategy(tokens, n_out, n_in, num_experts, dtype,
                                                        device=device)
    return "combine"


def plan(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor] = None, *,
         out_features: Optional[int] = None, backend: str = "auto", strategy: str = "auto",
         save_mixed_weight: bool = False) -> Tuple[str, str]:
    """(backend, strategy) that ``mos_linear`` runs for these arguments, e.g. ("cpu",
    "combine"). save_mixed_weight=True always combines (W_a is built once and kept)."""
    dims = check_inputs(x, experts, beta, bias, out_features)
    name = _route(backend, strategy, x.device)
    if save_mixed_weight:
        return name, "combine"
    tokens = x.numel() // dims.n_in
    return name, resolve_strategy(strategy, name, tokens, dims.n_out, dims.n_in,
                                  dims.num_experts, x.dtype, x.device)


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` here, "reference" first."""
    device = torch.device(device)
    return ["reference"] + [n for n in backends.FUSED if _reason(n, device) is None]


def mos_linear(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor] = None, *,
               out_features: Optional[int] = None, backend: str = "auto", strategy: str = "auto",
               save_mixed_weight: bool = False) -> Tensor:
    """y = x @ W_a^T + b_a with W_a = sum_i diag(beta[:, i]) experts[i, :n_out, :n_in].

    x: (..., n_in); experts: (m, N_max, K_max), read through the [:n_out, :n_in] slice, never
    copied; beta: (n_out, m) neuron-wise, or (m,) layer-wise with ``out_features`` = n_out;
    bias: None, shared (N_max,), or per expert (m, N_max) mixed by beta like the weights.
    Returns (..., n_out). Differentiable in x, experts, beta and bias. Under torch.autocast it
    computes in the autocast dtype, as F.linear does.

    backend: one of BACKENDS ("auto" picks per device, see resolve_backend). strategy: one of
    STRATEGIES: "one_pass" (the mix happens inside the GEMM's weight-tile load, W_a never
    stored), "combine" (W_a built once, then the vendor GEMM) or "auto" (per shape, dtype and
    device: the rule is resolve_strategy's). ``plan(...)`` says which (backend, strategy) a
    call runs.

    save_mixed_weight: build W_a (and b_a) once in the forward, run F.linear on it and keep it
    for the backward, instead of combining W_a again there, for n_out * n_in more memory held
    by the autograd graph until the backward. The cpu backend and the combine strategy of cuda
    and triton rebuild W_a inside the gradient epilogue's pass over the expert rows, so there it
    saves little; the one-pass kernels recombine W_a tile by tile for dx, and there it saves
    more. It always combines: ``strategy`` is checked but has no other effect.
    """
    if _any_autocast() and isinstance(x, Tensor) and _autocast_dtype(x) is not None:
        # Like F.linear under autocast: floating inputs other than float64 go in the autocast
        # dtype (autograd casts their gradients back), and the op runs with autocast off.
        device_type = x.device.type
        dtype = _autocast_dtype(x)
        x, experts, beta, bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
            and t.dtype != torch.float64 else t for t in (x, experts, beta, bias))
        with torch.autocast(device_type, enabled=False):
            return mos_linear(x, experts, beta, bias, out_features=out_features, backend=backend,
                              strategy=strategy, save_mixed_weight=save_mixed_weight)
    if not isinstance(x, Tensor):
        check_inputs(x, experts, beta, bias, out_features)  # raises: x must be a tensor
    name = _route(backend, strategy, x.device)
    if name in _NATIVE and not save_mixed_weight and not torch.compiler.is_compiling():
        try:
            return _C.linear(x, experts, beta, bias, out_features, strategy)
        except (TypeError, ValueError):
            # The C++ checks are terse: the contract's own checks name the argument. Input they
            # accept is input the C++ node should have run, so its error then stands.
            check_inputs(x, experts, beta, bias, out_features)
            raise
    dims = check_inputs(x, experts, beta, bias, out_features)
    if name == "reference":  # builds W_a and keeps it for the backward anyway
        return reference.mos_linear(x, experts, beta, bias, out_features=out_features)
    beta_rows = beta.expand(dims.n_out, dims.num_experts)  # layer-wise: row stride 0, no copy
    if save_mixed_weight:
        return F.linear(x, *_mixed_weights(experts, beta_rows, bias, dims.n_in, name))
    x2d = x if x.dim() == 2 else x.reshape(-1, dims.n_in)  # (a reshape costs ~1 us of host time)
    if torch.compiler.is_compiling():
        y = torch.ops.mos_kernels.mos_linear(x2d, experts, beta_rows, bias, name, strategy)
    else:
        y = _EagerMoSLinear.apply(x2d, experts, beta_rows, bias, name, strategy)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], dims.n_out)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device type where autocast is on there, else None."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _EagerMoSLinear(torch.autograd.Function):
    """The custom op's eager twin (for triton): the same backend calls, without the op's
    dispatch cost."""

    @staticmethod
    def forward(ctx, x, experts, beta, bias, backend, strategy):
        _setup_context(ctx, (x, experts, beta, bias, backend, strategy), None)
        return backends.load(backend).forward(x, experts, beta, bias, strategy)

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy, backends.load(ctx.backend).backward)


@torch.library.custom_op("mos_kernels::mos_linear", mutates_args=())
def _mos_linear(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor],
                backend: str, strategy: str = "auto") -> Tensor:
    return backends.load(backend).forward(x, experts, beta, bias, strategy)


@_mos_linear.register_fake
def _(x, experts, beta, bias, backend, strategy="auto"):
    return x.new_empty(x.shape[0], beta.shape[0])


@torch.library.custom_op("mos_kernels::mos_linear_backward", mutates_args=())
def _mos_linear_backward(dy: Tensor, x: Tensor, experts: Tensor, beta: Tensor,
                         bias: Optional[Tensor], backend: str, strategy: str,
                         needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = backends.load(backend).backward(dy, x, experts, beta, bias, needs, strategy)
    # A custom op returns tensors: empty ones (distinct: outputs may not alias) for the
    # gradients not asked for, which the backends leave as None.
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


@_mos_linear_backward.register_fake
def _(dy, x, experts, beta, bias, backend, strategy, needs):
    like = (x, experts, beta, bias)
    return tuple(t.new_empty(t.shape) if need else dy.new_empty(0) for t, need in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x, experts, beta, bias, backend, strategy = inputs
    ctx.save_for_backward(x, experts, beta, bias)
    ctx.backend, ctx.strategy = backend, strategy


def _gradients(ctx, dy, backward):
    x, experts, beta, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    needs[3] = needs[3] and bias is not None
    grads = backward(dy, x, experts, beta, bias, needs, ctx.strategy)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


def _backward(ctx, dy):
    def op(dy, x, experts, beta, bias, needs, strategy):
        return torch.ops.mos_kernels.mos_linear_backward(dy, x, experts, beta, bias, ctx.backend,
                                                         strategy, needs)
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
    weight, mixed_bias = backends.load(backend).combine(experts, beta, bias, n_in)
    # A custom op returns tensors: an empty b_a where the backend has none (no per-expert bias).
    return weight, experts.new_empty(0) if mixed_bias is None else mixed_bias


@_mos_combine.register_fake
def _(experts, beta, bias, n_in, backend):
    n_out = beta.shape[0]
    return experts.new_empty(n_out, n_in), experts.new_empty(n_out if bias is not None else 0)


@torch.library.custom_op("mos_kernels::mos_combine_backward", mutates_args=())
def _mos_combine_backward(d_weight: Tensor, d_mixed_bias: Optional[Tensor], experts: Tensor,
                          beta: Tensor, bias: Optional[Tensor], backend: str,
                          needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    grads = backends.load(backend).combine_backward(d_weight, d_mixed_bias, experts, beta, bias,
                                                    needs)
    return tuple(experts.new_empty(0) if g is None else g for g in grads)


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
