"""The block drafters' vocabulary-sized losses, computed tile by tile over the vocabulary.

Per supervised slot t, with draft logits D = cap(h_t W) + W2 m_t (W the frozen LM head, W2 the
Markov head's table, m_t its vector, cap Gemma4's soft-capping or none) and target logits
Z = cap(z_t W):
    ce_t = logsumexp(D) - D[y_t]
    l1_t = sum_v |softmax(D)_v - softmax(Z)_v|
exactly as `losses.block_loss` computes them from whole [T, V] logits, but no [T, V] array is
ever built: the forward walks the vocabulary twice (the log-sum-exps of D and Z, then the L1 and
S_t = sum_v p_v sign(p_v - q_v)), and the backward once more, recomputing each tile's logits:
    dD = g_ce (p - onehot(y)) + g_l1 p (sign(p - q) - S)
which it multiplies into h (through W and the cap's derivative), m and W2. Each walk holds
[T, tile] arrays; a vocabulary that is not a whole number of tiles ends with a tile that
overlaps the one before, its repeated columns masked, so nothing is padded or copied.
Gradients reach h, m and W2; the frozen W and the target's z get none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def tiled_block_losses(hidden: jax.Array, target_hidden: jax.Array, labels: jax.Array, embed: jax.Array,
                       lm_head: jax.Array | None, vec: jax.Array | None = None, w2: jax.Array | None = None, *,
                       softcap: float | None = None, tile: int = 8192) -> tuple[jax.Array, jax.Array]:
    """(ce [T], l1 [T]) fp32 of T slots.

    hidden, target_hidden: [T, H] final-normed draft and target states; labels: [T] int32;
    embed: [V, H] and lm_head: [H, V] or None (tied: logits use embed); vec: [T, r] and w2:
    [V, r] the Markov head's vectors and table (None for DFlash); tile: vocabulary columns
    per step.
    """
    if vec is None:
        vec = jnp.zeros(hidden.shape[:1] + (1,), hidden.dtype)
        w2 = jnp.zeros((embed.shape[0], 1), hidden.dtype)
    tile = min(tile, embed.shape[0])
    return _losses(hidden, vec, w2, target_hidden, labels, embed, lm_head, softcap, tile)


def _tiles(vocab: int, tile: int) -> int:
    return -(-vocab // tile)


def _logits(h, vec, w2, z, embed, lm_head, index, tile, softcap):
    """Tile `index` of the draft and target logits: (D, cap's derivative on D's LM-head part,
    Z, columns [tile] int32, new [tile] bool: not already in an earlier tile)."""
    vocab = embed.shape[0]
    start = jnp.minimum(index * tile, vocab - tile)  # the last tile overlaps the one before
    if lm_head is None:
        weight = lax.dynamic_slice_in_dim(embed, start, tile, 0).astype(h.dtype)  # [tile, H]
        project = lambda x: jnp.einsum("th,vh->tv", x, weight, preferred_element_type=jnp.float32)
    else:
        weight = lax.dynamic_slice_in_dim(lm_head, start, tile, 1).astype(h.dtype)  # [H, tile]
        project = lambda x: jnp.einsum("th,hv->tv", x, weight, preferred_element_type=jnp.float32)
    d, t = project(h), project(z)  # [T, tile]
    slope = None
    if softcap is not None:
        d, t = softcap * jnp.tanh(d / softcap), softcap * jnp.tanh(t / softcap)
        slope = 1.0 - jnp.square(d / softcap)
    w2_tile = lax.dynamic_slice_in_dim(w2, start, tile, 0).astype(vec.dtype)  # [tile, r]
    d = d + jnp.einsum("tm,vm->tv", vec, w2_tile, preferred_element_type=jnp.float32)
    columns = start + jnp.arange(tile, dtype=jnp.int32)
    return d, slope, t, columns, columns >= index * tile, weight, w2_tile, start


def _statistics(h, vec, w2, z, labels, embed, lm_head, softcap, tile):
    """Both walks of the forward: (ce, l1, lse_d, lse_z, s) [T] fp32."""
    rows = h.shape[0]
    neg = jnp.full((rows,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((rows,), jnp.float32)

    def log_sum_exp(i, carry):
        peak_d, sum_d, peak_z, sum_z, at_label = carry
        d, _, t, columns, new = _logits(h, vec, w2, z, embed, lm_head, i, tile, softcap)[:5]
        d, t = jnp.where(new, d, -jnp.inf), jnp.where(new, t, -jnp.inf)
        top_d, top_z = jnp.maximum(peak_d, jnp.max(d, axis=1)), jnp.maximum(peak_z, jnp.max(t, axis=1))
        sum_d = sum_d * jnp.exp(peak_d - top_d) + jnp.sum(jnp.exp(d - top_d[:, None]), axis=1)
        sum_z = sum_z * jnp.exp(peak_z - top_z) + jnp.sum(jnp.exp(t - top_z[:, None]), axis=1)
        at_label = at_label + jnp.sum(jnp.where(columns == labels[:, None], jnp.where(new, d, 0.0), 0.0), axis=1)
        return top_d, sum_d, top_z, sum_z, at_label

    peak_d, sum_d, peak_z, sum_z, at_label = lax.fori_loop(0, _tiles(embed.shape[0], tile), log_sum_exp,
                                                           (neg, zero, neg, zero, zero))
    lse_d, lse_z = peak_d + jnp.log(sum_d), peak_z + jnp.log(sum_z)

    def distance(i, carry):
        l1, s = carry
        d, _, t, _, new = _logits(h, vec, w2, z, embed, lm_head, i, tile, softcap)[:5]
        p, q = jnp.exp(d - lse_d[:, None]), jnp.exp(t - lse_z[:, None])
        l1 = l1 + jnp.sum(jnp.where(new, jnp.abs(p - q), 0.0), axis=1)
        return l1, s + jnp.sum(jnp.where(new, p * jnp.sign(p - q), 0.0), axis=1)

    l1, s = lax.fori_loop(0, _tiles(embed.shape[0], tile), distance, (zero, zero))
    return lse_d - at_label, l1, lse_d, lse_z, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _losses(h, vec, w2, z, labels, embed, lm_head, softcap, tile):
    return _statistics(h, vec, w2, z, labels, embed, lm_head, softcap, tile)[:2]


def _losses_forward(h, vec, w2, z, labels, embed, lm_head, softcap, tile):
    ce, l1, lse_d, lse_z, s = _statistics(h, vec, w2, z, labels, embed, lm_head, softcap, tile)
    return (ce, l1), (h, vec, w2, z, labels, embed, lm_head, lse_d, lse_z, s)


def _losses_backward(softcap, tile, residuals, cotangents):
    h, vec, w2, z, labels, embed, lm_head, lse_d, lse_z, s = residuals
    g_ce, g_l1 = cotangents  # [T] each

    def body(i, carry):
        dh, dvec, dw2 = carry
        d, slope, t, columns, new, weight, w2_tile, start = _logits(h, vec, w2, z, embed, lm_head, i, tile, softcap)
        p, q = jnp.exp(d - lse_d[:, None]), jnp.exp(t - lse_z[:, None])
        grad = g_ce[:, None] * (p - (columns == labels[:, None])) + g_l1[:, None] * p * (jnp.sign(p - q) - s[:, None])
        grad = jnp.where(new, grad, 0.0)  # [T, tile] dLoss/dD
        raw = grad if slope is None else grad * slope
        if lm_head is None:
            dh = dh + jnp.einsum("tv,vh->th", raw.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
        else:
            dh = dh + jnp.einsum("tv,hv->th", raw.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
        dvec = dvec + jnp.einsum("tv,vm->tm", grad.astype(w2_tile.dtype), w2_tile, preferred_element_type=jnp.float32)
        update = jnp.einsum("tv,tm->vm", grad.astype(vec.dtype), vec, preferred_element_type=jnp.float32)
        dw2 = lax.dynamic_update_slice_in_dim(dw2, lax.dynamic_slice_in_dim(dw2, start, tile, 0) + update, start, 0)
        return dh, dvec, dw2

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(vec.shape, jnp.float32), jnp.zeros(w2.shape, jnp.float32))
    dh, dvec, dw2 = lax.fori_loop(0, _tiles(embed.shape[0], tile), body, init)
    return dh.astype(h.dtype), dvec.astype(vec.dtype), dw2.astype(w2.dtype), None, None, None, None


_losses.defvjp(_losses_forward, _losses_backward)
