"""DSpark and DFlash block drafters: a parallel backbone plus sequential Markov/confidence heads.

Backbone (reference section 2). The tapped target features of the context, concatenated
[..., L_t * H], are projected once (`fc`, then `hidden_norm`) into context rows C. Every draft
layer injects C as extra keys/values (its own k_proj/v_proj/k_norm on the same C; the context
is never updated by layers). A block is gamma slots: the anchor token (the last committed
token, whose own target feature is unknown) followed by gamma-1 mask tokens, at positions
anchor..anchor+gamma-1; slot j predicts the token at anchor+1+j. Block slots attend to every
context row strictly before the anchor and, bidirectionally, to their own block.

Heads (reference section 3), with e(x) = markov_w1[x] (rank r) and W2 = markov_w2 [V, r]:
- vanilla: D_j = U_j + W2 e(prev_j);
- gated:   D_j = U_j + W2 (sigmoid(gate_proj[h_j; e(prev_j)]) * e(prev_j));
- rnn:     [g, c, o] = joint_proj[s_{j-1}; e(prev_j); h_j]; D_j = U_j + W2 tanh(o);
           s_j = sigmoid(g) s_{j-1} + (1 - sigmoid(g)) tanh(c);
- confidence: c_j = proj([h_j; e(prev_j)]) (or proj(h_j)), a logit of the conditional
  acceptance of slot j;
where prev_0 is the anchor and prev_j the token of slot j-1 (teacher-forced in training,
sampled at inference). DFlash is the backbone alone (markov_rank 0, no confidence head).

The embedding and LM head are the target's frozen arrays; they are arguments here, not
parameters of this module, so a draft and its target share one copy in device memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dspark_jax.sampling import SamplingParams, draw, gumbel, probabilities, row_temperatures, split
from dspark_jax.models.attention import block_attention, kv_block_attention
from dspark_jax.models.draft_config import DraftConfig
from dspark_jax.models.kv_cache import LayerCache, PagedLayerCache
from dspark_jax.models.layers import MLP, RMSNorm, embed_tokens, lm_logits, param_init, rope_cos_sin
from dspark_jax.models.transformer import Attention, layer_scalar, residuals
from pallas_kernels.markov_sampling import markov_sample


class BlockDraftLayer(nn.Module):
    """One draft layer: block slots attend to injected context and to their own block."""

    config: DraftConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mesh: Mesh | None = None  # where the block attention kernels split their work by sequence

    @nn.compact
    def __call__(self, x, blk_cs, ctx, ctx_cs, ctx_len, keep, kv: LayerCache | PagedLayerCache | None, write_slots):
        """x: [B, A, G, H] block hidden; blk_cs: RoPE (cos, sin) [B, A, G, D] of the slots.

        ctx: [B, T, H] context rows with RoPE ctx_cs [B, T, D]. Without a cache (training,
        scoring) they are the whole context and their keys are used directly; with a cache
        (inference) they are new rows, written at write_slots [B, T] before attending.
        ctx_len: [B, A] visible context slots per block; keep: [B, A].
        Returns (x [B, A, G, H], updated kv or None).
        """
        cfg = self.config.layers
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn = Attention(cfg, cfg.layer_spec(0), self.dtype, self.param_dtype, name="self_attn")
        xn = norm("input_layernorm")(x)
        q = attn.query(xn, *blk_cs)  # [B, A, G, N, D]
        k_blk, v_blk = attn.key_value(xn, *blk_cs)  # [B, A, G, K, D]
        k_ctx, v_ctx = attn.key_value(ctx, *ctx_cs)  # [B, T, K, D]
        if kv is None:
            k_ctx, v_ctx = k_ctx.transpose(0, 2, 1, 3), v_ctx.transpose(0, 2, 1, 3)  # [B, K, T, D]
            out = block_attention(q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep, cfg.attention,
                                  scale=cfg.attention_scale, mesh=self.mesh)
        else:
            kv = kv.write(write_slots, k_ctx, v_ctx)
            out = kv_block_attention(q, kv, ctx_len, k_blk, v_blk, keep, cfg.attention, scale=cfg.attention_scale)
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype, cfg.hidden_activation,
                  name="mlp")
        return residuals(cfg, x, attn.output(out), mlp, norm, lambda: layer_scalar(self, self.param_dtype)), kv


class MarkovHead(nn.Module):
    """Low-rank first-order transition bias between block tokens (vanilla, gated or rnn)."""

    config: DraftConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        c, r, v = self.config, self.config.markov_rank, self.config.layers.vocab_size
        table = nn.with_logical_partitioning(param_init(), ("vocab", "markov"))
        self.markov_w1 = self.param("markov_w1", table, (v, r), self.param_dtype)  # e(x) = W1[x]
        self.markov_w2 = self.param("markov_w2", table, (v, r), self.param_dtype)  # bias = W2 e
        if c.markov_head_type == "gated":
            self.gate_proj = nn.Dense(r, dtype=self.dtype, param_dtype=self.param_dtype, name="gate_proj",
                                      kernel_init=nn.with_logical_partitioning(param_init(), ("embed", "markov")))
        elif c.markov_head_type == "rnn":
            self.joint_proj = nn.Dense(3 * r, dtype=self.dtype, param_dtype=self.param_dtype, name="joint_proj",
                                       kernel_init=nn.with_logical_partitioning(param_init(), ("embed", "markov")))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """e(tokens): [...] -> [..., r]."""
        return jnp.take(self.markov_w1, tokens, axis=0).astype(self.dtype)

    def step(self, h: jax.Array, e: jax.Array, state: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """One slot: h [..., H], e = e(prev) [..., r], state [..., r] (rnn only, else None)
        -> (vector fed to W2 [..., r], new state)."""
        kind = self.config.markov_head_type
        if kind == "vanilla":
            return e, state
        if kind == "gated":
            return nn.sigmoid(self.gate_proj(jnp.concatenate([h, e], axis=-1))) * e, state
        gate, cand, out = jnp.split(self.joint_proj(jnp.concatenate([state, e, h], axis=-1)), 3, axis=-1)
        gate = nn.sigmoid(gate)
        return jnp.tanh(out), (gate * state + (1 - gate) * jnp.tanh(cand)).astype(state.dtype)

    def bias(self, vec: jax.Array) -> jax.Array:
        """fp32 logit bias [..., V] = W2 vec."""
        return jnp.einsum("...m,vm->...v", vec, self.markov_w2.astype(self.dtype), preferred_element_type=jnp.float32)

    def teacher_forced(self, h: jax.Array, prev: jax.Array) -> tuple[jax.Array, jax.Array]:
        """All slots at once from given previous tokens: h [B, A, G, H], prev [B, A, G].

        Returns (the vectors fed to W2 [B, A, G, r], e(prev) [B, A, G, r]).
        """
        e = self.embed(prev)
        if self.config.markov_head_type != "rnn":
            return self.step(h, e, None)[0], e
        state = jnp.zeros(e.shape[:2] + (self.config.markov_rank,), self.dtype)  # s_{-1} = 0
        vecs = []
        for j in range(h.shape[2]):  # the recurrence over gamma slots, teacher-forced
            vec, state = self.step(h[:, :, j], e[:, :, j], state)
            vecs.append(vec)
        return jnp.stack(vecs, axis=2), e

    def initial_state(self, batch_shape: tuple[int, ...]) -> jax.Array | None:
        if self.config.markov_head_type != "rnn":
            return None
        return jnp.zeros(batch_shape + (self.config.markov_rank,), self.dtype)


class ConfidenceHead(nn.Module):
    """c_j = proj([h_j; e(prev_j)]) (or proj(h_j)): fp32 logit of slot j's conditional acceptance."""

    config: DraftConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array | None) -> jax.Array:
        f = h if e is None else jnp.concatenate([h, e.astype(h.dtype)], axis=-1)
        proj = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                        kernel_init=nn.with_logical_partitioning(param_init(), ("embed", None)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        return proj(f)[..., 0].astype(jnp.float32)


class BlockDrafter(nn.Module):
    """DSpark / DFlash draft model (parameters: fc, hidden_norm, layers_i, norm, heads)."""

    config: DraftConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None

    def setup(self):
        c = self.config
        h = c.layers.hidden_size
        self.fc = self.param("fc", nn.with_logical_partitioning(param_init(), ("features", "embed")),
                             (c.feature_size, h), self.param_dtype)
        self.hidden_norm = RMSNorm(c.layers.rms_norm_eps, self.dtype, self.param_dtype)
        self.layers = [BlockDraftLayer(c, self.dtype, self.param_dtype, self.mesh, name=f"layers_{i}")
                       for i in range(c.layers.num_layers)]
        self.norm = RMSNorm(c.layers.rms_norm_eps, self.dtype, self.param_dtype)
        if c.markov_rank:
            self.markov_head = MarkovHead(c, self.dtype, self.param_dtype)
        if c.confidence_head:
            self.confidence_head = ConfidenceHead(c, self.dtype, self.param_dtype)

    def context(self, features: jax.Array) -> jax.Array:
        """Context rows C = hidden_norm(fc(features)): [..., L_t * H] -> [..., H]."""
        return self.hidden_norm(jnp.einsum("...f,fh->...h", features.astype(self.dtype), self.fc.astype(self.dtype)))

    def backbone(self, embed, features, ctx_positions, anchors, anchor_ids, keep, ctx_len, kv=None, write_slots=None):
        """The parallel pass over A blocks per sequence.

        embed: [V, H] token embedding; features: [B, T, L_t * H] context rows at ctx_positions
        [B, T]; anchors: [B, A] anchor positions; anchor_ids: [B, A]; keep: [B, A]; ctx_len:
        [B, A] context slots visible to each block; kv / write_slots as in BlockDraftLayer.
        Returns (hidden [B, A, G, H] after the final norm, updated per-layer kv or None).
        """
        c = self.config
        gamma = c.block_size
        slot = jnp.arange(gamma, dtype=jnp.int32)
        ids = jnp.where((slot == 0)[None, None, :] & keep[:, :, None], anchor_ids[:, :, None], c.mask_token_id)
        x = embed_tokens(embed, ids, c.layers, self.dtype)  # [B, A, G, H]
        spec = c.layers.layer_spec(0)
        blk_cs = rope_cos_sin(anchors[:, :, None] + slot, spec.rope, spec.head_dim)  # [B, A, G, D]
        ctx = self.context(features)  # [B, T, H]
        ctx_cs = rope_cos_sin(ctx_positions, spec.rope, spec.head_dim)  # [B, T, D]
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, blk_cs, ctx, ctx_cs, ctx_len, keep, None if kv is None else kv[i], write_slots)
            new_kv.append(layer_kv)
        return self.norm(x), None if kv is None else tuple(new_kv)

    def heads(self, embed, lm_head, hidden, prev):
        """Teacher-forced heads: hidden [B, A, G, H], prev [B, A, G] previous tokens.

        Returns (draft logits D [B, A, G, V] fp32 after the Markov bias, confidence logits
        [B, A, G] fp32, zeros without a confidence head).
        """
        logits = lm_logits(hidden, embed, lm_head, self.config.layers.final_logit_softcapping)
        vec, conf = self.head_inputs(hidden, prev)
        if vec is not None:
            logits = logits + self.markov_head.bias(vec)
        return logits, conf

    def head_inputs(self, hidden, prev):
        """What the heads add to the LM head's logits, teacher-forced: hidden [B, A, G, H], prev
        [B, A, G]. Returns (the Markov vectors fed to W2 [B, A, G, r], None without a Markov
        head; confidence logits [B, A, G] fp32, zeros without a confidence head)."""
        vec = e = None
        if self.config.markov_rank:
            vec, e = self.markov_head.teacher_forced(hidden, prev)
        conf = jnp.zeros(hidden.shape[:-1], jnp.float32)
        if self.config.confidence_head:
            conf = self.confidence_head(hidden, e if self.config.confidence_with_markov else None)
        return vec, conf

    def sample(self, embed, lm_head, hidden, anchor_ids, keys, sampling: SamplingParams):
        """Sequential sampling of one block per sequence: hidden [B, G, H], anchor_ids [B],
        keys [B] one PRNG key per sequence, sampling per-row parameters.

        Slot j's distribution is probabilities(U_j + bias(prev_j), sampling) in fp32, and the
        token is drawn from exactly that array. Returns (tokens [B, G] int32, probs [B, G, V]
        fp32, confidence logits [B, G] fp32).

        With the kernels' setting (`layers.attention == "pallas"`) and no top-k/top-p, each
        slot's step is the fused kernel of `pallas_kernels.markov_sampling`: the same law, its
        token the Gumbel-max of the same noise over z / T rather than over log q.
        """
        c = self.config
        slot_keys = split(keys, c.block_size)  # [B, G]
        base = lm_logits(hidden, embed, lm_head, c.layers.final_logit_softcapping)  # [B, G, V]
        if not c.markov_rank:  # DFlash: slots are independent, sample them at once
            if self.fused(sampling):
                b, g, v = base.shape
                probs, tokens = markov_sample(base.reshape(b * g, v), row_temperatures(sampling, base).reshape(-1),
                                              gumbel(slot_keys, v).reshape(b * g, v))
                return tokens.reshape(b, g), probs.reshape(b, g, v), jnp.zeros(hidden.shape[:-1], jnp.float32)
            probs = probabilities(base, sampling)
            return draw(slot_keys, probs), probs, jnp.zeros(hidden.shape[:-1], jnp.float32)
        scan = nn.scan(
            lambda mdl, carry, xs: mdl.sample_slot(carry, xs, sampling),
            variable_broadcast="params",
            split_rngs={"params": False},
        )
        xs = (hidden.swapaxes(0, 1), base.swapaxes(0, 1), slot_keys.swapaxes(0, 1))
        carry = (anchor_ids, self.markov_head.initial_state(anchor_ids.shape))
        _, (tokens, probs, conf) = scan(self, carry, xs)
        return tokens.swapaxes(0, 1), probs.swapaxes(0, 1), conf.swapaxes(0, 1)

    def fused(self, sampling: SamplingParams) -> bool:
        """Whether sampling runs through the fused kernel (see `sample`)."""
        return self.config.layers.attention == "pallas" and not sampling.filtered

    def sample_slot(self, carry, xs, sampling: SamplingParams):
        """One step of `sample`: carry (prev [B], state), xs (h [B, H], base logits [B, V], keys [B])."""
        prev, state = carry
        h, base, keys = xs
        e = self.markov_head.embed(prev)
        vec, state = self.markov_head.step(h, e, state)
        if self.fused(sampling):
            probs, token = markov_sample(base, row_temperatures(sampling, base), gumbel(keys, base.shape[-1]), vec,
                                         self.markov_head.markov_w2.astype(self.dtype))
        else:
            probs = probabilities(base + self.markov_head.bias(vec), sampling)  # [B, V] fp32
            token = draw(keys, probs)
        conf = jnp.zeros(prev.shape, jnp.float32)
        if self.config.confidence_head:
            conf = self.confidence_head(h, e if self.config.confidence_with_markov else None)
        return (token, state), (token, probs, conf)
