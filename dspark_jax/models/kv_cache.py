"""Contiguous per-sequence KV cache of a decoder, one (k, v) pair of arrays per layer.

Slot s of row b holds the key/value of position s of sequence b; `lengths[b]` slots are
valid. Extending writes new tokens at slots lengths[b].. and bumps the length; rolling back
just lowers the length (stale slots are masked out and overwritten later), so rejecting
draft tokens after a verify step costs nothing. A paged layout can implement the same three
operations (create, write + read inside attention, rollback) behind this interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dspark_jax.models.config import ModelConfig

CACHE_AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")

LayerCache = tuple[jax.Array, jax.Array]  # (k, v), each [B, K, S, D]


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    lengths: jax.Array  # [B] int32, valid slots per sequence

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    @property
    def layers(self) -> tuple[LayerCache, ...]:
        return tuple(zip(self.k, self.v))

    def rollback(self, lengths: jax.Array) -> "KVCache":
        """Shortens each sequence to `lengths` [B] (never lengthens it)."""
        return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))


def new_slots(lengths: jax.Array, num_new: jax.Array, width: int, max_length: int) -> tuple[jax.Array, jax.Array]:
    """Where `width` new tokens per row go: (positions [B, W] = lengths[b] + w, cache slots
    [B, W] equal to the positions for the num_new[b] real tokens and max_length (dropped by
    `write_slots`) for padding)."""
    offsets = jnp.arange(width, dtype=jnp.int32)
    positions = lengths[:, None] + offsets  # [B, W]
    return positions, jnp.where(offsets[None, :] < num_new[:, None], positions, max_length)


def write_slots(cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Writes new [B, T, K, D] into cache [B, K, S, D] at slots [B, T].

    Slots >= S are dropped, which is how padded (non-)tokens are skipped.
    """
    rows = jnp.arange(slots.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
    # Advanced indices split by a slice index as [B, T, K, D], the layout of `new`.
    return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")
