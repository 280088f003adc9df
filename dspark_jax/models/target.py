"""The target model: a config, a params pytree, a tokenizer, and pure functions over them.

`dspark_jax.checkpoints.target.load_target` reads one from disk. All methods take `params` as
an explicit argument, so `jax.jit(target.forward)` and `jax.grad` compose over them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec, SingleDeviceSharding

from dspark_jax.models.config import ModelConfig
from dspark_jax.models.kv_cache import CACHE_AXES, KVCache, PagedKVCache, new_slots
from dspark_jax.models.layers import random_params
from dspark_jax.models.transformer import Decoder
from dspark_jax.sharding import DEFAULT_RULES, ShardingRules, named_sharding


def abstract_params(config: ModelConfig, dtype=jnp.bfloat16) -> tuple[Any, Any]:
    """(ShapeDtypeStruct pytree, logical PartitionSpec pytree) of the params, without memory."""
    module = Decoder(config, dtype, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(
        lambda: module.init(jax.random.key(0), tokens, tokens, jnp.ones((1,), jnp.int32))["params"]
    )
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(config: ModelConfig, dtype, mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES):
    shapes, specs = abstract_params(config, dtype)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return shapes, jax.tree.map(lambda _: device, shapes)
    return shapes, jax.tree.map(
        lambda spec, s: named_sharding(mesh, tuple(spec), s.shape, rules),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


@dataclasses.dataclass(frozen=True)
class TargetModel:
    """The pure functions of a target, without its weights: hashable by value (config, compute
    dtype, mesh), so it is the static argument of jitted programs while params are traced ones.
    Two loads of the same architecture share compiled programs, and no compiled program keeps
    weights alive."""

    config: ModelConfig
    dtype: Any = jnp.bfloat16
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    @functools.cached_property
    def module(self) -> Decoder:
        return Decoder(self.config, self.dtype, self.dtype, self.mesh, self.rules)

    def forward(self, params, input_ids: jax.Array, *, hidden_layers: Sequence[int] = ()):
        """Full causal forward.

        input_ids: int32 [B, T]. Returns (logits fp32 [B, T, V], last_hidden [B, T, H] after the
        final norm, layer_hiddens [B, T, len(hidden_layers), H]: raw outputs of the given decoder
        layers, -1 meaning the embedding output).
        """
        b, t = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        lengths = jnp.full((b,), t, jnp.int32)
        hidden, taps, _ = self.module.apply(
            {"params": params}, input_ids, positions, lengths, hidden_layers=tuple(hidden_layers)
        )
        return self.logits(params, hidden), hidden, taps

    def logits(self, params, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states [..., H]."""
        return self.module.apply({"params": params}, hidden, method=Decoder.logits)

    def init_cache(self, batch_size: int, max_length: int, max_extension: int | None = None) -> KVCache:
        """An empty KV cache with room for `max_length` positions per sequence; with
        `max_extension` (the most tokens one `extend` appends) sliding-window layers keep only
        their window plus that many positions."""
        cache = KVCache.create(self.config, batch_size, max_length, self.dtype, max_extension)
        if self.mesh is None:
            return cache
        place = lambda x: jax.device_put(x, named_sharding(self.mesh, CACHE_AXES, x.shape, self.rules))
        return cache.replace(
            k=tuple(map(place, cache.k)),
            v=tuple(map(place, cache.v)),
            lengths=jax.device_put(cache.lengths, named_sharding(self.mesh, ("batch",), cache.lengths.shape, self.rules)),
        )

    def init_paged_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        """Empty page pools (sharded by KV head under a mesh); rows attach with `.rows`."""
        return PagedKVCache.create(self.config, num_pages, page_size, self.dtype, self.mesh, self.rules)

    def extend(
        self,
        params,
        cache: KVCache,
        tokens: jax.Array,
        num_new: jax.Array,
        *,
        hidden_layers: Sequence[int] = (),
        last_only: bool = False,
    ):
        """Appends tokens to each sequence's cache and runs them (prefill and verify steps).

        cache: a KVCache or a PagedKVCache with rows attached. tokens: int32 [B, Q], row b
        holding num_new[b] real tokens then padding; num_new: int32 [B] (0 leaves a sequence
        untouched). Token q of row b gets position cache.lengths[b] + q.
        Returns (logits, last_hidden [B, Q, H], layer_hiddens [B, Q, n, H], new cache). logits is
        fp32 [B, Q, V], or [B, V] at each row's last new token if `last_only` (for prefill).
        Rows of padding carry unspecified values. The cache must have room:
        cache.lengths + num_new <= cache.max_length.
        """
        limit = cache.max_extension
        if limit is not None and tokens.shape[1] > limit:
            raise ValueError(f"extending by {tokens.shape[1]} tokens, but the cache's sliding-window rings were sized "
                             f"for extensions of at most {limit}")
        num_new = num_new.astype(jnp.int32)
        positions, slots = new_slots(cache.lengths, num_new, tokens.shape[1], cache.max_length)
        kv_lengths = cache.lengths + num_new
        hidden, taps, layers = self.module.apply(
            {"params": params},
            tokens,
            positions,
            kv_lengths,
            kv=cache.layers,
            write_slots=slots,
            hidden_layers=tuple(hidden_layers),
        )
        if last_only:
            last = jnp.maximum(num_new - 1, 0)
            logits = self.logits(params, jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        else:
            logits = self.logits(params, hidden)
        return logits, hidden, taps, cache.updated(layers, kv_lengths)

    @staticmethod
    def rollback(cache: KVCache, lengths: jax.Array) -> KVCache:
        """Shortens each sequence's cache to `lengths` [B] (e.g. after rejected draft tokens)."""
        return cache.rollback(lengths)



@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A loaded target model: its weights (`params`, a plain pytree of jax.Arrays), tokenizer,
    and the pure functions of its `model`, which every method below is."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    dtype: Any = jnp.bfloat16
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    @functools.cached_property
    def model(self) -> TargetModel:
        return TargetModel(self.config, self.dtype, self.mesh, self.rules)

    forward = property(lambda self: self.model.forward)
    logits = property(lambda self: self.model.logits)
    init_cache = property(lambda self: self.model.init_cache)
    init_paged_cache = property(lambda self: self.model.init_paged_cache)
    extend = property(lambda self: self.model.extend)
    rollback = property(lambda self: self.model.rollback)

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype="bfloat16", mesh: Mesh | None = None, tokenizer=None,
               rules: ShardingRules = DEFAULT_RULES):
        """A target with random weights (sharded at creation when a mesh is given)."""
        dtype = jnp.dtype(dtype)
        shapes, shardings = param_shardings(config, dtype, mesh, rules)
        return cls(config, random_params(shapes, jax.random.key(seed), shardings), tokenizer, dtype, mesh, rules)


def target_features(target, target_params, input_ids: jax.Array, layer_ids) -> tuple[jax.Array, jax.Array]:
    """(features [B, S, L_t * H] layer-major, last_hidden [B, S, H]) of the frozen target: what a
    drafter trains on."""
    _, last, taps = target.forward(target_params, input_ids, hidden_layers=tuple(layer_ids))  # taps [B, S, L_t, H]
    b, s = input_ids.shape
    return jax.lax.stop_gradient(taps.reshape(b, s, -1)), jax.lax.stop_gradient(last)
