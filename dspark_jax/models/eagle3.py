"""Eagle3 drafter: one decoder layer run autoregressively on its own output (reference section 5).

Inputs at position t: g_t = fc(F_t) (the concatenated tapped target features, no norm) and
the embedding of the *next* token x_{t+1}. The layer computes
    a = [input_layernorm(embed(x)); hidden_norm(g)]          [..., 2H]
    h = g + o_proj(attention(a))                              (q, k, v all from a)
    out = h + mlp(post_attention_layernorm(h))
and `out` is both the next step's g and, through `norm` and the LM head, the logits of the
token after x. Drafting from an anchor a (the last committed token): the pair (F_{a-1}, x_a)
gives slot 0's logits; slot j's token is fed back with the previous output at position a+j-1.

Training-time test (TTT) unrolls this gamma times over a whole sequence at once: step k at
position t feeds step k-1's output with token x_{t+k+1} at RoPE position t+k, and attends to
step 0's keys at positions <= t plus the keys of steps 1..k at the same t. This is exactly
what inference computes for the chain that starts at anchor t+1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dspark_jax.sampling import SamplingParams, draw, probabilities, split
from dspark_jax.models.draft_config import DraftConfig
from dspark_jax.models.kv_cache import LayerCache, PagedLayerCache, new_slots
from dspark_jax.models.attention import kv_attention, ttt_attention
from dspark_jax.models.layers import MLP, RMSNorm, embed_tokens, lm_logits, param_init, rope_cos_sin
from dspark_jax.models.transformer import Attention, layer_scalar, residuals


class Eagle3Layer(nn.Module):
    config: DraftConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        cfg = self.config.layers
        norm = lambda: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        self.hidden_norm, self.input_layernorm, self.post_attention_layernorm = norm(), norm(), norm()
        if cfg.gemma:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
            self.layer_scalar = layer_scalar(self, self.param_dtype)
        self.self_attn = Attention(cfg, cfg.layer_spec(0), self.dtype, self.param_dtype,
                                   in_features=2 * cfg.hidden_size)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, self.param_dtype, cfg.hidden_activation)

    def qkv(self, g: jax.Array, emb: jax.Array, cos: jax.Array, sin: jax.Array):
        """g, emb: [..., H] -> (q [..., N, D], k [..., K, D], v [..., K, D])."""
        a = jnp.concatenate([self.input_layernorm(emb), self.hidden_norm(g)], axis=-1)  # [..., 2H]
        return (self.self_attn.query(a, cos, sin), *self.self_attn.key_value(a, cos, sin))

    def finish(self, g: jax.Array, attended: jax.Array) -> jax.Array:
        """Residual, o_proj and MLP: g [..., H], attended [..., N, D] -> out [..., H]."""
        return residuals(self.config.layers, g, self.self_attn.output(attended), self.mlp,
                         lambda name: getattr(self, name), lambda: self.layer_scalar)


class Eagle3Drafter(nn.Module):
    """Parameters: fc, layers_0, norm. Embedding and LM head are the target's (arguments)."""

    config: DraftConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.fc = self.param("fc", nn.with_logical_partitioning(param_init(), ("features", "embed")),
                             (c.feature_size, c.layers.hidden_size), self.param_dtype)
        self.layers_0 = Eagle3Layer(c, self.dtype, self.param_dtype)
        self.norm = RMSNorm(c.layers.rms_norm_eps, self.dtype, self.param_dtype)

    def _rope(self, positions: jax.Array):
        spec = self.config.layers.layer_spec(0)
        return rope_cos_sin(positions, spec.rope, spec.head_dim)

    def project(self, features: jax.Array) -> jax.Array:
        """g = fc(features): [..., L_t * H] -> [..., H]."""
        return jnp.einsum("...f,fh->...h", features.astype(self.dtype), self.fc.astype(self.dtype))

    def logits(self, embed, lm_head, out: jax.Array) -> jax.Array:
        """fp32 logits [..., V] of layer outputs [..., H]."""
        return lm_logits(self.norm(out), embed, lm_head, self.config.layers.final_logit_softcapping)

    def ttt(self, embed, features: jax.Array, tokens: jax.Array) -> jax.Array:
        """Training-time-test unroll over whole sequences.

        features: [B, S, L_t * H] tapped target features; tokens: [B, S] the sequence. Returns
        the layer outputs [G, B, S, H] of steps k = 0..G-1; step k at position t predicts token
        t + k + 2 (feed them to `logits`). Rows near the end see padding tokens (id 0) and must
        be masked by the loss.
        """
        c = self.config
        b, s = tokens.shape
        t = jnp.arange(s, dtype=jnp.int32)
        g = self.project(features)  # [B, S, H]
        layer = self.layers_0
        outs, diag_k, diag_v = [], [], []
        k0 = v0 = None
        for k in range(c.block_size):
            shifted = jnp.pad(tokens, ((0, 0), (0, k + 1)))[:, k + 1 :]  # x_{t+k+1}, 0 past the end
            emb = embed_tokens(embed, shifted, c.layers, self.dtype)
            q, kk, vv = layer.qkv(g, emb, *self._rope(jnp.broadcast_to(t + k, (b, s))))
            if k == 0:
                k0, v0 = kk.transpose(0, 2, 1, 3), vv.transpose(0, 2, 1, 3)  # [B, K, S, D]
            else:
                diag_k.append(kk)
                diag_v.append(vv)
            g = layer.finish(g, ttt_attention(q, k0, v0, diag_k, diag_v, c.layers.attention,
                                              scale=c.layers.attention_scale))
            outs.append(g)
        return jnp.stack(outs)

    def extend(self, embed, kv: LayerCache | PagedLayerCache, lengths, features, next_ids, num_new):
        """Appends (F_t, x_{t+1}) pairs to the draft cache at positions lengths + q.

        features: [B, Q, L_t * H]; next_ids: [B, Q] the token after each feature's position;
        num_new: [B] valid rows. Returns (outputs [B, Q, H], updated kv).
        """
        positions, slots = new_slots(lengths, num_new, features.shape[1], kv.max_length)  # [B, Q]
        g = self.project(features)
        emb = embed_tokens(embed, next_ids, self.config.layers, self.dtype)
        q, k_new, v_new = self.layers_0.qkv(g, emb, *self._rope(positions))
        kv = kv.write(slots, k_new, v_new)
        attended = kv_attention(q, kv, positions, lengths + num_new, self.config.layers.attention,
                                scale=self.config.layers.attention_scale)
        return self.layers_0.finish(g, attended), kv

    def step(self, embed, kv: LayerCache | PagedLayerCache, g, token, position):
        """One recurrent step: g [B, H] previous output, token [B] at position [B] -> (out [B, H], kv)."""
        emb = embed_tokens(embed, token, self.config.layers, self.dtype)[:, None]
        q, k_new, v_new = self.layers_0.qkv(g[:, None], emb, *self._rope(position[:, None]))
        kv = kv.write(position[:, None], k_new, v_new)
        attended = kv_attention(q, kv, position[:, None], position + 1, self.config.layers.attention,
                                scale=self.config.layers.attention_scale)
        return self.layers_0.finish(g[:, None], attended)[:, 0], kv

    def chain(self, embed, lm_head, kv: LayerCache | PagedLayerCache, out, start, keys, sampling: SamplingParams, forced=None):
        """gamma autoregressive slots from the output `out` [B, H] of the pair at start - 1.

        Slot j's token is sampled from probabilities(logits_j, sampling) with keys [B] (one PRNG
        key per sequence), or taken from forced [B, G] (teacher forcing), and fed back at
        position start + j. Returns (tokens [B, G],
        probs [B, G, V] fp32, logits [B, G, V] fp32, kv with the slots' entries past `start`).
        """
        g_len = self.config.block_size

        def slot(mdl, carry, xs):
            out, kv = carry
            j, slot_keys, forced_j = xs
            logits = mdl.logits(embed, lm_head, out)  # [B, V]
            probs = probabilities(logits, sampling)
            token = draw(slot_keys, probs) if forced is None else forced_j.astype(jnp.int32)
            out, kv = mdl.step(embed, kv, out, token, start + j)
            return (out, kv), (token, probs, logits)

        forced_xs = jnp.zeros((g_len, out.shape[0]), jnp.int32) if forced is None else forced.swapaxes(0, 1)
        xs = (jnp.arange(g_len, dtype=jnp.int32), split(keys, g_len).swapaxes(0, 1), forced_xs)
        scan = nn.scan(slot, variable_broadcast="params", split_rngs={"params": False})
        (_, kv), (tokens, probs, logits) = scan(self, (out, kv), xs)
        return tokens.swapaxes(0, 1), probs.swapaxes(0, 1), logits.swapaxes(0, 1), kv
