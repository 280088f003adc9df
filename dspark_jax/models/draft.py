"""The draft model: a DraftConfig, a params pytree, and pure functions over them.

`params` holds the module's own (trainable) parameters plus `embed_tokens` [V, H] and, for
untied targets, `lm_head` [H, V]. Those two are the target's own arrays when the draft is
built with a target (the same jax.Arrays, so no second copy in device memory); they are
frozen in training and still written into saved checkpoints.

Two ways to run a drafter:
- scoring (`score_block`, and `block_forward` for A anchors per sequence in training): every
  context feature is given at once and blocks are scored with teacher-forced tokens;
- inference (`init_cache`, `propose`): a draft KV cache of context entries grows with the
  features of newly verified positions, and each call samples one block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dspark_jax.sampling import SamplingParams, split
from dspark_jax.models.draft_config import DraftConfig
from dspark_jax.models.dspark import BlockDrafter
from dspark_jax.models.eagle3 import Eagle3Drafter
from dspark_jax.models.kv_cache import KVCache, PagedKVCache, new_slots
from dspark_jax.models.layers import random_params

FROZEN = ("embed_tokens", "lm_head")


class Proposal(NamedTuple):
    tokens: jax.Array  # [B, G] int32 draft tokens
    probs: jax.Array  # [B, G, V] fp32, the distribution each token was drawn from
    confidence: jax.Array  # [B, G] fp32 confidence logits (zeros without a confidence head)


def draft_module(config: DraftConfig, dtype, mesh: Mesh | None = None) -> nn.Module:
    if config.algorithm == "eagle3":
        return Eagle3Drafter(config, dtype, dtype)
    return BlockDrafter(config, dtype, dtype, mesh)


def abstract_module_params(config: DraftConfig, dtype=jnp.bfloat16) -> tuple[Any, Any]:
    """(ShapeDtypeStructs, logical PartitionSpecs) of the module's own parameters."""
    module = draft_module(config, dtype)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), method=_init_all)["params"])
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def _init_all(module):
    """Touches every parameter of a drafter so `init` creates them all."""
    c = module.config
    feats = jnp.zeros((1, 1, c.feature_size), module.dtype)
    embed = jnp.zeros((c.layers.vocab_size, c.layers.hidden_size), module.dtype)
    one = jnp.ones((1, 1), jnp.int32)
    if c.algorithm == "eagle3":
        out = module.ttt(embed, feats, one)
        return module.logits(embed, None, out)
    hidden, _ = module.backbone(embed, feats, one - 1, one, one, one > 0, one)
    return module.heads(embed, None, hidden, one[..., None] * jnp.ones((1, 1, c.block_size), jnp.int32))


def split_params(params) -> tuple[dict, jax.Array, jax.Array | None]:
    """(module params, embedding [V, H], LM head [H, V] or None when tied to the embedding)."""
    own = {k: v for k, v in params.items() if k not in FROZEN}
    return own, params["embed_tokens"], params.get("lm_head")


