"""Triton kernels of mechanic-fast, installed as `mechanic_fast.kernels`."""
