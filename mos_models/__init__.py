"""Supernets that use mos_kernels.MoSLinear: machine translation (mt) and BERT (bert)."""
