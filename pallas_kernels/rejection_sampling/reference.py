"""Speculative rejection sampling from the target's logits, in plain jnp: the definition the
kernel is tested against.

Row b verifies draft tokens d_1..d_L (L = lengths[b] <= G) against the target's logits of
[anchor, d_1..d_G]. The target's distribution after position j is p_j = softmax(logits_j / T)
in fp32 (for T = 0 the one-hot of the first argmax). Draft token d_{j+1} is accepted iff
u_j * q_{j+1}(d_{j+1}) < p_j(d_{j+1}), for the leading j < L; A is the number accepted. The
next token is drawn by the Gumbel-max trick from the residual max(p_A - q_{A+1}, 0) when a
draft was rejected (A < L), else from p_A (the bonus token): argmax_v log(r_v) + g_v with the
given noise g, falling back to p_A if the residual has no mass. This is the law of
`dspark_jax.decoding.rejection.verify` with its uniforms and noise given, for rows sampled
with a temperature alone (top-k and top-p need a sort the kernel does not do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_probabilities(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """p [B, G + 1, V] fp32 from logits [B, G + 1, V] and temperature [B] (0: one-hot argmax)."""
    logits = logits.astype(jnp.float32)
    greedy = (temperature == 0)[:, None, None]
    probs = jax.nn.softmax(logits / jnp.where(greedy, 1.0, temperature[:, None, None]), axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy, one_hot, probs)


def rejection_sample(logits: jax.Array, temperature: jax.Array, q: jax.Array, q_tokens: jax.Array,
                     draft_tokens: jax.Array, lengths: jax.Array, uniforms: jax.Array, gumbel: jax.Array):
    """logits [B, G + 1, V] (any float dtype); temperature [B]; q [B, G, V] fp32 draft
    distributions of d_1..d_G and q_tokens [B, G] = q at the drafted tokens; draft_tokens
    [B, G] int32; lengths [B] int32 in [0, G]; uniforms [B, G] in [0, 1); gumbel [B, V]
    standard Gumbel noise. Returns (accepted [B] int32, next_token [B] int32)."""
    b, g = draft_tokens.shape
    p = target_probabilities(logits, temperature)  # [B, G + 1, V]
    p_d = jnp.take_along_axis(p[:, :g], draft_tokens[..., None], axis=-1)[..., 0]  # p_j(d_{j+1}) [B, G]
    ok = (uniforms * q_tokens < p_d) & (jnp.arange(g)[None, :] < lengths[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    p_next = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    q_next = jnp.take_along_axis(q, jnp.minimum(accepted, g - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.where((accepted < lengths)[:, None], jnp.maximum(p_next - q_next, 0.0), p_next)
    has_mass = jnp.sum(residual, axis=-1) > 0
    from_residual = jnp.argmax(jnp.log(residual) + gumbel, axis=-1)
    from_p = jnp.argmax(jnp.log(p_next) + gumbel, axis=-1)
    return accepted.astype(jnp.int32), jnp.where(has_mass, from_residual, from_p).astype(jnp.int32)
