"""Triton kernels of d2nwg, installed as ``d2nwg.kernels`` (one op per module)."""