def frozen_params(params) -> dict:
    """The target's arrays inside draft params: embed_tokens, and lm_head unless tied."""
    return {k: params[k] for k in FROZEN if k in params}


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """The pure functions of a drafter, without its weights: hashable by value (config, compute
    dtype, mesh), so it is the static argument of jitted programs while params are traced."""

    config: DraftConfig
    dtype: Any = jnp.bfloat16
    mesh: Mesh | None = None

    @functools.cached_property
    def module(self) -> nn.Module:
        return draft_module(self.config, self.dtype, self.mesh)

    def _apply(self, params, method, *args, **kwargs):
        """module.apply of `method` with the module's params; the embedding goes first."""
        own, embed, _ = split_params(params)
        return self.module.apply({"params": own}, embed, *args, method=method, **kwargs)

    # ------------------------------------------------------------------ scoring

    def block_forward(self, params, features, tokens, anchors, keep):
        """DSpark/DFlash training forward: A blocks of one sequence per row, teacher-forced.

        features: [B, S, L_t * H] tapped target features; tokens: [B, S]; anchors: [B, A]
        anchor positions; keep: [B, A] (False: dummy block, scored as zeros). Block a sees
        context rows t < anchors[a], and slot j's previous token is tokens[anchor + j].
        Returns (draft logits [B, A, G, V] fp32, confidence logits [B, A, G] fp32, hidden
        [B, A, G, H]).
        """
        hidden, prev = self._teacher_forced_blocks(params, features, tokens, anchors, keep)
        return self._heads(params, hidden, prev) + (hidden,)

    def block_head_inputs(self, params, features, tokens, anchors, keep):
        """`block_forward` without the vocabulary-sized logits, for losses that compute them a
        chunk at a time (training.fused_loss). Returns (hidden [B, A, G, H], the Markov vectors
        fed to markov_w2 [B, A, G, r] or None without a Markov head, confidence logits [B, A, G]
        fp32): the draft logits are lm_logits(hidden) + vectors @ markov_w2.T."""
        hidden, prev = self._teacher_forced_blocks(params, features, tokens, anchors, keep)
        own, _, _ = split_params(params)
        vec, conf = self.module.apply({"params": own}, hidden, prev, method=BlockDrafter.head_inputs)
        return hidden, vec, conf

    def _teacher_forced_blocks(self, params, features, tokens, anchors, keep):
        """The backbone over the blocks, and each slot's previous token: ([B, A, G, H], [B, A, G])."""
        if self.config.algorithm == "eagle3":
            raise ValueError("block_forward is for DSpark/DFlash drafters; Eagle3 trains with ttt_forward")
        s = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), tokens.shape)
        anchor_ids = jnp.take_along_axis(tokens, anchors, axis=1)
        hidden, _ = self._apply(params, BlockDrafter.backbone, features, positions, anchors, anchor_ids, keep, anchors)
        prev_pos = jnp.minimum(anchors[:, :, None] + jnp.arange(self.config.block_size), s - 1)  # [B, A, G]
        return hidden, jnp.take_along_axis(tokens[:, None, :], prev_pos, axis=2)

    def _heads(self, params, hidden, prev):
        own, embed, lm_head = split_params(params)
        return self.module.apply({"params": own}, embed, lm_head, hidden, prev, method=BlockDrafter.heads)

    def ttt_forward(self, params, features, tokens):
        """Eagle3 training-time test: layer outputs [G, B, S, H] (see Eagle3Drafter.ttt)."""
        return self._apply(params, Eagle3Drafter.ttt, features, tokens)

    def logits(self, params, out):
        """Eagle3 logits [..., V] fp32 of layer outputs [..., H]."""
        own, embed, lm_head = split_params(params)
        return self.module.apply({"params": own}, embed, lm_head, out, method=Eagle3Drafter.logits)

    def score_block(self, params, context_features, context_len, anchor_ids, block_tokens, *, context_ids=None):
        """Teacher-forced scoring of one block per sequence.

        context_features: [B, T, L_t * H] tapped target features of positions 0..T-1;
        context_len: [B] the anchor position (only features before it are visible);
        anchor_ids: [B]; block_tokens: [B, G], the tokens scored at slots 0..G-1 (slot j's
        previous token is the anchor for j = 0 and block_tokens[j - 1] after).
        Eagle3 also needs context_ids [B, T] (token t is paired with feature t - 1).
        Returns (draft logits [B, G, V] fp32 after the Markov bias, confidence logits [B, G]
        fp32, zeros for drafters without a confidence head).
        """
        c = self.config
        context_len = jnp.asarray(context_len, jnp.int32)
        anchor_ids = jnp.asarray(anchor_ids, jnp.int32)
        block_tokens = jnp.asarray(block_tokens, jnp.int32)
        b, t = context_features.shape[:2]
        if c.algorithm == "eagle3":
            if context_ids is None:
                raise ValueError("Eagle3 score_block needs context_ids (the tokens paired with the features)")
            # Pair feature t with token t + 1; the last visible feature (a - 1) pairs with the anchor.
            nxt = jnp.concatenate([context_ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
            nxt = jnp.where(jnp.arange(t)[None, :] == context_len[:, None] - 1, anchor_ids[:, None], nxt)
            cache = self.init_cache(b, t + c.block_size)
            out, kv = self._eagle3_extend(params, cache, context_features, nxt, context_len)
            last = jnp.take_along_axis(out, (context_len - 1)[:, None, None], axis=1)[:, 0]
            own, embed, lm_head = split_params(params)
            _, _, logits, _ = self.module.apply(
                {"params": own}, embed, lm_head, kv, last, context_len, split(jax.random.key(0), b), SamplingParams(0.0),
                forced=block_tokens, method=Eagle3Drafter.chain,
            )
            return logits, jnp.zeros((b, c.block_size), jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        anchors = context_len[:, None]
        keep = jnp.ones((b, 1), bool)
        hidden, _ = self._apply(params, BlockDrafter.backbone, context_features, positions, anchors,
                                anchor_ids[:, None], keep, anchors)
        prev = jnp.concatenate([anchor_ids[:, None], block_tokens[:, :-1]], axis=1)[:, None]
        logits, conf = self._heads(params, hidden, prev)
        return logits[:, 0], conf[:, 0]

    # ---------------------------------------------------------------- inference

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty draft cache of context entries (room for the block's slots included)."""
        return KVCache.create(self.config.layers, batch_size, max_length, self.dtype)

    def init_paged_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        """Empty page pools for the draft's context entries (rows attach with `.rows`)."""
        return PagedKVCache.create(self.config.layers, num_pages, page_size, self.dtype, self.mesh)

    def _eagle3_extend(self, params, cache, features, next_ids, num_new):
        return self._apply(params, Eagle3Drafter.extend, cache.layers[0], cache.lengths, features, next_ids, num_new)

    def extend_context(self, params, cache: KVCache, features, next_ids, num_new) -> KVCache:
        """Appends verified positions to the draft cache without drafting (prompt prefill).

        Arguments as in `propose`; features [B, Q, L_t * H] of positions cache.lengths + q.
        """
        num_new = num_new.astype(jnp.int32)
        if self.config.algorithm == "eagle3":
            _, kv = self._eagle3_extend(params, cache, features, next_ids, num_new)
            return cache.updated((kv,), cache.lengths + num_new)
        b, q_len = features.shape[:2]
        positions, slots = new_slots(cache.lengths, num_new, q_len, cache.max_length)
        no_blocks = jnp.zeros((b, 0), jnp.int32)  # a backbone pass over zero blocks only writes context K/V
        _, layers = self._apply(params, BlockDrafter.backbone, features, positions, no_blocks, no_blocks,
                                no_blocks > 0, no_blocks, cache.layers, slots)
        return cache.updated(layers, cache.lengths + num_new)

    def propose(self, params, cache: KVCache, features, next_ids, num_new, anchor_ids, keys, sampling: SamplingParams):
        """Extends the draft cache by verified positions, then drafts one block per sequence.

        features: [B, Q, L_t * H] target features of positions cache.lengths[b] + q, valid for
        q < num_new[b]; next_ids: [B, Q] the committed token after each of those positions
        (Eagle3 pairs them; block drafters ignore them); anchor_ids: [B] the last committed
        token, at position cache.lengths + num_new; keys: [B] one PRNG key per sequence;
        sampling: per-row parameters (`dspark_jax.sampling`). Eagle3 drafts from the output of the last
        new pair, whose next_id is the anchor, so it needs num_new >= 1 (rows with 0 draft
        garbage). Returns (Proposal, cache holding the context up to the anchor).
        """
        c = self.config
        num_new = num_new.astype(jnp.int32)
        if keys.shape == ():  # one key for the batch: split it into one per sequence
            keys = split(keys, num_new.shape[0])
        start = cache.lengths + num_new  # anchor positions
        own, embed, lm_head = split_params(params)
        if c.algorithm == "eagle3":
            out, kv = self._eagle3_extend(params, cache, features, next_ids, num_new)
            last = jnp.take_along_axis(out, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]
            tokens, probs, _, kv = self.module.apply(
                {"params": own}, embed, lm_head, kv, last, start, keys, sampling, method=Eagle3Drafter.chain
            )
            zeros = jnp.zeros(tokens.shape, jnp.float32)
            return Proposal(tokens, probs, zeros), cache.updated((kv,), start)
        positions, slots = new_slots(cache.lengths, num_new, features.shape[1], cache.max_length)
        hidden, layers = self.module.apply(
            {"params": own}, embed, features, positions, start[:, None], anchor_ids[:, None],
            jnp.ones(start.shape + (1,), bool), start[:, None], cache.layers, slots, method=BlockDrafter.backbone,
        )
        tokens, probs, conf = self.module.apply(
            {"params": own}, embed, lm_head, hidden[:, 0], anchor_ids, keys, sampling, method=BlockDrafter.sample
        )
        return Proposal(tokens, probs, conf), cache.updated(layers, start)



@dataclasses.dataclass(frozen=True, eq=False)
class Draft:
    """A draft model: its weights (`params`) and the pure functions of its `model`, which every
    method below is."""

    config: DraftConfig
    params: Any
    dtype: Any = jnp.bfloat16
    mesh: Mesh | None = None

    split = staticmethod(split_params)
    frozen = staticmethod(frozen_params)

    @functools.cached_property
    def model(self) -> DraftModel:
        return DraftModel(self.config, self.dtype, self.mesh)

    block_forward = property(lambda self: self.model.block_forward)
    block_head_inputs = property(lambda self: self.model.block_head_inputs)
    ttt_forward = property(lambda self: self.model.ttt_forward)
    logits = property(lambda self: self.model.logits)
    score_block = property(lambda self: self.model.score_block)
    init_cache = property(lambda self: self.model.init_cache)
    init_paged_cache = property(lambda self: self.model.init_paged_cache)
    extend_context = property(lambda self: self.model.extend_context)
    propose = property(lambda self: self.model.propose)

    @classmethod
    def random(cls, config: DraftConfig, *, target=None, seed: int = 0, dtype="bfloat16", mesh: Mesh | None = None):
        """A draft with freshly initialised weights; embedding/LM head shared with `target`
        when given, else random too."""
        dtype = jnp.dtype(dtype)
        shapes, _ = abstract_module_params(config, dtype)
        if target is not None:
            frozen = cls.frozen(target.params)
        else:
            v, h = config.layers.vocab_size, config.layers.hidden_size
            frozen = random_params({"embed_tokens": jax.ShapeDtypeStruct((v, h), dtype),
                                    "lm_head": jax.ShapeDtypeStruct((h, v), dtype)}, jax.random.key(seed + 1))
        return cls(config, {**random_params(shapes, jax.random.key(seed)), **frozen}, dtype, mesh)
