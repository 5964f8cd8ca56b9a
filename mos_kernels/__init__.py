"""Fused kernels for Mixture-of-Supernets linear layers."""
from . import reference
from .module import MoSLinear
from .ops import available_backends, mos_linear, resolve_backend

__all__ = ["MoSLinear", "available_backends", "mos_linear", "reference", "resolve_backend"]
__version__ = "0.1.0"
