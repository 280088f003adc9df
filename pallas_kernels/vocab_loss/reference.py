"""The chunk loss in plain jnp: the definition the kernel is tested against (and what
`implementation="xla"` runs).

Per row r, with draft logits d, target logits y, p = softmax(d), q = softmax(y):
    ce_r   = logsumexp(d) - d[label_r]
    l1_r   = sum_v |p_v - q_v|
    grad_r = a_r (p - onehot(label_r)) + b_r p (sign(p - q) - S_r),  S_r = sum_v p_v sign(p_v - q_v)
grad is the derivative of a_r ce_r + b_r l1_r by d (the L1 term's through p; q takes none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_and_grad(d: jax.Array, y: jax.Array, labels: jax.Array, a: jax.Array, b: jax.Array, *,
                  out_dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """d, y: [R, V] fp32; labels: [R] int32; a, b: [R] fp32. Returns (ce [R] fp32, l1 [R] fp32,
    grad [R, V] in out_dtype)."""
    log_p, log_q = jax.nn.log_softmax(d, axis=-1), jax.nn.log_softmax(y, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    ce = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    sign = jnp.sign(p - q)
    s = jnp.sum(p * sign, axis=-1)  # [R]
    onehot = jnp.arange(d.shape[-1]) == labels[:, None]
    grad = a[:, None] * (p - onehot) + b[:, None] * p * (sign - s[:, None])
    return ce, jnp.sum(jnp.abs(p - q), axis=-1), grad.astype(out_dtype)
