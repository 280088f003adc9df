"""Contiguous per-sequence KV cache of a decoder.

Slot s of row b holds the key/value of position s of sequence b; `lengths[b]` slots are
valid. Extending writes new tokens at slots lengths[b].. and bumps the length; rolling back
just lowers the length (stale slots are masked out and overwritten later), so rejecting
draft tokens after a verify step costs nothing. A paged layout can implement the same three
operations (create, write+read inside attention, rollback) behind this interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax.models.config import ModelConfig

CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim")


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, D]
    v: jax.Array  # [L, B, S, K, D]
    lengths: jax.Array  # [B] int32, valid slots per sequence

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def rollback(self, lengths: jax.Array) -> "KVCache":
        """Shortens each sequence to `lengths` [B] (never lengthens it)."""
        return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))


def write_layer(cache_layers: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Writes new [B, T, K, D] into cache_layers [L, B, S, K, D] at layer `layer`, slots [B, T].

    Slots >= S are dropped, which is how padded (non-)tokens are skipped.
    """
    rows = jnp.arange(slots.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
    return cache_layers.at[layer, rows, slots].set(new.astype(cache_layers.dtype), mode="drop")
