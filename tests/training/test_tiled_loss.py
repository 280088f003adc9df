"""`tiled_loss` on its own, for what the block-loss test does not reach: tied embeddings, Gemma4's
soft-capped logits, a tile wider than the vocabulary, and one that leaves a single new column in
the last tile. Values against float64 numpy; gradients against the whole-vocabulary jnp
formulas of `losses.block_loss`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.training.tiled_loss import tiled_block_losses

T, H, V, R = 10, 12, 97, 5


def inputs(seed, tied):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return dict(hidden=normal(T, H), target_hidden=normal(T, H), labels=jnp.asarray(rng.integers(0, V, T), jnp.int32),
                embed=normal(V, H), lm_head=None if tied else normal(H, V), vec=normal(T, R),
                w2=normal(V, R, scale=0.5))


def logits(x, softcap):
    head = x["embed"].T if x["lm_head"] is None else x["lm_head"]
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * jnp.tanh(z / softcap))
    return cap(x["hidden"] @ head) + x["vec"] @ x["w2"].T, cap(x["target_hidden"] @ head)


def whole_vocabulary(x, softcap):
    d, z = logits(x, softcap)
    log_p = jax.nn.log_softmax(d, axis=-1)
    ce = -jnp.take_along_axis(log_p, x["labels"][:, None], axis=-1)[:, 0]
    return ce, jnp.sum(jnp.abs(jnp.exp(log_p) - jax.nn.softmax(z, axis=-1)), axis=-1)


def float64(x, softcap):
    x64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in x.items()}
    head = x64["embed"].T if x64["lm_head"] is None else x64["lm_head"]
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * np.tanh(z / softcap))
    d, z = cap(x64["hidden"] @ head) + x64["vec"] @ x64["w2"].T, cap(x64["target_hidden"] @ head)
    p = np.exp(d - d.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    return -np.log(p[np.arange(T), x64["labels"].astype(int)]), np.abs(p - q).sum(1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tile", [32, 48, 128])  # 97 = 3 x 32 + 1: a last tile with one new column; 128 > V
def test_tiled_losses_and_gradients_equal_whole_vocabulary(tied, softcap, tile):
    x = inputs(0, tied)
    tiled = lambda h, m, w2: tiled_block_losses(h, x["target_hidden"], x["labels"], x["embed"], x["lm_head"], m, w2,
                                                softcap=softcap, tile=tile)
    ce, l1 = tiled(x["hidden"], x["vec"], x["w2"])
    want_ce, want_l1 = float64(x, softcap)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(l1, want_l1, rtol=1e-5)

    g_ce, g_l1 = jax.random.normal(jax.random.key(1), (2, T))
    objective = lambda f: lambda h, m, w2: jnp.sum(g_ce * f(h, m, w2)[0] + g_l1 * f(h, m, w2)[1])
    whole = lambda h, m, w2: whole_vocabulary({**x, "hidden": h, "vec": m, "w2": w2}, softcap)
    got = jax.grad(objective(tiled), argnums=(0, 1, 2))(x["hidden"], x["vec"], x["w2"])
    want = jax.grad(objective(whole), argnums=(0, 1, 2))(x["hidden"], x["vec"], x["w2"])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_without_a_markov_head_the_logits_are_the_lm_heads():
    x = inputs(2, tied=False)
    ce, l1 = tiled_block_losses(x["hidden"], x["target_hidden"], x["labels"], x["embed"], x["lm_head"], tile=40)
    want_ce, want_l1 = float64({**x, "vec": np.zeros((T, R)), "w2": np.zeros((V, R))}, None)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(l1, want_l1, rtol=1e-5)
