"""Block attention in plain jnp: the definition the kernels are tested against (and what
`implementation="xla"` runs). It builds every score, so its memory grows with blocks x context.

Einsum letters: b sequence, a block (anchor), j a block's slot as a query, l as a key, k KV head,
r query head within its KV head's group, d head dim, s context slot (= position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_attention(q: jax.Array, k_ctx: jax.Array, v_ctx: jax.Array, ctx_len: jax.Array, k_blk: jax.Array,
                    v_blk: jax.Array, keep: jax.Array, scale: float | None = None) -> jax.Array:
    """Attention of block slots over the context plus their own block, one softmax.

    q: [B, A, G, N, D] (A blocks of G slots); k_ctx, v_ctx: [B, K, S, D] context keys/values
    (slot s = position s); ctx_len: [B, A] int32, block a sees context slots s < ctx_len[b, a];
    k_blk, v_blk: [B, A, G, K, D], every slot of block a sees all G of them; keep: [B, A] bool,
    a dropped block sees nothing and outputs zeros. Scores are q.k times `scale` (default
    1/sqrt(D)), they and the softmax in fp32, the probabilities cast to v's dtype for the value
    product. Returns [B, A, G, N, D] in q's dtype.
    """
    b, a, g, n, d = q.shape
    kv_heads = k_ctx.shape[1]
    qg = q.reshape(b, a, g, kv_heads, n // kv_heads, d)  # [B, A, G, K, R, D]
    s_ctx = jnp.einsum("bajkrd,bksd->bakrjs", qg, k_ctx, preferred_element_type=jnp.float32)
    s_blk = jnp.einsum("bajkrd,balkd->bakrjl", qg, k_blk, preferred_element_type=jnp.float32)
    ctx_visible = jnp.arange(k_ctx.shape[2])[None, None, :] < ctx_len[:, :, None]  # [B, A, S]
    ctx_visible = ctx_visible & keep[:, :, None]
    blk_visible = jnp.broadcast_to(keep[:, :, None], (b, a, g))  # [B, A, G]
    logits = jnp.concatenate([s_ctx, s_blk], axis=-1) * (d**-0.5 if scale is None else scale)  # [B, A, K, R, G, S + G]
    visible = jnp.concatenate([ctx_visible, blk_visible], axis=-1)[:, :, None, None, None, :]
    logits = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = (probs / jnp.where(denom > 0, denom, 1.0)).astype(v_ctx.dtype)  # all-masked rows -> 0
    s = k_ctx.shape[2]
    out = jnp.einsum("bakrjs,bksd->bajkrd", probs[..., :s], v_ctx) + jnp.einsum(
        "bakrjl,balkd->bajkrd", probs[..., s:], v_blk
    )
    return out.reshape(b, a, g, n, d).astype(q.dtype)
