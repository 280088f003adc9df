"""KV caches of a decoder: contiguous per sequence (`KVCache`) or paged (`PagedKVCache`).

Both hold, per sequence (row) b, the keys/values of positions 0..lengths[b]-1. Extending
writes new tokens at positions lengths[b].. and bumps the length; rolling back just lowers
the length (stale entries are masked out and overwritten later), so rejecting draft tokens
after a verify step costs nothing.

Model code sees one layer at a time through two operations, so it never knows the layout:
`layer.write(positions, k, v)` stores new entries and `layer.view()` returns the row's keys
and values as [B, K, S, D] with slot s holding position s (what `models.attention` consumes).

- `KVCache`: one [B, K, S, D] array per layer; a row owns S slots.
- `PagedKVCache`: one pool of pages [P, page_size, K, D] per layer, shared by every sequence,
  and a block table [B, M]: position s of row b lives in page block_table[b, s // page_size]
  at offset s % page_size. A serving engine owns the pages and hands each step the table of
  the rows it runs (`dspark_jax.serving.pages`); a view gathers a row's M pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from dspark_jax.models.config import ModelConfig
from dspark_jax.sharding import DEFAULT_RULES, ShardingRules, named_sharding

CACHE_AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")
PAGE_AXES = ("kv_pages", "page_slot", "act_kv_heads", "head_dim")


@struct.dataclass
class LayerCache:
    """One layer of a contiguous cache."""

    k: jax.Array  # [B, K, S, D]
    v: jax.Array  # [B, K, S, D]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def write(self, slots: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Stores k_new, v_new [B, T, K, D] at positions slots [B, T]; slots >= S are dropped
        (how padded non-tokens are skipped)."""
        rows = jnp.arange(slots.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
        # Advanced indices split by a slice index as [B, T, K, D], the layout of the new entries.
        return LayerCache(self.k.at[rows, :, slots].set(k_new.astype(self.k.dtype), mode="drop"),
                          self.v.at[rows, :, slots].set(v_new.astype(self.v.dtype), mode="drop"))

    def view(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, K, S, D], slot s = position s."""
        return self.k, self.v


@struct.dataclass
class PagedLayerCache:
    """One layer of a paged cache: the layer's page pools and the rows' block table."""

    k: jax.Array  # [P, page_size, K, D]
    v: jax.Array  # [P, page_size, K, D]
    block_table: jax.Array  # [B, M] int32 page ids

    @property
    def max_length(self) -> int:
        return self.block_table.shape[1] * self.k.shape[1]

    def write(self, slots: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "PagedLayerCache":
        """As `LayerCache.write`: positions slots [B, T] >= M * page_size are dropped."""
        page_size, pages = self.k.shape[1], self.k.shape[0]
        index = slots // page_size  # [B, T] block-table column
        page = jnp.take_along_axis(self.block_table, jnp.minimum(index, self.block_table.shape[1] - 1), axis=1)
        page = jnp.where(index < self.block_table.shape[1], page, pages)  # out of range: dropped
        offset = slots % page_size
        return self.replace(k=self.k.at[page, offset].set(k_new.astype(self.k.dtype), mode="drop"),
                            v=self.v.at[page, offset].set(v_new.astype(self.v.dtype), mode="drop"))

    def view(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, K, M * page_size, D] gathered from each row's pages, slot s = position s."""
        b, m = self.block_table.shape
        p, page_size, kv_heads, d = self.k.shape

        def gather(pool):
            rows = pool[self.block_table]  # [B, M, page_size, K, D]
            return rows.reshape(b, m * page_size, kv_heads, d).transpose(0, 2, 1, 3)

        return gather(self.k), gather(self.v)


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    lengths: jax.Array  # [B] int32, valid positions per sequence

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
        return tuple(LayerCache(k, v) for k, v in zip(self.k, self.v))

    def updated(self, layers, lengths: jax.Array) -> "KVCache":
        """This cache with the layers returned by a model pass and new lengths."""
        return self.replace(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers), lengths=lengths)

    def rollback(self, lengths: jax.Array) -> "KVCache":
        """Shortens each sequence to `lengths` [B] (never lengthens it)."""
        return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))


@struct.dataclass
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per layer [P, page_size, K, D], shared by every sequence
    v: tuple[jax.Array, ...]  # per layer [P, page_size, K, D]
    block_table: jax.Array  # [B, M] int32 page ids of each row's positions
    lengths: jax.Array  # [B] int32, valid positions per sequence

    @classmethod
    def create(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16, mesh: Mesh | None = None,
               rules: ShardingRules = DEFAULT_RULES) -> "PagedKVCache":
        """Empty pools with no rows attached (a [0, 0] block table), created sharded by KV head
        under a mesh."""
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        sharding = None if mesh is None else named_sharding(mesh, PAGE_AXES, shape, rules)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(
            k=tuple(zeros() for _ in range(config.num_layers)),
            v=tuple(zeros() for _ in range(config.num_layers)),
            block_table=jnp.zeros((0, 0), jnp.int32),
            lengths=jnp.zeros((0,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.block_table.shape[1] * self.k[0].shape[1]

    @property
    def layers(self) -> tuple[PagedLayerCache, ...]:
        return tuple(PagedLayerCache(k, v, self.block_table) for k, v in zip(self.k, self.v))

    def updated(self, layers, lengths: jax.Array) -> "PagedKVCache":
        return self.replace(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers), lengths=lengths)

    def rows(self, block_table: jax.Array, lengths: jax.Array) -> "PagedKVCache":
        """The same pools seen by the rows of `block_table` [B, M] with `lengths` [B]."""
        return self.replace(block_table=block_table.astype(jnp.int32), lengths=lengths.astype(jnp.int32))

    def rollback(self, lengths: jax.Array) -> "PagedKVCache":
        return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))


def new_slots(lengths: jax.Array, num_new: jax.Array, width: int, max_length: int) -> tuple[jax.Array, jax.Array]:
    """Where `width` new tokens per row go: (positions [B, W] = lengths[b] + w, write slots
    [B, W] equal to the positions for the num_new[b] real tokens and max_length (dropped by
    `write`) for padding)."""
    offsets = jnp.arange(width, dtype=jnp.int32)
    positions = lengths[:, None] + offsets  # [B, W]
    return positions, jnp.where(offsets[None, :] < num_new[:, None], positions, max_length)
