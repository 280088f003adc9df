"""The Llama / Qwen3 / Gemma4 decoder as a pure-functional Flax Linen module.

One module serves three modes:

- full forward (no cache): causal attention over the given tokens;
- cache extension (prefill and verify): new tokens are written into each layer's KV cache at
  slots `write_slots` and attend over every valid cache slot;
- tapped hidden states: the raw output of any decoder layer (HF `hidden_states[l + 1]`),
  and the embedding output for layer id -1, are collected on the way.

Each decoder layer owns its parameters (`layers_0`, `layers_1`, ...) and its cache arrays,
and the layers run in a Python loop. Layers stacked on one axis and run with `lax.scan`
compile faster, but XLA then copies each layer's weights out of the stack before every
matmul, and a memory-bound decode step reads its weights three times instead of once
(measured on an H100: 9.7 ms against 5.0 ms for a Qwen3-4B batch-1 decode step; see
docs/benchmarks.md). Identical layers compile once, so compile time stays a few seconds.

Parameter names follow the transformers checkpoint names (`embed_tokens`, `layers_3/
self_attn/q_proj`, ...) with Linear weights stored input-major: q_proj [H, N, D],
o_proj [N, D, H].

Gemma4 differs in each layer (`ModelConfig.layer_spec`): sliding-window or full attention with
their own head dim, key/value heads and RoPE; keys that double as values (no v_proj, the value
being the RMS-normed key projection before RoPE); attention scale 1; "sandwich" norms around
attention and MLP and a `layer_scalar` on the layer's output; scaled embeddings and
soft-capped logits.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dspark_jax.models.config import LayerSpec, ModelConfig
from dspark_jax.models.kv_cache import LayerCache, PagedLayerCache
from dspark_jax.models.attention import kv_attention, sequence_attention
from dspark_jax.models.layers import MLP, RMSNorm, apply_rope, embed_tokens, lm_logits, param_init, rope_cos_sin
from dspark_jax.sharding import DEFAULT_RULES, ShardingRules, constrain


class Attention(nn.Module):
    """GQA attention projections with optional per-head q/k RMSNorm (Qwen3, Gemma4) and RoPE.

    The attention pattern is the caller's: target layers attend causally over their cache,
    draft layers attend over injected context plus their block. Inputs have any leading dims
    [...]; `in_features` defaults to the hidden size (Eagle3 feeds 2H). `spec` gives the head
    dim and key/value heads (ModelConfig.layer_spec).
    """

    config: ModelConfig
    spec: LayerSpec
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    in_features: int | None = None

    def setup(self):
        cfg = self.config
        f, h = self.in_features or cfg.hidden_size, cfg.hidden_size
        n, k, d = cfg.num_heads, self.spec.num_kv_heads, self.spec.head_dim

        def weight(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(param_init(), axes), shape, self.param_dtype)

        self.q_proj = weight("q_proj", (f, n, d), ("embed", "heads", "head_dim"))
        self.k_proj = weight("k_proj", (f, k, d), ("embed", "kv_heads", "head_dim"))
        if not self.spec.k_eq_v:
            self.v_proj = weight("v_proj", (f, k, d), ("embed", "kv_heads", "head_dim"))
        self.o_proj = weight("o_proj", (n, d, h), ("heads", "head_dim", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
            self.k_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        if cfg.gemma:
            self.v_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, use_scale=False)

    def query(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [..., F] -> rotated queries [..., N, D]; cos/sin [..., D]."""
        q = jnp.einsum("...f,fnd->...nd", x, self.q_proj.astype(self.dtype))
        if self.config.qk_norm:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def key_value(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., F] -> (rotated keys, values), each [..., K, D]."""
        k = jnp.einsum("...f,fkd->...kd", x, self.k_proj.astype(self.dtype))
        v = k if self.spec.k_eq_v else jnp.einsum("...f,fkd->...kd", x, self.v_proj.astype(self.dtype))
        if self.config.qk_norm:
            k = self.k_norm(k)
        if self.config.gemma:
            v = self.v_norm(v)
        return apply_rope(k, cos, sin), v

    def output(self, attended: jax.Array) -> jax.Array:
        """Attention output [..., N, D] -> [..., H]."""
        return jnp.einsum("...nd,ndh->...h", attended, self.o_proj.astype(self.dtype))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer (with Gemma4's sandwich norms and layer scalar)."""

    config: ModelConfig
    spec: LayerSpec
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    @nn.compact
    def __call__(self, x, positions, cos, sin, kv_lengths, kv: LayerCache | PagedLayerCache | None, write_slots):
        """x [B, T, H] -> (x [B, T, H], updated kv of this layer); cos/sin [B, T, D] of this
        layer's RoPE."""
        cfg, spec = self.config, self.spec
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn = Attention(cfg, spec, self.dtype, self.param_dtype, name="self_attn")
        xn = norm("input_layernorm")(x)
        q = constrain(attn.query(xn, cos, sin), ("batch", "seq", "act_heads", "head_dim"), self.mesh,
                      self.rules)  # [B, T, N, D]
        k_new, v_new = attn.key_value(xn, cos, sin)  # [B, T, K, D]
        pattern = dict(scale=cfg.attention_scale, window=spec.window)
        if kv is None:  # cache-free forward: positions are 0..T-1
            out = sequence_attention(q, k_new, v_new, kv_lengths, cfg.attention, **pattern)
        else:
            kv = kv.write(write_slots, k_new, v_new)
            out = kv_attention(q, kv, positions, kv_lengths, cfg.attention, **pattern)
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype, cfg.hidden_activation,
                  name="mlp")
        x = residuals(cfg, x, attn.output(out), mlp, norm, lambda: layer_scalar(self, self.param_dtype))
        return constrain(x, ("batch", "seq", "act_embed"), self.mesh, self.rules), kv


