"""Speculative rejection sampling over a batch of chains with per-sequence verify lengths.

Sequence b verifies draft tokens d_1..d_L (L = lengths[b] <= gamma) drawn from q_1..q_L.
The target's distributions p_0..p_L come from verifying [anchor, d_1..d_L]: p_{j} is the
target's distribution for the token after d_j (p_0 after the anchor). Draft token d_{j+1} is
accepted with probability min(1, p_j(d) / q_{j+1}(d)); A is the length of the accepted prefix;
the next token is drawn from the residual norm(max(p_A - q_{A+1}, 0)) if A < L, else from
p_L (the bonus token). Every draw uses the given fp32 distributions, so the committed
sequence is distributed exactly as the target's own samples (greedy included: one-hot p and q
accept exactly the tokens the target's argmax would emit).

`verify_logits` is the same law from the target's logits and per-row temperatures, through the
fused kernel of `pallas_kernels.rejection_sampling` (the softmax is never written): the same
keys give the same uniforms and Gumbel noise, hence the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dspark_jax.sampling import draw, fold, gumbel, split
from pallas_kernels.rejection_sampling import rejection_sample

# Independent random streams of one round of one row, folded into the row's key.
DRAFT_STREAM, ACCEPT_STREAM, NEXT_STREAM = 0, 1, 2


class Verdict(NamedTuple):
    accepted: jax.Array  # [B] int32, A: number of accepted draft tokens (<= lengths)
    next_token: jax.Array  # [B] int32, the residual or bonus token after them


def verify(keys: jax.Array, draft_tokens, q, p, lengths) -> Verdict:
    """keys: [B] the round's PRNG key of each sequence (or one key, split over the batch);
    draft_tokens: [B, G] int32; q: [B, G, V] fp32 draft distributions of d_1..d_G;
    p: [B, G + 1, V] fp32 target distributions p_0..p_G; lengths: [B] int32 in [0, G].
    Entries beyond a sequence's length are ignored.
    """
    b, g = draft_tokens.shape
    if keys.shape == ():
        keys = split(keys, b)
    p_d = jnp.take_along_axis(p[:, :g], draft_tokens[..., None], axis=-1)[..., 0]  # p_{j}(d_{j+1}) [B, G]
    q_d = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]  # [B, G]
    u = _uniforms(keys, g)  # [B, G]
    # u < p/q without dividing (q_d > 0 for every sampled token; u in [0, 1) so ratio >= 1 accepts).
    ok = (u * q_d < p_d) & (jnp.arange(g)[None, :] < lengths[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    p_next = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    q_next = jnp.take_along_axis(q, jnp.minimum(accepted, g - 1)[:, None, None], axis=1)[:, 0]
    rejected = accepted < lengths
    residual = jnp.where(rejected[:, None], jnp.maximum(p_next - q_next, 0.0), p_next)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    return Verdict(accepted.astype(jnp.int32), draw(fold(keys, NEXT_STREAM), residual))


def _uniforms(keys: jax.Array, g: int) -> jax.Array:
    """The acceptance tests' uniforms [B, G] of a round's keys [B]."""
    return jax.vmap(lambda k: jax.random.uniform(k, (g,), jnp.float32))(fold(keys, ACCEPT_STREAM))


def verify_logits(keys: jax.Array, draft_tokens, q, logits, temperature, lengths, implementation: str = "pallas"
                  ) -> Verdict:
    """`verify` with p = softmax(logits / temperature) (one-hot argmax at temperature 0) never
    materialised: logits [B, G + 1, V] of the target; temperature [B] (or a scalar); the rest as
    in `verify`. `implementation`: "pallas" (the fused kernel; interpreted off a GPU) or "xla"
    (its jnp reference). Rows with top-k or top-p need `verify`."""
    b, g = draft_tokens.shape
    v = logits.shape[-1]
    if keys.shape == ():
        keys = split(keys, b)
    q_tokens = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]  # [B, G]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32).reshape(-1), (b,))
    accepted, next_token = rejection_sample(logits, temperature, q, q_tokens, draft_tokens, lengths,
                                            _uniforms(keys, g), gumbel(fold(keys, NEXT_STREAM), v),
                                            implementation=implementation)
    return Verdict(accepted, next_token)
