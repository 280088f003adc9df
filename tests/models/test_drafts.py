"""Draft models: training forward vs inference forward, a float64 numpy reference, sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.sampling import SamplingParams
from dspark_jax.models.config import ModelConfig
from dspark_jax.models.draft import Draft
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.models.attention import block_attention
from tests.helpers import max_rel_err
from tests.models.dspark_numpy import dspark_block

TARGETS = {
    "qwen3": ModelConfig(family="qwen3", vocab_size=89, hidden_size=32, intermediate_size=48, num_layers=6,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6),
    "llama": ModelConfig(family="llama", vocab_size=89, hidden_size=32, intermediate_size=40, num_layers=6,
                         num_heads=8, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-5),
}
VARIANTS = [
    ("qwen3", "dspark", "vanilla"),
    ("qwen3", "dspark", "gated"),
    ("qwen3", "dspark", "rnn"),
    ("qwen3", "dflash", "vanilla"),
    ("llama", "dspark", "vanilla"),
]
GAMMA, S = 4, 24


@functools.lru_cache(maxsize=None)
def make_draft(family, algorithm, head, seed=0):
    config = draft_config_for_target(
        TARGETS[family], algorithm, (-1, 2, 4), num_layers=2, block_size=GAMMA, mask_token_id=88,
        markov_rank=8, markov_head_type=head,
    )
    draft = Draft.random(config, seed=seed, dtype="float32")
    # Random init is N(0, 0.02); scale weights up so every term (Markov bias, attention) matters.
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, draft.params)
    return Draft(config, params, jnp.float32)


def sequence(draft, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    features = jax.random.normal(k1, (1, S, draft.config.feature_size))
    tokens = jax.random.randint(k2, (1, S), 0, draft.config.layers.vocab_size)
    return features, tokens


@pytest.mark.parametrize("family,algorithm,head", VARIANTS)
def test_training_forward_equals_per_block_scoring(family, algorithm, head):
    draft = make_draft(family, algorithm, head)
    features, tokens = sequence(draft)
    anchors = jnp.asarray([[2, 9, 13, 19, 0, 0]])  # two dummy blocks at the end
    keep = jnp.asarray([[True, True, True, True, False, False]])
    logits, conf, _ = jax.jit(draft.block_forward)(draft.params, features, tokens, anchors, keep)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(conf))
    score = jax.jit(draft.score_block)
    for n in range(4):
        a = int(anchors[0, n])
        one, one_conf = score(draft.params, features, jnp.asarray([a]), tokens[:, a], tokens[:, a + 1 : a + 1 + GAMMA])
        assert max_rel_err(logits[0, n], one[0]) <= 1e-5, n
        if draft.config.confidence_head:
            assert max_rel_err(conf[0, n], one_conf[0]) <= 1e-5, n


@pytest.mark.parametrize("family,algorithm,head", VARIANTS)
def test_inference_cache_path_equals_scoring(family, algorithm, head):
    """Extend the draft cache in two chunks, sample a block, and rescore it teacher-forced."""
    draft = make_draft(family, algorithm, head)
    features, tokens = sequence(draft)
    anchor = 15
    cache = draft.init_cache(1, 32)
    sampling = SamplingParams(temperature=1.0)
    propose = jax.jit(draft.propose, static_argnums=7)
    _, cache = propose(draft.params, cache, features[:, :9], tokens[:, 1:10], jnp.asarray([6]),
                       tokens[:, 6], jax.random.key(0), sampling)
    assert int(cache.lengths[0]) == 6
    chunk = features[:, 6:anchor]  # 9 rows, as many as the first call (one compilation)
    prop, cache = propose(draft.params, cache, chunk, jnp.zeros((1, 9), jnp.int32), jnp.asarray([anchor - 6]),
                          tokens[:, anchor], jax.random.key(1), sampling)
    assert int(cache.lengths[0]) == anchor
    logits, conf = jax.jit(draft.score_block)(draft.params, features, jnp.asarray([anchor]), tokens[:, anchor],
                                              prop.tokens)
    expected = jax.nn.softmax(logits, axis=-1)
    assert max_rel_err(prop.probs, expected) <= 1e-5
    np.testing.assert_allclose(prop.confidence, conf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,algorithm,head", VARIANTS)
def test_numpy_float64_reference(family, algorithm, head):
    draft = make_draft(family, algorithm, head)
    features, tokens = sequence(draft)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), draft.params)
    score = jax.jit(draft.score_block)
    for a in (1, 11, 20):
        block = tokens[:, a + 1 : a + 1 + GAMMA]
        if block.shape[1] < GAMMA:
            block = jnp.pad(block, ((0, 0), (0, GAMMA - block.shape[1])))
        logits, conf = score(draft.params, features, jnp.asarray([a]), tokens[:, a], block)
        ref_logits, ref_conf = dspark_block(p64, draft.config, np.asarray(features[0], np.float64), a,
                                            int(tokens[0, a]), np.asarray(block[0]))
        assert max_rel_err(logits[0], ref_logits) <= 2e-5, a
        if draft.config.confidence_head:
            assert max_rel_err(conf[0], ref_conf) <= 2e-5, a


def test_fully_masked_blocks_attend_to_nothing():
    b, n, g, nh, k, d, s = 1, 2, 3, 4, 2, 8, 5
    keys = iter(jax.random.split(jax.random.key(0), 5))
    q = jax.random.normal(next(keys), (b, n, g, nh, d))
    k_ctx, v_ctx = (jax.random.normal(next(keys), (b, k, s, d)) for _ in range(2))
    k_blk, v_blk = (jax.random.normal(next(keys), (b, n, g, k, d)) for _ in range(2))
    attend = jax.jit(block_attention)
    out = attend(q, k_ctx, v_ctx, jnp.asarray([[0, 3]]), k_blk, v_blk, jnp.asarray([[False, True]]))
    assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.isfinite(out))
    # A kept block with no context (anchor 0) still attends to its own slots.
    out = attend(q, k_ctx, v_ctx, jnp.asarray([[0, 3]]), k_blk, v_blk, jnp.asarray([[True, True]]))
    assert np.all(np.abs(np.asarray(out[0, 0])) > 0)


def test_eagle3_ttt_equals_inference_chains():
    config = draft_config_for_target(TARGETS["qwen3"], "eagle3", (1, 2, 3, 4, 5), block_size=GAMMA)
    base = Draft.random(config, seed=3, dtype="float32")
    draft = Draft(config, jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, base.params), jnp.float32)
    features, tokens = sequence(draft, seed=4)
    outs = jax.jit(draft.ttt_forward)(draft.params, features, tokens)  # [G, 1, S, H]
    ttt_logits = jax.jit(draft.logits)(draft.params, outs)  # [G, 1, S, V]
    score = jax.jit(draft.score_block)
    for anchor in (1, 8, 17):
        t = anchor - 1  # the chain from anchor a starts at the pair (F_{a-1}, x_a)
        logits, _ = score(draft.params, features, jnp.asarray([anchor]), tokens[:, anchor],
                          tokens[:, anchor + 1 : anchor + 1 + GAMMA], context_ids=tokens)
        for k in range(GAMMA):
            assert max_rel_err(logits[0, k], ttt_logits[k, 0, t]) <= 1e-5, (anchor, k)
    # propose() samples from exactly the distribution score_block assigns to its tokens.
    cache = draft.init_cache(1, 32)
    nxt = tokens[:, 1:13]
    prop, cache = jax.jit(draft.propose, static_argnums=7)(
        draft.params, cache, features[:, :12], nxt, jnp.asarray([12]), tokens[:, 12], jax.random.key(5),
        SamplingParams(0.8))
    logits, _ = score(draft.params, features, jnp.asarray([12]), tokens[:, 12], prop.tokens, context_ids=tokens)
    assert max_rel_err(prop.probs, jax.nn.softmax(logits / 0.8, axis=-1)) <= 1e-5
    assert int(cache.lengths[0]) == 12


def test_markov_bias_changes_with_previous_token():
    """The sequential head is live: scoring the same block after different tokens differs."""
    draft = make_draft("qwen3", "dspark", "vanilla")
    features, tokens = sequence(draft)
    a = 10
    blk = tokens[:, a + 1 : a + 1 + GAMMA]
    other = blk.at[0, 0].set((blk[0, 0] + 1) % 89)
    score = jax.jit(draft.score_block)
    l1, c1 = score(draft.params, features, jnp.asarray([a]), tokens[:, a], blk)
    l2, c2 = score(draft.params, features, jnp.asarray([a]), tokens[:, a], other)
    np.testing.assert_allclose(l1[0, 0], l2[0, 0])  # slot 0 only sees the anchor
    assert not np.allclose(l1[0, 1], l2[0, 1]) and not np.allclose(c1[0, 1], c2[0, 1])
