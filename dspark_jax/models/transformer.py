"""The Llama / Qwen3 decoder as a pure-functional Flax Linen module.

Decoder layers are stacked on a leading "layers" axis and run with `nn.scan`, so compile time
does not grow with depth. One module serves three modes:

- full forward (no cache): causal attention over the given tokens;
- cache extension (prefill and verify): new tokens are written into the KV cache at slots
  `write_slots` and attend over every valid cache slot;
- tapped hidden states: the raw output of any decoder layer (HF `hidden_states[l + 1]`),
  and the embedding output for layer id -1, are collected on the way.

Parameter names follow the transformers checkpoint names (`embed_tokens`, `layers/self_attn/
q_proj`, ...) with Linear weights stored input-major: q_proj [H, N, D], o_proj [N, D, H].
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dspark_jax.models.config import ModelConfig
from dspark_jax.models.kv_cache import write_layer
from dspark_jax.models.layers import MLP, RMSNorm, apply_rope, causal_attention, param_init, rope_cos_sin
from dspark_jax.sharding import constrain

# (k [L, B, S, K, D], v [L, B, S, K, D]) of the whole stack, or None for a cache-free forward.
CacheArrays = tuple[jax.Array, jax.Array] | None


class SelfAttention(nn.Module):
    """GQA self-attention with optional per-head q/k RMSNorm (Qwen3) and RoPE."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos, sin, positions, kv_lengths, kv: CacheArrays, layer_index, write_slots):
        cfg = self.config
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def weight(name, shape, axes):
            init = nn.with_logical_partitioning(param_init(), axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        wq = weight("q_proj", (h, n, d), ("embed", "heads", "head_dim"))
        wk = weight("k_proj", (h, k, d), ("embed", "kv_heads", "head_dim"))
        wv = weight("v_proj", (h, k, d), ("embed", "kv_heads", "head_dim"))
        wo = weight("o_proj", (n, d, h), ("heads", "head_dim", "embed"))

        q = jnp.einsum("btd,dnh->btnh", x, wq)  # [B, T, N, D]
        k_new = jnp.einsum("btd,dkh->btkh", x, wk)  # [B, T, K, D]
        v_new = jnp.einsum("btd,dkh->btkh", x, wv)  # [B, T, K, D]
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k_new = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k_new)
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim"), self.mesh)
        k_new = apply_rope(k_new, cos, sin)

        if kv is None:
            out = causal_attention(q, k_new, v_new, positions, kv_lengths)
        else:
            kv = (write_layer(kv[0], layer_index, write_slots, k_new), write_layer(kv[1], layer_index, write_slots, v_new))
            out = causal_attention(q, kv[0][layer_index], kv[1][layer_index], positions, kv_lengths)
        return jnp.einsum("btnh,nhd->btd", out, wo), kv  # [B, T, H]


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: the body of the layer scan."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, carry, layer_index, tap_slot, positions, cos, sin, write_slots, kv_lengths):
        x, kv, taps = carry  # x [B, T, H]; taps [B, T, n_taps, H]
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        attn_out, kv = SelfAttention(cfg, self.dtype, self.param_dtype, self.mesh, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, positions, kv_lengths, kv, layer_index, write_slots
        )
        x = x + attn_out
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype, name="mlp")
        x = x + mlp(norm("post_attention_layernorm")(x))
        x = constrain(x, ("batch", "seq", "act_embed"), self.mesh)

        hit = jnp.arange(taps.shape[2]) == tap_slot  # [n_taps]
        taps = jnp.where(hit[None, None, :, None], x[:, :, None, :], taps)
        return (x, kv, taps), None


class Decoder(nn.Module):
    """Embedding -> scanned decoder layers -> final norm; the LM head is `logits`."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(param_init(), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            self.param_dtype,
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(param_init(), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size),
                self.param_dtype,
            )
        scanned = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, 0) + (nn.broadcast,) * 5,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        self.layers = scanned(cfg, self.dtype, self.param_dtype, self.mesh)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_lengths: jax.Array,
        kv: CacheArrays = None,
        write_slots: jax.Array | None = None,
        hidden_layers: Sequence[int] = (),
    ):
        """Runs the decoder stack.

        tokens, positions: [B, T] int32; kv_lengths: [B] valid key slots after this call
        (T for a cache-free forward); write_slots: [B, T] cache slots of the new tokens
        (slot >= S drops a padded token). Returns (last_hidden [B, T, H] after the final
        norm, layer_hiddens [B, T, len(hidden_layers), H], updated kv).
        """
        cfg = self.config
        tap_slot = _tap_slots(hidden_layers, cfg.num_layers)
        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(self.dtype)  # [B, T, H]
        x = constrain(x, ("batch", "seq", "act_embed"), self.mesh)
        n_taps = len(hidden_layers)
        embed_hit = jnp.asarray([l == -1 for l in hidden_layers], bool).reshape(n_taps)
        taps = jnp.where(embed_hit[None, None, :, None], x[:, :, None, :], jnp.zeros((), x.dtype))
        cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim)  # [B, T, D]

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, kv, taps), _ = self.layers(
            (x, kv, taps), layer_ids, tap_slot, positions, cos, sin, write_slots, kv_lengths
        )
        return self.norm(x), taps, kv

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states [..., H]."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head.astype(self.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def _tap_slots(hidden_layers: Sequence[int], num_layers: int) -> jax.Array:
    """int32 [L]: the output slot each decoder layer writes to, -1 if it is not tapped."""
    hidden_layers = tuple(int(l) for l in hidden_layers)
    for l in hidden_layers:
        if not -1 <= l < num_layers:
            raise ValueError(f"hidden layer id {l} out of range [-1, {num_layers})")
    if len(set(hidden_layers)) != len(hidden_layers):
        raise ValueError(f"hidden layer ids {hidden_layers} repeat")
    slots = [-1] * num_layers
    for slot, l in enumerate(hidden_layers):
        if l >= 0:
            slots[l] = slot
    return jnp.asarray(slots, jnp.int32)
