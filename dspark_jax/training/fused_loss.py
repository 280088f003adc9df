"""The block drafters' vocabulary-sized head and losses, fused and computed a chunk of slots at a time.

Per supervised slot t, with draft logits D = cap(h_t W) + W2 m_t (W the frozen LM head, W2 the
Markov head's table, m_t its vector, cap Gemma4's soft-capping or none) and target logits
Z = cap(z_t W), p = softmax(D), q = softmax(Z):
    ce_t = logsumexp(D) - D[y_t]
    l1_t = sum_v |p_v - q_v|
    loss = sum_t a_t ce_t + b_t l1_t        (a, b: the per-slot loss weights)
exactly as `losses.block_loss` computes them from whole [B, T, V] logits, but only one chunk's
[B, C, V] arrays ever exist. A chunk's softmaxes are whole, so its gradient is known as soon as its
logits are (the weights a and b come in with the inputs):
    dD = a (p - onehot(y)) + b p (sign(p - q) - S),  S_t = sum_v p_v sign(p_v - q_v)
and the differentiated forward multiplies it into h (through W and the cap's derivative), m
and W2 right away, keeping only those gradients for the backward, which scales them by the
loss's cotangent. That is three vocabulary-sized matmuls per slot (D, Z and dD W^T), as with
whole logits, and no [B, T, V] array. Without differentiation only D and Z are computed.
The softmaxes, ce, l1 and dD of a chunk come from `pallas_kernels.vocab_loss` (`kernel`:
"pallas" its streaming kernel, "xla" its jnp reference).

Letters: b sequences, c slots of a chunk, h hidden, v vocabulary, r Markov rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from dspark_jax.sharding import shard_map
from pallas_kernels.vocab_loss import loss_and_grad


def fused_block_losses(hidden: jax.Array, target_hidden: jax.Array, labels: jax.Array, ce_weight: jax.Array,
                       l1_weight: jax.Array, embed: jax.Array, lm_head: jax.Array | None, vec: jax.Array | None = None,
                       w2: jax.Array | None = None, *, softcap: float | None = None, chunk: int = 512,
                       l1_grad: bool = True, kernel: str = "xla",
                       mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss [] fp32, ce [B, T] fp32, l1 [B, T] fp32) of B sequences' T slots. Gradients reach
    hidden, vec and w2 through `loss` only: ce and l1 are values (for metrics), and the frozen
    LM head, the target's states and the weights get none.

    hidden, target_hidden: [B, T, H] final-normed draft and target states; labels: [B, T]
    int32; ce_weight, l1_weight: [B, T] the weights a and b; embed: [V, H] and lm_head: [H, V]
    or None (tied: logits use embed); vec: [B, T, r] and w2: [V, r] the Markov head's vectors
    and table (None for DFlash); chunk: slots of each sequence per step (T is split into equal
    chunks, the last padded with slots of weight 0). Every step takes all B sequences, so a
    batch sharded over devices stays sharded: each device holds [its sequences, chunk, V].
    l1_grad=False promises that l1_weight is zero (DFlash), which saves the kernel a pass;
    kernel: "pallas" or "xla" (see the module's docstring); mesh: the kernel runs on each
    device's sequences under a mesh of several devices.
    """
    b, t = labels.shape
    steps = -(-t // min(chunk, t))
    size = -(-t // steps)

    def chunked(x):  # [B, T, ...] -> [steps, B, size, ...]
        x = jnp.pad(x, ((0, 0), (0, steps * size - t)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, steps, size) + x.shape[2:]), 1, 0)

    def unchunked(x):  # [steps, B, size] -> [B, T]
        return jnp.moveaxis(x, 0, 1).reshape(b, steps * size)[:, :t]

    head = (embed if lm_head is None else lm_head).astype(hidden.dtype)  # [V, H] tied, else [H, V]
    # dD in the head's dtype feeds the matmuls; with a cap it is scaled by the slope first, in fp32.
    out_dtype = head.dtype if softcap is None else jnp.float32
    losses = functools.partial(_chunk_losses, l1_grad=l1_grad, out_dtype=out_dtype, kernel=kernel)
    if kernel == "pallas" and mesh is not None and mesh.size > 1:
        per_sequence = lambda n: ("batch",) + (None,) * (n - 1)
        losses = shard_map(losses, mesh, [per_sequence(n) for n in (3, 3, 2, 2, 2)],
                           [per_sequence(n) for n in (2, 2, 3)], check_vma=False)
    loss, ce, l1 = _fused(chunked(hidden), None if vec is None else chunked(vec), w2, chunked(target_hidden),
                          chunked(labels), chunked(ce_weight.astype(jnp.float32)),
                          chunked(l1_weight.astype(jnp.float32)), head, lm_head is None, softcap, losses)
    return loss, lax.stop_gradient(unchunked(ce)), lax.stop_gradient(unchunked(l1))


def _chunk_losses(d, y, labels, a, b, *, l1_grad, out_dtype, kernel):
    """`vocab_loss.loss_and_grad` on a chunk's [B, C, V] logits: (ce [B, C], l1 [B, C], dD [B, C, V])."""
    shape = labels.shape
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    ce, l1, grad = loss_and_grad(flat(d), flat(y), flat(labels), flat(a), flat(b), l1_grad=l1_grad,
                                 out_dtype=out_dtype, implementation=kernel)
    return ce.reshape(shape), l1.reshape(shape), grad.reshape(d.shape)


def _logits(h, vec, w2, z, head, tied, softcap):
    """One chunk's draft and target logits D, Z [B, C, V] fp32, and the cap's slope on D's
    LM-head part (None without a cap). vec and w2 are None without a Markov head."""
    project = functools.partial(jnp.einsum, "bch,vh->bcv" if tied else "bch,hv->bcv",
                                preferred_element_type=jnp.float32)
    d, y = project(h, head), project(z, head)  # [B, C, V]
    slope = None
    if softcap is not None:
        d, y = softcap * jnp.tanh(d / softcap), softcap * jnp.tanh(y / softcap)
        slope = 1.0 - jnp.square(d / softcap)
    if vec is not None:
        d = d + jnp.einsum("bcr,vr->bcv", vec, w2.astype(vec.dtype), preferred_element_type=jnp.float32)
    return d, y, slope


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _fused(h, vec, w2, z, labels, a, b, head, tied, softcap, losses):
    """Chunked inputs ([steps, B, C, ...]) -> (loss, ce [steps, B, C], l1 [steps, B, C]).
    losses: `_chunk_losses` with its settings bound; only its ce and l1 are used here (XLA drops
    the reference's gradient; the kernel writes it anyway)."""
    def step(x):
        h, vec, z, labels, a, b = x
        return losses(*_logits(h, vec, w2, z, head, tied, softcap)[:2], labels, a, b)[:2]

    ce, l1 = lax.map(step, (h, vec, z, labels, a, b))
    return jnp.sum(a * ce + b * l1), ce, l1


def _fused_forward(h, vec, w2, z, labels, a, b, head, tied, softcap, losses):
    def step(dw2, x):
        h, vec, z, labels, a, b = x
        d, y, slope = _logits(h, vec, w2, z, head, tied, softcap)
        ce, l1, grad = losses(d, y, labels, a, b)  # grad [B, C, V] = dLoss/dD (fp32 with a cap)
        raw = (grad if slope is None else grad * slope).astype(head.dtype)
        dh = jnp.einsum("bcv,vh->bch" if tied else "bcv,hv->bch", raw, head, preferred_element_type=jnp.float32)
        if vec is None:
            return dw2, (ce, l1, dh, None)
        dvec = jnp.einsum("bcv,vr->bcr", grad.astype(w2.dtype), w2, preferred_element_type=jnp.float32)
        dw2 = dw2 + jnp.einsum("bcv,bcr->vr", grad.astype(vec.dtype), vec, preferred_element_type=jnp.float32)
        return dw2, (ce, l1, dh, dvec)

    dw2 = None if w2 is None else jnp.zeros(w2.shape, jnp.float32)
    dw2, (ce, l1, dh, dvec) = lax.scan(step, dw2, (h, vec, z, labels, a, b))
    dtypes = jax.tree.map(lambda x: jnp.zeros((), x.dtype), (h, vec, w2))  # the inputs' dtypes
    return (jnp.sum(a * ce + b * l1), ce, l1), (dh, dvec, dw2, dtypes)


def _fused_backward(tied, softcap, losses, residuals, cotangents):
    dh, dvec, dw2, dtypes = residuals
    g = cotangents[0]  # the loss's; ce and l1 leave through stop_gradient
    scaled = jax.tree.map(lambda d, x: (g * d).astype(x.dtype), (dh, dvec, dw2), dtypes)
    return scaled + (None,) * 5


_fused.defvjp(_fused_forward, _fused_backward)