def residuals(cfg: ModelConfig, x: jax.Array, attended: jax.Array, mlp, norm, scalar) -> jax.Array:
    """The rest of a layer after attention, x and attended [..., H] -> [..., H]:
    x + a, then + mlp(post_attention_layernorm(.)) (Llama, Qwen3); or Gemma4's sandwich
    x + post_attention_layernorm(a), + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.))),
    times layer_scalar. `norm(name)` gives the named RMSNorm, `scalar()` the layer scalar [1]."""
    if not cfg.gemma:
        x = x + attended
        return x + mlp(norm("post_attention_layernorm")(x))
    x = x + norm("post_attention_layernorm")(attended)
    x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
    return x * jax.lax.stop_gradient(scalar()).astype(x.dtype)  # a fixed buffer in Gemma4: never trained


def layer_scalar(module: nn.Module, param_dtype) -> jax.Array:
    """Gemma4's per-layer output multiplier [1] (a saved buffer, 1.0 in released checkpoints)."""
    return module.param("layer_scalar", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,),
                        param_dtype)


class Decoder(nn.Module):
    """Embedding -> decoder layers -> final norm; the LM head is `logits`."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

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
        self.layers = [
            DecoderLayer(cfg, cfg.layer_spec(i), self.dtype, self.param_dtype, self.mesh, self.rules,
                         name=f"layers_{i}")
            for i in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_lengths: jax.Array,
        kv: Sequence[LayerCache | PagedLayerCache] | None = None,
        write_slots: jax.Array | None = None,
        hidden_layers: Sequence[int] = (),
    ):
        """Runs the decoder stack.

        tokens, positions: [B, T] int32; kv_lengths: [B] valid key slots after this call
        (T for a cache-free forward, whose positions must be 0..T-1); kv: per-layer caches
        (`dspark_jax.models.kv_cache`), or None;
        write_slots: [B, T] positions of the new tokens (>= the cache's max_length drops a
        padded token).
        Returns (last_hidden [B, T, H] after the final norm, layer_hiddens
        [B, T, len(hidden_layers), H], updated per-layer caches or None).
        """
        cfg = self.config
        hidden_layers = _check_layer_ids(hidden_layers, cfg.num_layers)
        x = embed_tokens(self.embed_tokens, tokens, cfg, self.dtype)  # [B, T, H]
        x = constrain(x, ("batch", "seq", "act_embed"), self.mesh, self.rules)
        outputs = {-1: x}
        tables = {}  # (rope, head dim) -> cos/sin [B, T, D], shared by the layers that use them
        new_kv = []
        for i, layer in enumerate(self.layers):
            rope = (layer.spec.rope, layer.spec.head_dim)
            if rope not in tables:
                tables[rope] = rope_cos_sin(positions, *rope)
            x, layer_kv = layer(x, positions, *tables[rope], kv_lengths, None if kv is None else kv[i], write_slots)
            new_kv.append(layer_kv)
            if i in hidden_layers:
                outputs[i] = x
        if hidden_layers:
            taps = jnp.stack([outputs[l] for l in hidden_layers], axis=2)  # [B, T, n, H]
        else:
            taps = jnp.zeros((*x.shape[:2], 0, x.shape[-1]), x.dtype)
        return self.norm(x), taps, None if kv is None else tuple(new_kv)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states [..., H]."""
        lm_head = None if self.config.tie_word_embeddings else self.lm_head
        return lm_logits(hidden, self.embed_tokens, lm_head, self.config.final_logit_softcapping)


def _check_layer_ids(hidden_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    hidden_layers = tuple(int(l) for l in hidden_layers)
    for l in hidden_layers:
        if not -1 <= l < num_layers:
            raise ValueError(f"hidden layer id {l} out of range [-1, {num_layers})")
    if len(set(hidden_layers)) != len(hidden_layers):
        raise ValueError(f"hidden layer ids {hidden_layers} repeat")
    return hidden_layers
