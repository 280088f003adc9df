"""Attention implementations against the reference masked attention: cuDNN's fused attention of
cache-free forwards on GPU, and the Pallas ragged paged attention kernel over paged caches
(interpreted on CPU) for a decoder's queries and for a draft's blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.models.attention import cached_attention, kv_attention, kv_block_attention, sequence_attention
from dspark_jax.models.kv_cache import PagedLayerCache


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on GPUs only")
def test_cudnn_sequence_attention_matches_masked_attention():
    b, t, n, k, d = 2, 384, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key, h in zip(keys, (n, k, k)))
    fused = sequence_attention(q.astype(jnp.bfloat16), kk.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                               jnp.full((b,), t, jnp.int32), "cudnn")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    exact = cached_attention(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, jnp.full((b,), t))
    err = np.abs(np.asarray(fused, np.float32) - np.asarray(exact)).max()
    assert err <= 2e-2 * np.abs(np.asarray(exact)).max(), err  # bf16 inputs and output


def _paged_layer(rng, rows, kv_heads, head_dim, page_size, columns):
    """A PagedLayerCache of random pools, each row given `columns` shuffled pages."""
    pool = rows * columns + 2
    k, v = (jnp.asarray(rng.standard_normal((pool, page_size, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.permutation(pool)[: rows * columns].reshape(rows, columns), jnp.int32)
    return PagedLayerCache(k, v, table)


@pytest.mark.parametrize("pattern", [{}, dict(scale=1.0, window=7)], ids=["causal", "gemma4-sliding"])
def test_the_kernel_over_a_paged_cache_matches_the_gathered_view(pattern):
    """kv_attention with "pallas" (the Pallas kernel, interpreted here) against "xla" over the
    same paged cache: decode and verify rows of different lengths, with the default scale or
    Gemma4's scale 1 and a sliding window shorter than the rows."""
    rng = np.random.default_rng(0)
    layer = _paged_layer(rng, 3, 2, 16, 4, 6)
    q = jnp.asarray(rng.standard_normal((3, 5, 8, 16)), jnp.float32)
    lengths = jnp.asarray([24, 9, 3], jnp.int32)
    positions = lengths[:, None] - 5 + jnp.arange(5)[None]  # the last 5 positions of each row
    got = kv_attention(q, layer, positions, lengths, "pallas", **pattern)
    want = kv_attention(q, layer, positions, lengths, "xla", **pattern)
    seen = np.asarray(positions >= 0)  # a query at a negative position sees nothing (its output is unused)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [None, 1.0], ids=["default-scale", "gemma4-scale"])
def test_a_draft_block_over_a_paged_context_matches_one_softmax(scale):
    """kv_block_attention with "pallas" merges the kernel's softmax over the context with the
    block's own keys; it equals block_attention's one softmax over both (context lengths per
    block, an empty context, and a dropped block, which gives zeros)."""
    rng = np.random.default_rng(1)
    b, a, g, n, kv_heads, d = 3, 2, 4, 8, 2, 16
    layer = _paged_layer(rng, b, kv_heads, d, 4, 6)
    q = jnp.asarray(rng.standard_normal((b, a, g, n, d)), jnp.float32)
    k_blk, v_blk = (jnp.asarray(rng.standard_normal((b, a, g, kv_heads, d)), jnp.float32) for _ in range(2))
    ctx_len = jnp.asarray([[20, 24], [0, 7], [13, 5]], jnp.int32)
    keep = jnp.asarray([[True, True], [True, True], [True, False]])
    got = np.asarray(kv_block_attention(q, layer, ctx_len, k_blk, v_blk, keep, "pallas", scale=scale))
    want = np.asarray(kv_block_attention(q, layer, ctx_len, k_blk, v_blk, keep, "xla", scale=scale))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.all(got[2, 1] == 0) and np.abs(got[1, 0]).max() > 0  # dropped block; the block alone
