"""Pieces the kernels and their tuning tables share; like every kernel here, nothing from dspark_jax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # a finite "minus infinity": a masked lane never wins a max, and exp(NEG - max) is 0


def first_max(values: jax.Array, offset, keepdims: bool = True) -> tuple[jax.Array, jax.Array]:
    """(max over the last axis, index of its first occurrence + offset), the last axis kept with
    length 1 or (keepdims=False, as the Triton kernels take them) dropped."""
    best = jnp.max(values, axis=-1, keepdims=keepdims)
    lanes = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    wide = best if keepdims or values.ndim == 1 else best[..., None]  # broadcasts against values
    return best, offset + jnp.min(jnp.where(values == wide, lanes, values.shape[-1]), axis=-1, keepdims=keepdims)


def pow2_at_most(x: int) -> int:
    """The largest power of two <= x (1 for x < 2): block sizes of the tuning tables."""
    return 1 << (max(1, x).bit_length() - 1)
