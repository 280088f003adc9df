"""KV caches of a decoder: contiguous per sequence (`KVCache`) or paged (`PagedKVCache`).

Both hold, per sequence (row) b, the keys/values of positions 0..lengths[b]-1. Extending
writes new tokens at positions lengths[b].. and bumps the length; rolling back just lowers
the length (stale entries are masked out and overwritten later), so rejecting draft tokens
after a verify step costs nothing.

Model code sees one layer at a time through two operations, so it never knows the layout:
`layer.write(positions, k, v)` stores new entries and `layer.view()` returns the row's keys
and values as [B, K, S, D] with slot s holding position s (what `models.attention` consumes).

- `KVCache`: one [B, K, S, D] array per layer; a row owns S slots. A sliding-window layer
  (Gemma4) can instead keep a ring of R < S slots, position s in slot s % R: R = window + the
  longest extension keeps every key a query can see, also after a rollback (the rejected tail
  of an extension never overwrote a position that is still in some query's window).
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
    """One layer of a contiguous cache; a ring of k.shape[2] slots when `ring_of` (the cache's
    max_length) is set."""

    k: jax.Array  # [B, K, S, D] (S = R for a ring)
    v: jax.Array  # [B, K, S, D]
    ring_of: int | None = struct.field(pytree_node=False, default=None)

    @property
    def max_length(self) -> int:
        return self.ring_of or self.k.shape[2]

    def write(self, slots: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Stores k_new, v_new [B, T, K, D] at positions slots [B, T]; slots >= max_length are
        dropped (how padded non-tokens are skipped)."""
        if self.ring_of:
            ring = self.k.shape[2]
            slots = jnp.where(slots >= self.ring_of, ring, slots % ring)
        rows = jnp.arange(slots.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
        # Advanced indices split by a slice index as [B, T, K, D], the layout of the new entries.
        return self.replace(k=self.k.at[rows, :, slots].set(k_new.astype(self.k.dtype), mode="drop"),
                            v=self.v.at[rows, :, slots].set(v_new.astype(self.v.dtype), mode="drop"))

    def view(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, K, S, D]; slot s holds position s, or `slot_positions` for a ring."""
        return self.k, self.v

    def slot_positions(self, kv_lengths: jax.Array) -> jax.Array | None:
        """For a ring: the position each slot holds [B, R] once rows have kv_lengths [B]
        positions (the latest position congruent to the slot; negative: never written).
        None when slot s holds position s."""
        if not self.ring_of:
            return None
        ring = self.k.shape[2]
        last = kv_lengths[:, None] - 1  # [B, 1]
        return last - (last - jnp.arange(ring, dtype=jnp.int32)) % ring


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
    k: tuple[jax.Array, ...]  # per layer [B, K, S, D] (K, D and, for a ring, S per layer)
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    lengths: jax.Array  # [B] int32, valid positions per sequence
    capacity: int = struct.field(pytree_node=False, default=0)  # max_length (0: every layer's S)
    rings: tuple[int, ...] = struct.field(pytree_node=False, default=())  # per layer: window of a ring, or 0

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=jnp.bfloat16,
               max_extension: int | None = None) -> "KVCache":
        """Empty caches of `max_length` positions per row. With `max_extension` (the most tokens
        any one extension appends), each sliding-window layer keeps only a ring of
        window + max_extension slots."""
        specs = [config.layer_spec(i) for i in range(config.num_layers)]
        shapes = [(batch_size, spec.num_kv_heads, ring_size(spec.window, max_length, max_extension), spec.head_dim)
                  for spec in specs]
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for shape in shapes),
            v=tuple(jnp.zeros(shape, dtype) for shape in shapes),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            capacity=max_length,
            rings=tuple(spec.window if shape[2] < max_length else 0 for spec, shape in zip(specs, shapes)),
        )

    @property
    def max_length(self) -> int:
        return self.capacity or self.k[0].shape[2]

    @property
    def max_extension(self) -> int | None:
        """The most tokens one extension may append without breaking a ring (None: no ring)."""
        slack = [k.shape[2] - window for k, window in zip(self.k, self.rings) if window]
        return min(slack) if slack else None

    @property
    def layers(self) -> tuple[LayerCache, ...]:
        rings = self.rings or (0,) * len(self.k)
        return tuple(LayerCache(k, v, self.max_length if window else None)
                     for k, v, window in zip(self.k, self.v, rings))

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
        under a mesh. Sliding-window layers keep every position here (their window is a mask)."""

        makers = {}  # one compiled program per pool shape

        def zeros(spec):
            shape = (num_pages, page_size, spec.num_kv_heads, spec.head_dim)
            if shape not in makers:
                sharding = None if mesh is None else named_sharding(mesh, PAGE_AXES, shape, rules)
                makers[shape] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            return makers[shape]()

        specs = [config.layer_spec(i) for i in range(config.num_layers)]
        return cls(
            k=tuple(zeros(spec) for spec in specs),
            v=tuple(zeros(spec) for spec in specs),
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

    @property
    def max_extension(self) -> None:
        """No limit: sliding-window layers keep every page (see `KVCache.max_extension`)."""
        return None

    def rows(self, block_table: jax.Array, lengths: jax.Array) -> "PagedKVCache":
        """The same pools seen by the rows of `block_table` [B, M] with `lengths` [B]."""
        return self.replace(block_table=block_table.astype(jnp.int32), lengths=lengths.astype(jnp.int32))

    def rollback(self, lengths: jax.Array) -> "PagedKVCache":
        return self.replace(lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))


def ring_size(window: int | None, max_length: int, max_extension: int | None) -> int:
    """Slots a layer keeps: a ring of window + max_extension for a sliding-window layer when
    that is shorter than max_length, else max_length."""
    if window is None or max_extension is None:
        return max_length
    return min(max_length, window + max_extension)


def new_slots(lengths: jax.Array, num_new: jax.Array, width: int, max_length: int) -> tuple[jax.Array, jax.Array]:
    """Where `width` new tokens per row go: (positions [B, W] = lengths[b] + w, write slots
    [B, W] equal to the positions for the num_new[b] real tokens and max_length (dropped by
    `write`) for padding)."""
    offsets = jnp.arange(width, dtype=jnp.int32)
    positions = lengths[:, None] + offsets  # [B, W]
    return positions, jnp.where(offsets[None, :] < num_new[:, None], positions, max_length)
