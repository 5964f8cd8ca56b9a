"""The naive form of MoS, as the paper's code writes it: the oracle and the benchmark baseline.

A Python loop over the experts builds W_a by m broadcast multiplies and adds, then F.linear.
Autograd keeps every temporary, which is the cost the fused backends remove.
"""
from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from ._contract import check_inputs


def combine(experts: Tensor, beta: Tensor, bias: Optional[Tensor], n_out: int,
            n_in: int) -> Tuple[Tensor, Optional[Tensor]]:
    """W_a = sum_i diag(beta[:, i]) E_i[:n_out, :n_in] and b_a likewise.

    beta is (n_out, m), or (m,) for layer-wise MoS. Returns (W_a, b_a); b_a is None without bias.
    """
    m = experts.shape[0]
    beta_rows = beta.expand(n_out, m)
    weight = beta_rows[:, 0:1] * experts[0, :n_out, :n_in]
    for i in range(1, m):
        weight = weight + beta_rows[:, i:i + 1] * experts[i, :n_out, :n_in]
    if bias is None:
        return weight, None
    if bias.dim() == 1:
        return weight, bias[:n_out]
    mixed_bias = beta_rows[:, 0] * bias[0, :n_out]
    for i in range(1, m):
        mixed_bias = mixed_bias + beta_rows[:, i] * bias[i, :n_out]
    return weight, mixed_bias


def mos_linear(x: Tensor, experts: Tensor, beta: Tensor, bias: Optional[Tensor] = None, *,
               out_features: Optional[int] = None, backend: str = "reference") -> Tensor:
    """Same contract as ``mos_kernels.mos_linear``; ``backend`` is accepted and must be
    "reference" (or "auto") so that the two functions can be swapped in code and tests."""
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.mos_linear: backend must be 'reference', got {backend!r}")
    dims = check_inputs(x, experts, beta, bias, out_features)
    weight, mixed_bias = combine(experts, beta, bias, dims.n_out, dims.n_in)
    return F.linear(x, weight, mixed_bias)
