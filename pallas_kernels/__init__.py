"""Pallas kernels for the speculative verify path, one folder per kernel.

Each folder holds `reference.py` (pure jnp: the definition every kernel is tested against),
the kernel for each backend, and `ops.py`, the one entry point callers use (it picks the
kernel for the current backend, or runs it in interpret mode off-accelerator). This package
imports nothing from `dspark_jax`.
"""
