"""One sampling step of a draft slot, in plain jnp: the definition the kernel is tested against.

Row b's logits are z = base + vec W2^T (the LM-head logits plus DSpark's low-rank Markov bias,
accumulated in fp32; without vec and W2, the logits alone, as DFlash's slots have them). At
temperature T > 0 the draft distribution is q = softmax(z / T) and the token is the Gumbel-max
argmax_v z_v / T + g_v with the given standard Gumbel noise g (a draw from exactly q). At T = 0,
q is the one-hot of the first argmax of z, which is the token. Rows with top-k or top-p need
the sort of `dspark_jax.sampling.probabilities`, which this step does not do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def markov_sample(base: jax.Array, temperature: jax.Array, gumbel: jax.Array, vec: jax.Array | None = None,
                  w2: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """base [B, V] logits (any float dtype); temperature [B] (0: greedy); gumbel [B, V]; vec
    [B, R] and w2 [V, R] (both or neither). Returns (q [B, V] fp32, token [B] int32)."""
    z = base.astype(jnp.float32)
    if vec is not None:
        z = z + jnp.einsum("br,vr->bv", vec, w2, preferred_element_type=jnp.float32)
    greedy = (temperature == 0)[:, None]
    zt = z / jnp.where(greedy, 1.0, temperature[:, None])
    first_max = jnp.argmax(z, axis=-1)
    q = jnp.where(greedy, jax.nn.one_hot(first_max, z.shape[-1], dtype=jnp.float32), jax.nn.softmax(zt, axis=-1))
    token = jnp.where(greedy[:, 0], first_max, jnp.argmax(zt + gumbel, axis=-1))
    return q, token.astype(jnp.int32)
