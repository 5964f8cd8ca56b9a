"""Fused kernels for Mixture-of-Supernets linear layers."""
from . import reference
from .module import MoSLinear
from .ops import (BACKENDS, STRATEGIES, available_backends, backend_strategies, mos_linear, plan,
                  resolve_backend, resolve_strategy)

__all__ = ["BACKENDS", "MoSLinear", "STRATEGIES", "available_backends", "backend_strategies",
           "mos_linear", "plan", "reference", "resolve_backend", "resolve_strategy"]
__version__ = "0.1.0"
