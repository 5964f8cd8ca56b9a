"""Fused backends. ("reference" is mos_kernels.reference, called directly.) Each module provides:

    unavailable_reason(device) -> str | None     None when it can run on that device
    forward(x, experts, beta, bias, strategy) -> y
    backward(dy, x, experts, beta, bias, needs, strategy) -> (dx, dexperts, dbeta, dbias)
    combine(experts, beta, bias, n_in) -> (W_a, b_a)
    combine_backward(d_weight, d_mixed_bias, experts, beta, bias, needs) -> (dexperts, dbeta, dbias)

with x (T, n_in), beta (n_out, m) (row stride 0 for layer-wise MoS), y (T, n_out); strategy
"auto", "one_pass" or "combine" (mos_kernels.ops checks what each backend takes); `needs` says
which of the gradients to compute, the others come back as None. Gradients are contiguous and
have the shapes of their inputs (dexperts zero outside the active slice).
combine gives W_a (n_out, n_in) and, for a per-expert bias, b_a (n_out,) (None for other bias
forms); combine_backward maps the gradients of W_a and b_a (d_mixed_bias, read only for a
per-expert bias) to those of the experts, beta and the per-expert bias (mos_linear's
save_mixed_weight path).
"""
import functools
import importlib

FUSED = ("cpu", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def load(name: str):
    return importlib.import_module(f"{__name__}.{name}_backend")
