"""Ragged paged attention in plain jnp: the definition the kernels are tested against.

Einsum letters: b row, t query token, k KV head, r query head within its KV head's group,
d head dim, s key slot (= position), m block-table column, p page slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                           q_positions: jax.Array, kv_lengths: jax.Array, return_lse: bool = False,
                           scale: float | None = None, window: int | None = None):
    """Grouped-query attention of each row's queries over its pages.

    q: [B, T, N, D]; k_pages, v_pages: [P, page_size, K, D] (the pools every row shares);
    block_table: [B, M] int32, position s of row b lives at page block_table[b, s // page_size],
    offset s % page_size; q_positions: [B, T] int32; kv_lengths: [B] int32.
    Query t of row b sees position s iff s <= q_positions[b, t] and s < kv_lengths[b] (and, with
    a sliding `window`, q_positions[b, t] - s < window); a query that sees nothing (padding)
    gets zeros. Scores are q.k times `scale` (default 1/sqrt(D)), they and the softmax in fp32,
    the probabilities cast to v's dtype for the value product. Returns [B, T, N, D] in q's
    dtype, and with return_lse also the log-sum-exp of each query's scaled scores [B, T, N]
    fp32 (-inf where it sees nothing), which lets a caller merge this attention with attention
    over other keys.
    """
    b, t, n, d = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    m = block_table.shape[1]
    k = k_pages[block_table].reshape(b, m * page_size, kv_heads, d)  # [B, S, K, D]
    v = v_pages[block_table].reshape(b, m * page_size, kv_heads, d)
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)  # [B, T, K, R, D]
    logits = jnp.einsum("btkrd,bskd->bkrts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5 if scale is None else scale)
    slots = jnp.arange(m * page_size, dtype=jnp.int32)[None, None, :]
    qpos = q_positions[:, :, None]
    visible = (slots <= qpos) & (slots < kv_lengths[:, None, None])
    if window is not None:
        visible = visible & (qpos - slots < window)
    visible = visible[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = (probs / jnp.where(total > 0, total, 1.0)).astype(v.dtype)
    out = jnp.einsum("bkrts,bskd->btkrd", probs, v).reshape(b, t, n, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[..., 0]  # [B, K, R, T]
    return out, lse.transpose(0, 3, 1, 2).reshape(b, t, n)
