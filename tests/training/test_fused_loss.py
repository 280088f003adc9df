"""`fused_loss` on its own, for what the block-loss test does not reach: tied embeddings, Gemma4's
soft-capped logits, chunks that do not divide the slots, a chunk wider than them, and a loss
cotangent other than 1. Values against float64 numpy; gradients against the whole-vocabulary
jnp formulas of `losses.block_loss`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.training.fused_loss import fused_block_losses

B, T, H, V, R = 2, 10, 12, 97, 5


def inputs(seed, tied):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return dict(hidden=normal(B, T, H), target_hidden=normal(B, T, H),
                labels=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), embed=normal(V, H),
                lm_head=None if tied else normal(H, V), vec=normal(B, T, R), w2=normal(V, R, scale=0.5),
                ce_weight=jnp.asarray(rng.uniform(0, 1, (B, T)), jnp.float32),
                l1_weight=jnp.asarray(rng.uniform(0, 1, (B, T)) * (rng.uniform(size=(B, T)) > 0.3), jnp.float32))


def whole_vocabulary(x, softcap):
    """(loss, ce, l1) from whole [T, V] logits, in jnp (differentiable)."""
    head = x["embed"].T if x["lm_head"] is None else x["lm_head"]
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * jnp.tanh(z / softcap))
    d, z = cap(x["hidden"] @ head) + x["vec"] @ x["w2"].T, cap(x["target_hidden"] @ head)
    log_p = jax.nn.log_softmax(d, axis=-1)
    ce = -jnp.take_along_axis(log_p, x["labels"][..., None], axis=-1)[..., 0]
    l1 = jnp.sum(jnp.abs(jnp.exp(log_p) - jax.nn.softmax(z, axis=-1)), axis=-1)
    return jnp.sum(x["ce_weight"] * ce + x["l1_weight"] * l1), ce, l1


def float64(x, softcap):
    x64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in x.items()}
    head = x64["embed"].T if x64["lm_head"] is None else x64["lm_head"]
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * np.tanh(z / softcap))
    d, z = cap(x64["hidden"] @ head) + x64["vec"] @ x64["w2"].T, cap(x64["target_hidden"] @ head)
    p = np.exp(d - d.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    ce = -np.log(np.take_along_axis(p, x64["labels"].astype(int)[..., None], axis=-1)[..., 0])
    l1 = np.abs(p - q).sum(-1)
    return np.sum(x64["ce_weight"] * ce + x64["l1_weight"] * l1), ce, l1


def fused(x, softcap, chunk, kernel="xla"):
    return lambda h, m, w2: fused_block_losses(h, x["target_hidden"], x["labels"], x["ce_weight"], x["l1_weight"],
                                               x["embed"], x["lm_head"], m, w2, softcap=softcap, chunk=chunk,
                                               kernel=kernel)


@pytest.mark.parametrize("kernel", ["xla", "pallas"])  # pallas: pallas_kernels/vocab_loss, interpreted off a GPU
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk", [3, 4, 10, 64])  # 10 slots a sequence: 4 x 3 and 3 x 4 padded, one, wider
def test_fused_losses_and_gradients_equal_whole_vocabulary(tied, softcap, chunk, kernel):
    x = inputs(0, tied)
    f = fused(x, softcap, chunk, kernel)
    loss, ce, l1 = jax.jit(f)(x["hidden"], x["vec"], x["w2"])
    want_loss, want_ce, want_l1 = float64(x, softcap)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(l1, want_l1, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)

    scale = 0.37  # the loss's cotangent is not 1
    whole = lambda h, m, w2: whole_vocabulary({**x, "hidden": h, "vec": m, "w2": w2}, softcap)[0]
    got_loss, got = jax.jit(jax.value_and_grad(lambda *a: scale * f(*a)[0], argnums=(0, 1, 2)))(
        x["hidden"], x["vec"], x["w2"])
    want = jax.grad(lambda *a: scale * whole(*a), argnums=(0, 1, 2))(x["hidden"], x["vec"], x["w2"])
    np.testing.assert_allclose(got_loss, scale * want_loss, rtol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
@pytest.mark.parametrize("l1_grad", [True, False])
def test_without_a_markov_head_the_logits_are_the_lm_heads(l1_grad, kernel):
    """DFlash: no Markov head, and (l1_grad=False) no L1 term in the loss, which skips a pass."""
    x = inputs(2, tied=False)
    if not l1_grad:
        x = {**x, "l1_weight": jnp.zeros_like(x["l1_weight"])}
    losses = lambda h: fused_block_losses(h, x["target_hidden"], x["labels"], x["ce_weight"], x["l1_weight"],
                                          x["embed"], x["lm_head"], chunk=4, l1_grad=l1_grad, kernel=kernel)
    loss, ce, l1 = losses(x["hidden"])
    want_loss, want_ce, want_l1 = float64({**x, "vec": np.zeros((B, T, R)), "w2": np.zeros((V, R))}, None)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(l1, want_l1, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = jax.grad(lambda h: losses(h)[0])(x["hidden"])
    want = jax.grad(lambda h: whole_vocabulary({**x, "hidden": h, "vec": jnp.zeros((B, T, R)),
                                                "w2": jnp.zeros((V, R))}, None)[0])(x["hidden"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
